"""Where each trainable tensor's local elements sit in one virtual flat vector: the bookkeeping ZeRO
stages 0-2 (`parallel.data_parallel.ShardedAdamW`) shard the optimizer states and gradients by."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class FlatLayout:
    """Where each trainable tensor's local elements sit in one virtual flat vector: end to end in
    model order, padded to n_shards * shard_size, of which rank r owns [r*S, (r+1)*S)."""

    def __init__(self, params: list[nn.Parameter], n_shards: int, rank: int) -> None:
        ends = list(itertools.accumulate(_local(p).numel() for p in params))
        self.spans = list(zip([0, *ends[:-1]], ends, strict=True))  # [a, b) of each parameter
        self.n_shards = n_shards
        self.shard_size = math.ceil(ends[-1] / n_shards)
        self.size = self.shard_size * n_shards
        self.lo = rank * self.shard_size

    def owned(self) -> Iterator[tuple[int, slice, slice]]:
        """(i, in_param, in_shard) for each parameter i with elements in this rank's shard: which of
        its flattened local elements those are, and where they sit in the shard."""
        hi = self.lo + self.shard_size
        for i, (a, b) in enumerate(self.spans):
            lo, up = max(self.lo, a), min(hi, b)
            if lo < up:
                yield i, slice(lo - a, up - a), slice(lo - self.lo, up - self.lo)

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
