"""Pipeline parallelism on `torch.distributed.pipelining`.

The model is cut into pp * pp_virtual stages of consecutive layers, as evenly as
possible (earlier stages take the remainder). The first stage owns the token
embedding; the last owns the final norm, the output head and the loss. Each
stage is a `Transformer` with the other parts deleted, so parameter names (and
therefore the seeded initial weights) are those of the whole model.

Which stages a pp rank holds: one (gpipe, 1f1b); pp_virtual in loop order
r, r+pp, ... (interleaved_1f1b); or two in V order r and 2*pp-1-r (zbv), so the
first and last stage share rank 0.

The schedule splits the rank's batch into `microbatches` and scales gradients
by 1/microbatches once at the end, so the result is the mean over micro-batches
exactly as gradient accumulation in one process gives. Data-parallel reduction
happens after the schedule, once per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
    _PipelineSchedule,
)

from parallel.config import Config, ModelConfig, ParallelConfig
from parallel.model import Transformer
from parallel.moe import moe_layers
from parallel.pipeline_schedules import Schedule1F1BEagerSends

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1BEagerSends,  # torch's 1F1B, its sends not waited for before receives (gloo)
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zbv": ScheduleZBVZeroBubble,
}


def stage_ids(pp_rank: int, p: ParallelConfig) -> list[int]:
    """The global stage indices this pp rank holds, in execution order ([0] without pipelining)."""
    return p.stage_ids(pp_rank)


def layer_ranges(n_layers: int, n_stages: int) -> list[range]:
    """Consecutive layer indices per stage, as even as possible."""
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        size = base + (1 if s < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


def build_stage_model(cfg: ModelConfig, stage: int, n_stages: int, max_seq_len: int) -> Transformer:
    """The whole model (on the current default device) with everything outside `stage` deleted."""
    model = Transformer(cfg, max_seq_len=max_seq_len)
    keep = layer_ranges(cfg.n_layers, n_stages)[stage]
    for key in list(model.layers.keys()):
        if int(key) not in keep:
            del model.layers[key]
    if stage != 0:
        model.tok_embeddings = None
    if stage != n_stages - 1:
        model.norm = None
        model.output = None
    return model


class Pipeline:
    """This rank's pipeline stages and the schedule that drives them."""

    def __init__(
        self,
        cfg: Config,
        parts: list[Transformer],
        ids: list[int],
        pp_group: torch.distributed.ProcessGroup,
        device: torch.device,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        p = cfg.parallel
        self.n_stages = p.stages
        self.stages = [
            PipelineStage(m, i, self.n_stages, device, group=pp_group) for m, i in zip(parts, ids, strict=True)
        ]
        self.has_first = 0 in ids
        self.has_last = self.n_stages - 1 in ids
        n_micro = p.microbatches or cfg.grad_accum
        cls = SCHEDULES[p.pp_schedule]
        multi = p.pp_schedule in ("interleaved_1f1b", "zbv")  # these take a list of stages
        self.schedule: _PipelineSchedule = cls(
            self.stages if multi else self.stages[0], n_microbatches=n_micro, loss_fn=loss_fn
        )
        self.action, self.transfer = "starting the schedule", "none"
        self.busy_s = 0.0  # time spent computing (not waiting), for bubble measurements
        for stage in self.stages:
            _track(stage, self)
            _uncounted_inference(stage)

    def describe(self) -> str:
        """What this rank's pipeline was doing last (named in timeout errors). Transfers are
        posted, then waited for later, so the last one posted is named beside the action."""
        return f"pipeline {self.action} (last transfer posted: {self.transfer})"

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward over all micro-batches; returns this rank's summed
        micro-batch losses divided by their count (0 on ranks without the last stage)."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        target = labels if self.has_last else None
        self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        if not losses:
            return torch.zeros((), device=inputs.device)
        total = torch.stack([_plain(loss).detach() for loss in losses]).sum()
        return total / len(losses)


_ACTIONS = {
    "get_fwd_recv_ops": "stage {s}: receiving activations of micro-batch {mb} from stage {prev}",
    "get_fwd_send_ops": "stage {s}: sending activations of micro-batch {mb} to stage {next}",
    "get_bwd_recv_ops": "stage {s}: receiving gradients of micro-batch {mb} from stage {next}",
    "get_bwd_send_ops": "stage {s}: sending gradients of micro-batch {mb} to stage {prev}",
    "forward_one_chunk": "stage {s}: forward of micro-batch {mb}",
    "backward_one_chunk": "stage {s}: backward of micro-batch {mb}",
    "backward_weight_one_chunk": "stage {s}: weight gradients of micro-batch {mb}",
}


def _track(stage: PipelineStage, pipeline: Pipeline) -> None:
    """Record each action of `stage` on `pipeline.action` before it runs (for timeout errors)."""
    s = stage.stage_index
    for name, template in _ACTIONS.items():
        method = getattr(stage, name)

        def tracked(mb: int, *args, _m=method, _t=template, _n=name, **kwargs):  # noqa: ANN002, ANN003, ANN202
            text = _t.format(s=s, mb=mb, prev=s - 1, next=s + 1)
            if _n.startswith("get_"):
                ops = _m(mb, *args, **kwargs)
                if ops:
                    pipeline.transfer = text
                return ops
            pipeline.action = text
            start = time.perf_counter()
            try:
                return _m(mb, *args, **kwargs)
            finally:
                pipeline.busy_s += time.perf_counter() - start

        setattr(stage, name, tracked)


def _uncounted_inference(stage: PipelineStage) -> None:
    """torch runs each stage's forward once on its first call to infer the shapes it sends (on the
    first micro-batch, or on uninitialised tensors after the first stage): the MoE blocks must not
    count that forward in the step's router statistics."""
    infer = getattr(stage, "_forward_metadata_inference", None)
    if infer is None:
        return
    layers = moe_layers(stage.submod)

    def uncounted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for m in layers:
            m.counting = False
        try:
            return infer(*args, **kwargs)
        finally:
            for m in layers:
                m.counting = True

    stage._forward_metadata_inference = uncounted


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t
