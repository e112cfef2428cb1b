"""Gradient buckets reduced while backward runs (parallel/grad_buckets.py), on two gloo ranks: the
buckets start inside backward, in order, and give what one all-reduce after backward gives (stages
0-1), or this rank's shard of it (stage 2, a reduce-scatter per bucket into the segmented layout),
unused parameters included. The trainer-level parity of ZeRO 0-2 with it is in test_parity.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from parallel.flat_layout import FlatLayout
from parallel.grad_buckets import GradBuckets

pytestmark = pytest.mark.dist


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(3, 3)  # first in the flat order, so in the last bucket; never gets a gradient
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Net()


def _backward(model: nn.Module, rank: int) -> None:
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(rank))
    model(x).pow(2).sum().backward()


def _rank(rank: int, store: str) -> None:
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    # A file store: no port to pick (and lose to another process) before the ranks start.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        # The reference: whole gradients summed over the ranks after backward.
        ref = _model()
        _backward(ref, rank)
        params = list(ref.parameters())
        flat = FlatLayout(params, 2, rank, segment_numel=75)  # buckets of about 300 bytes
        assert len(flat.segments) >= 4
        want = flat.pack([p.grad for p in params], torch.device("cpu"))
        dist.all_reduce(want)
        # This rank's shard of the sum, element by element from the layout's ownership.
        want_shard = torch.full((flat.shard_size,), float("nan"))
        for i, in_param, in_shard in flat.owned():
            want_shard[in_shard] = want[flat.spans[i][0] :][in_param]
        assert (~want_shard.isnan()).sum() >= flat.shard_size - len(flat.segments)  # all but padding

        for scatter in (False, True):
            model = _model()
            params = list(model.parameters())
            buckets = GradBuckets(params, flat, dist.group.WORLD, scatter=scatter)
            buckets.arm()
            _backward(model, rank)
            # Every bucket up to the one holding the unused layer started inside backward.
            assert buckets.next == len(buckets.buckets) - 1, (buckets.next, len(buckets.buckets))
            if scatter:  # the whole gradients of started buckets are dropped once copied out
                assert all(p.grad is None for p in params)
            got = buckets.finish()
            assert got is not None and buckets.finish() is None  # one backward, one result
            if scatter:
                real = ~want_shard.isnan()  # padding elements are owned by no parameter
                torch.testing.assert_close(got[real], want_shard[real], rtol=0, atol=1e-6)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            # Not armed: backward leaves the gradients alone.
            model.zero_grad()
            _backward(model, rank)
            assert buckets.finish() is None and params[-1].grad is not None
            buckets.remove()
    finally:
        dist.destroy_process_group()


def test_buckets_reduce_during_backward(tmp_path: Path) -> None:
    mp.spawn(_rank, args=(str(tmp_path / "store"),), nprocs=2)
