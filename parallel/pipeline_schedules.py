"""1F1B whose sends never hold up the receives and the compute behind them.

torch's `Schedule1F1B` pairs each send with the next receive in one batch and waits for both:
the forward send of micro-batch k with the backward receive of micro-batch j, the backward send
with the next forward receive, and it waits for each warm-up send before the next. On NCCL that
pairing is needed (a send blocks its stream until the peer posts the matching receive, so
unpaired sends and receives between two ranks can deadlock) and a wait only orders streams. On
gloo a wait blocks the host thread: the rank cannot start its backward until the activations it
sent have been taken by the next stage, which it does not need.

`Schedule1F1BEagerSends` runs the same order of compute, but on backends that do not coalesce
(gloo) posts each send on its own and waits only for receives; the sends are waited for once, at
the end of the step (each holds its tensor until then, as the stage does anyway). Where the
backend coalesces (NCCL) it runs torch's loop unchanged. We write this loop because torch has no
switch for it; it uses the same stage methods torch's own 1F1B loop does.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.pipelining.schedules import Schedule1F1B


def _post(ops: list[dist.P2POp]) -> list[dist.Work]:
    """Start each operation on its own (no coalescing): one Work per operation."""
    works = []
    for op in ops:
        peer = {"group_dst" if op.op is dist.isend else "group_src": op.group_peer}
        work = op.op(op.tensor, group=op.group, tag=op.tag, **peer)
        if work is not None:
            works.append(work)
    return works


def _wait(works: list[dist.Work]) -> None:
    for work in works:
        work.wait()


class Schedule1F1BEagerSends(Schedule1F1B):
    """torch's 1F1B, with sends that are not waited for until the step ends (where the backend
    lets a send and a receive go separately)."""

    def _step_microbatches(
        self,
        arg_mbs: list | None = None,
        kwarg_mbs: list | None = None,
        target_mbs: list | None = None,
        losses: list | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        stage = self._stage
        group = stage.group
        if group is None or getattr(group._get_backend(stage.device), "supports_coalescing", False):
            return super()._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs, loss_kwargs)
        arg_mbs, kwarg_mbs = self._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        self._initialize_stage(arg_mbs[0], kwarg_mbs[0], target_mbs[0] if target_mbs else None, loss_kwargs)
        n = self._n_microbatches
        warmup = min(n, self._num_stages - stage.stage_index)  # forwards before the first backward
        sends: list[dist.Work] = []

        def forward(mb: int) -> None:
            _wait(_post(stage.get_fwd_recv_ops(mb)))
            output = stage.forward_one_chunk(mb, arg_mbs[mb], kwarg_mbs[mb], save_forward_output=return_outputs)
            sends.extend(_post(stage.get_fwd_send_ops(mb)))
            self._maybe_compute_loss(stage, output, target_mbs, mb, loss_kwargs)

        def backward(mb: int) -> None:
            _wait(_post(stage.get_bwd_recv_ops(mb)))
            stage.backward_one_chunk(mb, loss=self._maybe_get_loss(stage, mb), last_backward=mb == n - 1)
            sends.extend(_post(stage.get_bwd_send_ops(mb)))

        for mb in range(warmup):
            forward(mb)
        for mb in range(n):  # one backward, then the next forward while there is one
            backward(mb)
            if mb + warmup < n:
                forward(mb + warmup)
        _wait(sends)
        self._update_losses(stage, losses)
        stage.perform_reduce_grad(n if self.scale_grads else 1)  # gradients of the mean over micro-batches
