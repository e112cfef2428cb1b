"""ZeRO-3: torch's AdamW on the parameter shards FSDP2 made (`parallel.parallelize.apply_fsdp`). FSDP2
gathers, reduce-scatters and (under HSDP) all-reduces in its own hooks; this optimizer only averages over
the context-parallel ranks, computes the global gradient norm and steps."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.adamw import STATE_KEYS, adamw, decays, load_local
from parallel.comms import watch
from parallel.config import TrainConfig
from parallel.flat_layout import _local


class FSDPAdamW:
    """ZeRO-3: torch AdamW on the shards of a model `apply_fsdp` has sharded."""

    def __init__(
        self,
        params: list[nn.Parameter],
        cp_group: dist.ProcessGroup | None,
        norm_groups: list[dist.ProcessGroup],
        train: TrainConfig,
    ) -> None:
        self.params, self.cp_group, self.norm_groups = params, cp_group, norm_groups
        decay, no_decay = [p for p in params if decays(p)], [p for p in params if not decays(p)]
        self.opt = adamw(decay, no_decay, train)
        self.mutating = False

    def before_backward(self, last_microbatch: bool) -> None:
        """FSDP2 reduces in its own backward hooks."""

    def after_backward(self, last_microbatch: bool) -> None:
        """FSDP2 has already reduce-scattered each micro-batch's gradients over dp in its
        backward hooks; context-parallel ranks saw different tokens, so average over cp."""
        if self.cp_group is None or not last_microbatch:
            return
        n = dist.get_world_size(self.cp_group)
        with watch("cp", "all-reduce of gradient shards"):
            for p in self.params:
                if p.grad is not None:
                    local = _local(p.grad)
                    dist.all_reduce(local, group=self.cp_group)
                    local /= n

    def grad_sq(self) -> torch.Tensor:
        """The squared L2 norm of the gradient of this optimizer's tensors (float64)."""
        sq = torch.zeros((), dtype=torch.float64, device=_local(self.params[0]).device)
        for grads in _by_mesh([p.grad for p in self.params if p.grad is not None]):
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
            if isinstance(norm, DTensor):
                norm = norm.full_tensor()  # sums the squares over the dp and tp (and ep) shards
            sq += norm.double() ** 2
        with watch("pp", "all-reduce of the gradient norm"):
            for group in self.norm_groups:  # axes FSDP does not know about (pipeline stages)
                dist.all_reduce(sq, group=group)
        return sq

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        norm = self.grad_sq().sqrt().float()
        self.update(lr, max_norm, norm)
        return norm

    def take_grads(self) -> None:
        """FSDP2's gradients are already this rank's shards."""

    def update(self, lr: float, max_norm: float, norm: torch.Tensor) -> None:
        if max_norm > 0:
            for params in _by_mesh(self.params):
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.mutating = True
        self.opt.step()
        self.mutating = False

    def export_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return {id(p): {k: self.opt.state[p][k] for k in STATE_KEYS} for p in self.params if p in self.opt.state}

    def import_states(self, states: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        for p in self.params:
            self.opt.state[p] = {"step": torch.tensor(float(step))} | {k: states[id(p)][k] for k in STATE_KEYS}

    @property
    def n_owners(self) -> int:
        return len(self.params)

    def local_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the local shards of the parameters, of their AdamW states), as ShardedAdamW's."""
        states = [_local(self.opt.state[p][k]) for p in self.params if p in self.opt.state for k in STATE_KEYS]
        return [_local(p) for p in self.params], states

    def load_local(self, params: list[torch.Tensor], states: list[torch.Tensor], step: int) -> None:
        load_local(self.opt, self.params, self.params, params, states, step, _state_like)

    def close(self) -> None:
        """Nothing to release: FSDP2's hooks stay with the model."""

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def state_tensors(self) -> list[torch.Tensor]:
        states = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0]
        return [_local(t) for t in states]

    def grad_tensors(self) -> list[torch.Tensor]:
        return [_local(p.grad) for p in self.params if p.grad is not None]


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The tensors grouped by the mesh they are sharded over (plain tensors together): torch's foreach
    norm and clipping take DTensors of one mesh at a time. Under TP the MoE blocks' routers and shared
    experts are sharded over dp only, the rest over (dp, tp), the experts over (edp, ep)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else None, []).append(t)
    return list(groups.values())


def _state_like(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """An AdamW state laid out like `param` (a DTensor shard under FSDP2) holding `local`."""
    state = torch.zeros_like(param)
    _local(state).copy_(local)
    return state
