"""Gradient all-reduce overlapped with backward, in buckets, for ZeRO stages 0-1 (`ShardedAdamW`).

Backward produces gradients from the last layer to the first. Instead of reducing them all after
backward returns, each parameter's post-accumulate-grad hook marks it ready; when every parameter of
a bucket (a run of consecutive parameters of the flat vector, `FlatLayout`, about `cap_bytes` big,
taken from the end) is ready, the bucket's gradients are copied into its part of one flat buffer and
its all-reduce over the first data-parallel group starts asynchronously, while backward goes on with
the layers before. `finish` waits for them. Armed for the last micro-batch only: earlier ones
accumulate locally (DDP's `no_sync`).

Stage 2 is not here yet: it reduce-scatters each micro-batch's gradients after that backward
(`ShardedAdamW._reduce_scatter`). Reducing each bucket's pieces to their owners (`dist.reduce`) was
right but aborted a gloo process at exit about one run in ten (torch 2.13); a reduce-scatter per
bucket needs the shards laid out bucket by bucket (each rank 1/N of every bucket), as FSDP does.

Buckets start in one fixed order on every rank (bucket k only after k-1), so the collectives match
even where ranks finish their buckets in another order. A bucket whose parameters got no gradient
(unused in this forward) is sent by `finish`, zeros where gradients are missing.

Why ours and not DDP's reducer: ZeRO 1-2 keep 1/N of the optimizer states and stage 2 1/N of the
gradients, which DDP (whole everything) cannot express; DDP's comm hooks still reduce whole buckets
on every rank. This is the same idea, on our flat layout, feeding ZeRO-1's sharded update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallel.comms import watch
from parallel.flat_layout import FlatLayout

DEFAULT_CAP_BYTES = 4 * 2**20


@dataclass
class _Bucket:
    first: int  # parameters [first, last) of the flat layout
    last: int
    lo: int  # their span [lo, hi) of the flat vector
    hi: int
    ready: set[int] = field(default_factory=set)
    work: dist.Work | None = None


class GradBuckets:
    """Bucketed, overlapped reduction of the parameters' gradients (see the module docstring)."""

    def __init__(
        self, params: list[nn.Parameter], flat: FlatLayout, group: dist.ProcessGroup,
        cap_bytes: int = DEFAULT_CAP_BYTES,
    ) -> None:  # fmt: skip
        self.params, self.flat, self.group = params, flat, group
        self.device = params[0].device
        cap = max(1, cap_bytes // params[0].element_size())
        self.buckets: list[_Bucket] = []
        last = len(params)
        while last > 0:  # from the end: backward's order
            first = last - 1
            while first > 0 and flat.spans[last - 1][1] - flat.spans[first - 1][0] <= cap:
                first -= 1
            self.buckets.append(_Bucket(first, last, flat.spans[first][0], flat.spans[last - 1][1]))
            last = first
        self.bucket_of = {i: b for b in self.buckets for i in range(b.first, b.last)}
        # The flat vector of the gradients, kept from step to step: a fresh one each step cost a
        # fill and the page faults of first touch (37 ms a step for the debug preset on CPU). Its
        # values are the reduced gradients (views) until the optimizer has stepped.
        self._flat = torch.zeros(flat.size, device=self.device)
        self.buf: torch.Tensor | None = None  # the flat vector, while a backward is armed
        self.next = 0  # the next bucket to start
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def arm(self) -> None:
        """Reduce during the coming backward (the gradients of the step before must be done with)."""
        self.buf, self.next = self._flat, 0
        for b in self.buckets:
            b.ready.clear()
            b.work = None

    def _hook(self, i: int):  # noqa: ANN202
        def hook(_: torch.Tensor) -> None:
            if self.buf is None:
                return
            self.bucket_of[i].ready.add(i)
            while self.next < len(self.buckets):
                b = self.buckets[self.next]
                if len(b.ready) < b.last - b.first:
                    return
                self._start(b)
                self.next += 1

        return hook

    def _start(self, b: _Bucket) -> None:
        """Copy the bucket's gradients into the flat buffer and start its reduction."""
        assert self.buf is not None
        for i in range(b.first, b.last):
            p, (lo, hi) = self.params[i], self.flat.spans[i]
            if p.grad is None:
                self.buf[lo:hi] = 0.0  # no gradient this step
            elif p.grad.data_ptr() != self.buf[lo:hi].data_ptr():  # not already our view
                self.buf[lo:hi] = p.grad.reshape(-1)
        b.work = dist.all_reduce(self.buf[b.lo : b.hi], group=self.group, async_op=True)

    def finish(self) -> torch.Tensor | None:
        """After backward: start what is left, wait for everything. Returns the flat vector of the
        gradients summed over the group, or None when the backward was not armed."""
        buf = self.buf
        if buf is None:
            return None
        for b in self.buckets[self.next :]:
            self._start(b)  # buckets with a parameter that got no gradient
        self.buf = None
        with watch("dp", "all-reduce of gradients"):
            for b in self.buckets:
                if b.work is not None:
                    b.work.wait()
                b.work = None
        return buf

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
