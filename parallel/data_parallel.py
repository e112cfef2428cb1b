"""Data parallelism with ZeRO stages 0-3, and HSDP (dp_replicate > 1).

What each stage keeps whole and what it shards over the dp_shard ranks (N):

    zero  parameters  gradients   optimizer states (AdamW exp_avg, exp_avg_sq)
    0     whole       whole       whole
    1     whole       whole       1/N
    2     whole       1/N         1/N
    3     1/N         1/N         1/N       (FSDP2 `fully_shard`)

Stages 0-2 are `ShardedAdamW` below: the trainable tensors are laid end to end in one
virtual flat vector (`FlatLayout`, padded to a multiple of N) and rank r owns the elements
[r*S, (r+1)*S), or, where gradients are reduced in buckets while backward runs, the r-th piece of
every bucket (parallel/grad_buckets.py). Its optimizer holds `nn.Parameter` views of exactly those elements, so states
exist only for them. We write this ourselves because torch's ZeroRedundancyOptimizer assigns
whole parameters to ranks (uneven shares, far from 1/N on small models) and has no gradient
sharding, and FSDP2 always shards parameters too. Stage 3 is FSDP2, applied to the model by
`parallelize` (parallel/parallelize.py), with `FSDPAdamW` (parallel/fsdp_adamw.py): the optimizers only optimize.

Gradient accumulation: stages 0 and 1 accumulate whole local gradients and reduce once per
step (all-reduce). Stage 2 reduce-scatters every micro-batch's gradients into its 1/N gradient
shard and frees the whole gradients, so it never holds more than one micro-batch of whole gradients.
Both reduce bucket by bucket during the backward where the layout allows (no TP, no pipeline).
Stage 3 (FSDP2) likewise reduce-scatters each micro-batch into sharded gradients. With HSDP the
shards are additionally all-reduced across the dp_replicate replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.adamw import STATE_KEYS, adamw, decays, load_local
from parallel.comms import watch
from parallel.config import TrainConfig
from parallel.flat_layout import FlatLayout, _local
from parallel.fsdp_adamw import FSDPAdamW
from parallel.grad_buckets import DEFAULT_CAP_BYTES, GradBuckets
from parallel.tensor_parallel import is_tp_sharded


def _like_param(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Give a local tensor the parameter's distributed layout (for checkpoints)."""
    if isinstance(param, DTensor):
        return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False)
    return t


@dataclass
class _Slot:
    view: nn.Parameter  # what the optimizer updates: a view sharing the model parameter's storage
    param: nn.Parameter  # the model's parameter
    in_param: slice  # which elements of the parameter's flattened local tensor
    in_shard: slice  # where they sit inside this rank's shard
    weight: float  # 1, or 1/tp for tp-replicated tensors (counted once in the norm)


class ShardedAdamW:
    """AdamW over the elements this rank owns (ZeRO 0-2), with global-norm clipping. The stage's
    gradient handling is chosen once, in the constructor: stages 0-1 all-reduce whole gradients after
    the last micro-batch; stage 2 reduce-scatters each micro-batch's into a 1/N shard."""

    def __init__(
        self,
        params: list[nn.Parameter],
        zero: int,
        shard_group: dist.ProcessGroup | None,
        replicate_groups: list[dist.ProcessGroup],
        norm_groups: list[dist.ProcessGroup],
        tp: int,
        train: TrainConfig,
        overlap: bool = False,
        bucket_bytes: int = DEFAULT_CAP_BYTES,
        grad_divisor: int | None = None,
    ) -> None:
        # Gradients are averaged over the shard group and every replicate group (dp_replicate,
        # and cp, whose ranks see different tokens of the same samples). `grad_divisor` replaces the
        # count of those ranks where the gradients hold more ranks' tokens than that: an expert's
        # gradient already sums the tokens of its whole ep group (parallel/expert_parallel.py).
        self.params, self.shard_group, self.replicate_groups = params, shard_group, replicate_groups
        self.norm_groups = norm_groups
        self.device = _local(params[0]).device
        n_shards = dist.get_world_size(shard_group) if shard_group is not None else 1
        self.dp = grad_divisor or n_shards * math.prod(dist.get_world_size(g) for g in replicate_groups)
        rank = dist.get_rank(shard_group) if shard_group is not None and zero >= 1 else 0
        two = zero == 2
        # Gradients reduced in buckets while backward runs (parallel/grad_buckets.py): stages 0-1
        # all-reduce over the first group that reduces (the others after), stage 2 reduce-scatters over
        # dp_shard. The caller allows it where backward is ours alone and the gradients plain tensors
        # (no pipeline schedule, no TP's DTensors). The buckets are the flat layout's segments.
        group = shard_group if two else next((g for g in [shard_group, *replicate_groups] if g is not None), None)
        bucketed = overlap and group is not None and not any(isinstance(q, DTensor) for q in params)
        cap = max(1, bucket_bytes // _local(params[0]).element_size()) if bucketed else None
        self.flat = FlatLayout(params, n_shards if zero >= 1 else 1, rank, cap)  # stage 0: one shard, all of it
        slots = [
            _Slot(nn.Parameter(_local(params[i]).detach().view(-1)[in_param]), params[i], in_param, in_shard,
                  1.0 if is_tp_sharded(params[i]) else 1.0 / tp)
            for i, in_param, in_shard in self.flat.owned()
        ]  # fmt: skip
        decay, no_decay = [s for s in slots if decays(s.param)], [s for s in slots if not decays(s.param)]
        self.slots = decay + no_decay
        self.opt = adamw([s.view for s in decay], [s.view for s in no_decay], train)
        self.grad_shard = torch.zeros(self.flat.shard_size, device=self.device) if two else None
        self._reduce = self._reduce_scatter if two else self._all_reduce
        self._owned_grads = self._shard_grads if two else self._param_grads
        self.buckets = GradBuckets(params, self.flat, group, scatter=two) if bucketed else None
        later = [g for g in [shard_group, *replicate_groups] if g is not None and g is not group]
        self._later_groups = [] if two else later  # stage 2 all-reduces its shard over the replicas in the update
        self.mutating = False  # inside the update: this rank's state is half old, half new

    # -- gradients -----------------------------------------------------------------
    def before_backward(self, last_microbatch: bool) -> None:
        """Arm the bucketed reduction: for the backward of the last micro-batch (stages 0-1), of every
        micro-batch (stage 2)."""
        if self.buckets is not None and (last_microbatch or self.grad_shard is not None):
            self.buckets.arm()

    def after_backward(self, last_microbatch: bool) -> None:
        """Reduce gradients over the data-parallel ranks when this stage does so."""
        self._reduce(last_microbatch)

    def _match_param_layout(self) -> None:
        # DTensor may hand back a gradient laid out unlike its parameter: under sequence
        # parallelism the norms' gradients are partial sums per tp rank, and the
        # vocab-parallel embedding's arrives replicated. We work on local tensors, so
        # bring each gradient to its parameter's layout first.
        for p in self.params:
            g = p.grad
            if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(g.device_mesh, p.placements)

    def _all_reduce(self, last_microbatch: bool) -> None:
        """Stages 0-1: after the last micro-batch, average the whole gradients over the dp ranks."""
        if not last_microbatch:
            return
        flat = self.buckets.finish() if self.buckets is not None else None
        bucketed = flat is not None  # reduced over the first group during backward: the rest are left
        if not bucketed:
            self._match_param_layout()
            if self.dp == 1:
                return
            flat = self.flat.pack([p.grad for p in self.params], self.device)
        for group in self._later_groups if bucketed else [self.shard_group, *self.replicate_groups]:
            if group is not None:
                with watch("dp", "all-reduce of gradients"):
                    dist.all_reduce(flat, group=group)
        flat /= self.dp
        for p, g in zip(self.params, self.flat.split(flat), strict=True):
            if p.grad is None:
                continue
            if bucketed:
                p.grad = g.view_as(p)  # the reduced values in place of the local ones, no copy
            else:
                _local(p.grad).view(-1).copy_(g)

    def _param_grads(self) -> list[torch.Tensor | None]:
        """Stages 0-1: the owned slices of the whole (reduced) gradients."""
        return [None if s.param.grad is None else _local(s.param.grad).view(-1)[s.in_param] for s in self.slots]

    def _reduce_scatter(self, last_microbatch: bool) -> None:
        """Stage 2: reduce-scatter each micro-batch's whole gradients into the running shard."""
        shard = self.buckets.finish() if self.buckets is not None else None
        if shard is not None:  # reduced bucket by bucket during backward
            self.grad_shard += shard
            return
        self._match_param_layout()
        flat = self.flat.pack([p.grad for p in self.params], self.device)  # (N*S,) this micro-batch's
        shard = torch.empty(self.flat.shard_size, device=self.device)
        if self.shard_group is not None:
            with watch("dp_shard", "reduce-scatter of gradients"):
                dist.reduce_scatter_single(shard, flat, group=self.shard_group)
        else:
            shard.copy_(flat[: self.flat.shard_size])
        self.grad_shard += shard
        for p in self.params:
            p.grad = None  # the whole gradients live only until the next micro-batch

    def _shard_grads(self) -> list[torch.Tensor]:
        """Stage 2: the gradient shard, averaged over the replicas, in slices."""
        for group in self.replicate_groups:
            with watch("dp_replicate/cp", "all-reduce of gradient shards"):
                dist.all_reduce(self.grad_shard, group=group)
        self.grad_shard /= self.dp
        return [self.grad_shard[s.in_shard] for s in self.slots]

    def grad_sq(self) -> torch.Tensor:
        """The squared L2 norm of the gradient of this optimizer's tensors, each element counted once
        (float64, summed over the norm groups)."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: no sync per slot
        for s in self.slots:
            if s.view.grad is not None:
                sq += s.view.grad.double().pow(2).sum() * s.weight
        with watch("tp/dp/pp", "all-reduce of the gradient norm"):
            for group in self.norm_groups:
                dist.all_reduce(sq, group=group)
        return sq

    # -- the update ------------------------------------------------------------------
    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0 = off), update owned elements, share them. Returns the norm (a tensor on
        the device: the trainer reads it with the loss, one wait for the device a step)."""
        self.take_grads()
        norm = self.grad_sq().sqrt().float()
        self.update(lr, max_norm, norm)
        return norm

    def take_grads(self) -> None:
        """Hand the optimizer this rank's reduced gradient elements (before grad_sq and update)."""
        for s, g in zip(self.slots, self._owned_grads(), strict=True):
            s.view.grad = g

    def update(self, lr: float, max_norm: float, norm: torch.Tensor) -> None:
        """Clip by the global `norm` to max_norm (0 = off), update the owned elements, share them."""
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for s in self.slots:
                if s.view.grad is not None:
                    s.view.grad.mul_(coef)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.mutating = True
        self.opt.step()
        if self.flat.n_shards > 1:
            self._gather_params()
        self.mutating = False

    @torch.no_grad()
    def _gather_params(self) -> None:
        owned = [_local(s.param).view(-1)[s.in_param] for s in self.slots]
        full = self._all_gather(self._shard_of(owned), "all-gather of updated parameters")
        for p, new in zip(self.params, self.flat.split(full), strict=True):
            _local(p).view(-1).copy_(new)

    def _shard_of(self, values: list[torch.Tensor | None]) -> torch.Tensor:
        """This rank's (S,) shard of the flat vector from one value per slot (zeros elsewhere)."""
        shard = torch.zeros(self.flat.shard_size, device=self.device)
        for s, t in zip(self.slots, values, strict=True):
            if t is not None:
                shard[s.in_shard] = t
        return shard

    def _all_gather(self, shard: torch.Tensor, action: str) -> torch.Tensor:
        """The whole (N*S,) flat vector from every rank's shard (the shard itself when N is 1)."""
        if self.flat.n_shards == 1:
            return shard
        full = torch.empty(self.flat.size, device=self.device)
        with watch("dp_shard", action):
            dist.all_gather_single(full, shard, group=self.shard_group)
        return self.flat.unshard(full)  # the shards in rank order, back in the layout's order

    # -- checkpoints: per-parameter states, laid out like the parameter --------------
    @torch.no_grad()
    def export_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """{id(param): {"exp_avg": t, "exp_avg_sq": t}}, each t whole on this rank's tp shard
        (a DTensor with the parameter's placements), gathered from the ZeRO pieces."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        if self.flat.n_shards == 1:
            # Every state is whole here: the live tensors, shaped like their parameters, no copy (as
            # FSDPAdamW's). A save writes them, or copies them before the next update changes them
            # (parallel.checkpoint: Checkpointer.before_update); copying 1.4 GB here took a second.
            for s in self.slots:
                st = self.opt.state.get(s.view, {})
                whole = _local(s.param)
                out[id(s.param)] = {
                    k: _like_param((st[k] if k in st else torch.zeros_like(s.view)).view_as(whole), s.param)
                    for k in STATE_KEYS
                }
            return out
        for key in STATE_KEYS:
            states = [self.opt.state[s.view][key] if s.view in self.opt.state else None for s in self.slots]
            full = self._all_gather(self._shard_of(states), f"all-gather of optimizer states ({key})")
            for p, t in zip(self.params, self.flat.split(full), strict=True):
                out.setdefault(id(p), {})[key] = _like_param(t.view_as(_local(p)).clone(), p)
        return out

    @torch.no_grad()
    def import_states(self, states: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        """Inverse of export_states: keep this rank's pieces of each state."""
        for s in self.slots:
            st = states[id(s.param)]
            whole = s.in_param.stop - s.in_param.start == _local(s.param).numel()
            pieces = {key: _local(st[key]).reshape(-1)[s.in_param] for key in STATE_KEYS}
            # A piece is copied out; a whole state (stage 0) is taken as it is, no copy.
            self.opt.state[s.view] = {"step": torch.tensor(float(step))} | {
                key: t if whole else t.clone() for key, t in pieces.items()
            }

    @property
    def n_owners(self) -> int:
        """How many tensors the AdamW states are kept for (two states each)."""
        return len(self.slots)

    def local_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(this rank's parameter tensors, its AdamW states), local pieces in a fixed order: what a
        replica of this rank holds the same of (`parallel.peer`)."""
        states = [self.opt.state[s.view][k] for s in self.slots if s.view in self.opt.state for k in STATE_KEYS]
        return [_local(p) for p in self.params], states

    def load_local(self, params: list[torch.Tensor], states: list[torch.Tensor], step: int) -> None:
        """Inverse of local_tensors (copied in; states only when there are any)."""
        load_local(self.opt, self.params, [s.view for s in self.slots], params, states, step, lambda _, t: t.clone())

    def close(self) -> None:
        """Take the gradient hooks off the parameters (GradBuckets holds the process group)."""
        if self.buckets is not None:
            self.buckets.remove()
            self.buckets = None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for s in self.slots:
            s.view.grad = None
        if self.grad_shard is not None:
            self.grad_shard.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        return [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]

    def grad_tensors(self) -> list[torch.Tensor]:
        grads = [_local(p.grad) for p in self.params if p.grad is not None]
        if self.buckets is not None:  # whole gradients copied into bucket buffers, until their reduction ends
            grads += [b.buf for b in self.buckets.buckets if b.buf is not None]
        return grads + ([self.grad_shard] if self.grad_shard is not None else [])


DataParallelOptimizer = ShardedAdamW | FSDPAdamW
