"""Ring and all-gather attention equal one device's scaled_dot_product_attention,
outputs and gradients of q, k, v, with causal and full masks and GQA heads."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.context_parallel import AllGatherAttention, RingAttention, shard_sequence
from tests.dist.harness import spawn

pytestmark = pytest.mark.dist

B, HQ, HKV, T, D = 2, 4, 2, 32, 8


def _check(rank: int, world: int, mode: str, causal: bool) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, h, T, D, generator=gen) for h in (HQ, HKV, HKV, HQ))
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(ref_q, ref_k, ref_v, is_causal=causal, enable_gqa=True)
    ref.backward(dout)

    group = dist.group.WORLD
    core = RingAttention(group, causal=causal) if mode == "ring" else AllGatherAttention(group, T, causal=causal)
    lq, lk, lv = (shard_sequence(t, world, rank, dim=2).clone().requires_grad_() for t in (q, k, v))
    out = core(lq, lk, lv)
    out.backward(shard_sequence(dout, world, rank, dim=2))
    shard = lambda t: shard_sequence(t, world, rank, dim=2)  # noqa: E731
    errors = {
        "out": (out - shard(ref)).abs().max().item(),
        "dq": (lq.grad - shard(ref_q.grad)).abs().max().item(),
        "dk": (lk.grad - shard(ref_k.grad)).abs().max().item(),
        "dv": (lv.grad - shard(ref_v.grad)).abs().max().item(),
    }
    return {"errors": errors, "work": getattr(core, "work", None)}


CASES = [(cp, causal, "ring") for cp in (2, 4) for causal in (True, False)]
CASES += [(2, True, "allgather"), (2, False, "allgather"), (4, True, "allgather")]


@pytest.mark.parametrize(("cp", "causal", "mode"), CASES)
def test_matches_single_device_sdpa(cp: int, causal: bool, mode: str, tmp_path: Path) -> None:
    for rank, result in enumerate(spawn(_check, cp, tmp_path, mode, causal)):
        for name, err in result["errors"].items():
            assert err < 1e-5, f"cp={cp} rank {rank} {name}: max abs error {err:.2e}"


def _work(rank: int, world: int, zigzag: bool) -> float:
    core = RingAttention(dist.group.WORLD, causal=True, zigzag=zigzag)
    q = torch.randn(1, 2, 256 // world, 8)  # this rank's 64 of 256 positions
    core(q, q.clone(), q.clone())
    return core.work


def test_zigzag_balances_causal_work(tmp_path: Path) -> None:
    balanced = spawn(_work, 4, tmp_path, True)
    assert max(balanced) / min(balanced) - 1 <= 0.01, f"zig-zag attention work per rank: {balanced}"
    plain = spawn(_work, 4, tmp_path, False)
    imbalance = max(plain) / min(plain) - 1
    print(f"causal attention work per rank, contiguous chunks: {plain} (imbalance {imbalance:.0%}); "
          f"zig-zag: {balanced}")  # fmt: skip
    assert imbalance > 1.0  # the last rank does far more work than the first without zig-zag
