"""Where each trainable tensor's local elements sit in one virtual flat vector: the bookkeeping ZeRO
stages 0-2 (`parallel.data_parallel.ShardedAdamW`) shard the optimizer states and gradients by."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass(frozen=True)
class Segment:
    """Parameters [first, last) at [lo, hi) of the flat vector, padded so that hi - lo = n_shards * piece;
    rank r owns [lo + r*piece, lo + (r+1)*piece), which sits at [at, at + piece) of its shard."""

    first: int
    last: int
    lo: int
    hi: int
    piece: int
    at: int


class FlatLayout:
    """Where each trainable tensor's local elements sit in one virtual flat vector, end to end in model
    order, and which of them each of n_shards ranks owns.

    Without `segment_numel` the vector is one segment: padded to n_shards * shard_size, rank r owns
    [r*S, (r+1)*S). With it, the parameters are cut into segments of about that many elements (runs of
    whole parameters, taken from the end: backward's order), each padded to a multiple of n_shards, and
    rank r owns the r-th piece of every segment. A segment is then a bucket: its gradients can be
    reduce-scattered on their own as soon as backward has produced them (parallel/grad_buckets.py)."""

    def __init__(self, params: list[nn.Parameter], n_shards: int, rank: int, segment_numel: int | None = None) -> None:
        sizes = [_local(p).numel() for p in params]
        bounds = [(0, len(params))] if segment_numel is None else _cut(sizes, segment_numel)
        self.n_shards, self.rank = n_shards, rank
        self.spans: list[tuple[int, int]] = []  # [a, b) of each parameter
        self.segments: list[Segment] = []
        lo = at = 0
        for first, last in bounds:
            a = lo
            for size in sizes[first:last]:
                self.spans.append((a, a + size))
                a += size
            piece = math.ceil((a - lo) / n_shards)
            self.segments.append(Segment(first, last, lo, lo + piece * n_shards, piece, at))
            lo, at = lo + piece * n_shards, at + piece
        self.size, self.shard_size = lo, at

    def owned(self) -> Iterator[tuple[int, slice, slice]]:
        """(i, in_param, in_shard) for each parameter i with elements in this rank's shard: which of
        its flattened local elements those are, and where they sit in the shard."""
        for seg in self.segments:
            mine = seg.lo + self.rank * seg.piece  # this rank's piece [mine, mine + piece) of the segment
            for i in range(seg.first, seg.last):
                a, b = self.spans[i]
                lo, up = max(mine, a), min(mine + seg.piece, b)
                if lo < up:
                    yield i, slice(lo - a, up - a), slice(seg.at + lo - mine, seg.at + up - mine)

    def pack(self, tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
        """(size,) the tensors' local elements in place; zeros for None and the padding."""
        flat = torch.zeros(self.size, device=device)
        for t, (a, b) in zip(tensors, self.spans, strict=True):
            if t is not None:
                flat[a:b] = _local(t).reshape(-1)
        return flat

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's (numel,) slice of a whole flat vector, as views."""
        return [flat[a:b] for a, b in self.spans]

    def unshard(self, gathered: torch.Tensor) -> torch.Tensor:
        """The whole flat vector from every rank's shard laid end to end in rank order (what an
        all-gather of the shards gives). With one segment that is the flat vector itself."""
        if len(self.segments) == 1:
            return gathered
        by_rank = gathered.view(self.n_shards, self.shard_size)
        flat = torch.empty(self.size, dtype=gathered.dtype, device=gathered.device)
        for seg in self.segments:
            flat[seg.lo : seg.hi].view(self.n_shards, seg.piece).copy_(by_rank[:, seg.at : seg.at + seg.piece])
        return flat


def _cut(sizes: list[int], numel: int) -> list[tuple[int, int]]:
    """[first, last) runs of consecutive parameters of at most `numel` elements (or one parameter),
    formed from the last parameter backwards, returned in model order."""
    out, last = [], len(sizes)
    while last > 0:
        first, total = last - 1, sizes[last - 1]
        while first > 0 and total + sizes[first - 1] <= numel:
            first -= 1
            total += sizes[first]
        out.append((first, last))
        last = first
    return out[::-1]
