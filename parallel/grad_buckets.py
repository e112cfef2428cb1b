"""Gradient reduction overlapped with backward, in buckets, for ZeRO stages 0-2 (`ShardedAdamW`).

Backward produces gradients from the last layer to the first. Instead of reducing them all after
backward returns, each parameter's post-accumulate-grad hook marks it ready; when every parameter of
a bucket (a segment of the flat layout, `FlatLayout(segment_numel=...)`: a run of consecutive
parameters about `parallel.bucket_mb` big, taken from the end) is ready, the bucket's gradients are
copied into a flat buffer and its collective starts asynchronously, while backward goes on with the
layers before. `finish` waits for them.

- Stages 0-1 all-reduce each bucket over the first data-parallel group, armed for the last
  micro-batch only: earlier ones accumulate locally (DDP's `no_sync`). The buffer is kept from step to
  step and the reduced values become the gradients, as views.
- Stage 2 reduce-scatters each bucket into this rank's piece of it, after every micro-batch (stage 2
  never holds more than one micro-batch of whole gradients). The layout gives each rank the r-th
  piece of every segment, so a bucket's reduce-scatter lands exactly in the shard; a bucket's whole
  gradients are dropped as soon as they are copied out, and the buffers when every bucket's
  collective is done (`finish`): the peak is the whole gradients once, as without buckets.

Buckets start in one fixed order on every rank (bucket k only after k-1), so the collectives match
even where ranks finish their buckets in another order. A bucket whose parameters got no gradient
(unused in this forward) is sent by `finish`, zeros where gradients are missing.

Why ours and not DDP's reducer: ZeRO 1-2 keep 1/N of the optimizer states and stage 2 1/N of the
gradients, which DDP (whole everything) cannot express; DDP's comm hooks still reduce whole buckets
on every rank. FSDP2 does this for stage 3, where parameters are sharded too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from parallel.comms import watch
from parallel.flat_layout import FlatLayout, Segment

DEFAULT_CAP_BYTES = 4 * 2**20


@dataclass
class _Bucket:
    seg: Segment
    ready: set[int] = field(default_factory=set)
    work: dist.Work | None = None
    buf: torch.Tensor | None = None  # stage 2: the bucket's gradients until its reduce-scatter is done


class GradBuckets:
    """Bucketed, overlapped reduction of the parameters' gradients (see the module docstring): an
    all-reduce of each bucket, or with `scatter` a reduce-scatter into this rank's shard."""

    def __init__(
        self, params: list[nn.Parameter], flat: FlatLayout, group: dist.ProcessGroup, scatter: bool = False
    ) -> None:
        self.params, self.flat, self.group, self.scatter = params, flat, group, scatter
        self.device = params[0].device
        self.buckets = [_Bucket(seg) for seg in reversed(flat.segments)]  # backward's order
        self.bucket_of = {i: b for b in self.buckets for i in range(b.seg.first, b.seg.last)}
        # Stages 0-1: the flat vector of the gradients, kept from step to step: a fresh one each step
        # cost a fill and the page faults of first touch (37 ms a step for the debug preset on CPU).
        # Its values are the reduced gradients (views) until the optimizer has stepped. Stage 2: this
        # rank's (S,) shard of each micro-batch's reduced gradients.
        self._out = (
            torch.empty(flat.shard_size, device=self.device) if scatter else torch.zeros(flat.size, device=self.device)
        )
        self.armed = False
        self.next = 0  # the next bucket to start
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    def arm(self) -> None:
        """Reduce during the coming backward (the gradients of the step before must be done with)."""
        self.armed, self.next = True, 0
        for b in self.buckets:
            b.ready.clear()
            b.work = None

    def _hook(self, i: int):  # noqa: ANN202
        def hook(_: torch.Tensor) -> None:
            if not self.armed:
                return
            self.bucket_of[i].ready.add(i)
            while self.next < len(self.buckets):
                b = self.buckets[self.next]
                if len(b.ready) < b.seg.last - b.seg.first:
                    return
                self._start(b)
                self.next += 1

        return hook

    def _start(self, b: _Bucket) -> None:
        """Copy the bucket's gradients into its buffer and start its reduction."""
        seg = b.seg
        buf = torch.empty(seg.hi - seg.lo, device=self.device) if self.scatter else self._out[seg.lo : seg.hi]
        buf[self.flat.spans[seg.last - 1][1] - seg.lo :] = 0.0  # the padding (zeros in the kept vector already)
        for i in range(seg.first, seg.last):
            p, (lo, hi) = self.params[i], self.flat.spans[i]
            dst = buf[lo - seg.lo : hi - seg.lo]
            if p.grad is None:
                dst.zero_()  # no gradient this step
            elif p.grad.data_ptr() != dst.data_ptr():  # not already our view
                dst.copy_(p.grad.reshape(-1))
            if self.scatter:
                p.grad = None  # copied out: the whole gradient is not needed again
        if self.scatter:
            b.buf = buf
            out = self._out[seg.at : seg.at + seg.piece]
            b.work = dist.reduce_scatter_single(out, buf, group=self.group, async_op=True)
        else:
            b.work = dist.all_reduce(buf, group=self.group, async_op=True)

    def finish(self) -> torch.Tensor | None:
        """After backward: start what is left, wait for everything. Returns the flat vector of the
        gradients summed over the group (stages 0-1) or this rank's shard of it (stage 2); None when
        the backward was not armed."""
        if not self.armed:
            return None
        for b in self.buckets[self.next :]:
            self._start(b)  # buckets with a parameter that got no gradient
        self.armed = False
        with watch(
            *(("dp_shard", "reduce-scatter of gradients") if self.scatter else ("dp", "all-reduce of gradients"))
        ):
            for b in self.buckets:
                if b.work is not None:
                    b.work.wait()
                b.work, b.buf = None, None
        return self._out

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
