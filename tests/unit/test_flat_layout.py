"""parallel/flat_layout.py: every element of every parameter is owned by exactly one rank, and the
shards laid end to end in rank order (an all-gather) come back to the flat vector, with one segment
and with many (the buckets of ZeRO-2's overlapped reduce-scatter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from parallel.flat_layout import FlatLayout


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.randn(n)) for n in (7, 3, 20, 1, 9, 4)]


@pytest.mark.parametrize("segment_numel", [None, 1, 10, 25, 1000])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_every_element_owned_once_and_unshard_inverts_the_gather(n: int, segment_numel: int | None) -> None:
    params = _params()
    layouts = [FlatLayout(params, n, r, segment_numel) for r in range(n)]
    flat = layouts[0].pack(params, torch.device("cpu"))
    seen = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
    shards = []
    for lay in layouts:
        shard = torch.zeros(lay.shard_size)
        for i, in_param, in_shard in lay.owned():
            seen[i][in_param] += 1
            shard[in_shard] = params[i].detach().view(-1)[in_param]
        shards.append(shard)
    assert all(bool((s == 1).all()) for s in seen)
    assert layouts[0].size == n * layouts[0].shard_size
    torch.testing.assert_close(layouts[0].unshard(torch.cat(shards)), flat, rtol=0, atol=0)
    for lay in layouts:  # every segment is a multiple of n, cut at whole parameters, in model order
        assert all((s.hi - s.lo) == n * s.piece for s in lay.segments)
        assert [s.first for s in lay.segments[1:]] == [s.last for s in lay.segments[:-1]]


def test_segments_are_cut_from_the_end_at_the_cap() -> None:
    lay = FlatLayout(_params(), 2, 0, segment_numel=13)
    # sizes 7, 3, 20, 1, 9, 4 from the end: [9, 4] = 13, [1] (20 does not fit beside it), [20], [7, 3]
    assert [(s.first, s.last) for s in lay.segments] == [(0, 2), (2, 3), (3, 4), (4, 6)]
