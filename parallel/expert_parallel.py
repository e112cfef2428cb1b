"""Expert parallelism (ep): each rank holds n_experts / ep of every MoE block's experts, and tokens travel
to the rank of their expert and back with all-to-all.

Where ep sits in the mesh: it reuses ranks, it adds none. The dp_shard axis is split into (edp, ep), ep
fastest (`Layout.expert_mesh`), so an ep group is ep consecutive dp_shard ranks, which the Ray placement
keeps on one node when it fits. Attention, norms, embeddings and routers are data-parallel over all dp
ranks as before; the experts are sharded over ep, and the ranks that hold the same experts (edp, times
dp_replicate) are their data-parallel group: their gradients are reduced over those ranks only, and ZeRO
shards them over the edp ranks. tp, pp and cp ranks are untouched: each pipeline stage's MoE blocks
dispatch within the stage's own ep group.

The expert weights are DTensors sharded on dim 0 over the ep axis (`apply_ep`), so the model's
initialisation, the checkpoints (whole tensors under their names, parallel/checkpoint.py) and the
gradient-norm bookkeeping see one (n_experts, ...) tensor: a job saved at ep=4 loads at ep=2 or in one
process.

Dispatch (`_dispatch_forward`), inside `Experts.forward`: the MoE layer has already sorted its (token,
choice) pairs by expert, so the tokens for rank j are one contiguous slice. The ranks first exchange
their per-expert counts (an all-to-all of n_experts integers), then the tokens themselves with variable
split sizes; the received tokens, ordered by source rank and then expert, are regrouped by local expert,
run through the same per-expert SwiGLU as one process, put back in source order and returned by the
reverse all-to-all. Both all-to-alls are differentiable (torch's functional collective), so backward sends
the gradients along the same paths in reverse. The router, capacity and auxiliary loss run before the
dispatch on each rank's own tokens, as in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from parallel.comms import watch
from parallel.data_parallel import DataParallelOptimizer
from parallel.flat_layout import _local
from parallel.moe import Experts, expert_mlps, moe_layers

WEIGHTS = ("w1", "w3", "w2")


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE block's experts over `ep_mesh` (dim 0 of the stacked weights) and route their
    forward through the all-to-all dispatch. Call before the weights are materialised (like apply_tp)."""
    group = ep_mesh.get_group()
    for moe in moe_layers(model):
        experts = moe.experts
        for name in WEIGHTS:
            whole = getattr(experts, name)
            local = distribute_tensor(whole.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(experts, name, nn.Parameter(local, requires_grad=whole.requires_grad))
        experts.forward = _dispatcher(experts, group)


def is_expert_param(name: str) -> bool:
    """Whether a parameter (by its name in the model) is an expert weight, sharded over ep."""
    return name.rsplit(".", 2)[-2:-1] == ["experts"] and name.rsplit(".", 1)[-1] in WEIGHTS


def _dispatcher(experts: Experts, group: dist.ProcessGroup):  # noqa: ANN202
    def forward(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _dispatch_forward(experts, group, x, counts)

    return forward


def _dispatch_forward(
    experts: Experts, group: dist.ProcessGroup, x: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """x (N, C): this rank's tokens sorted by expert, counts[e] of them for expert e (all n_experts) ->
    (N, C), each row its expert's output, computed on the rank that holds the expert."""
    ep = dist.get_world_size(group)
    n_local = counts.numel() // ep
    with watch("ep", "all-to-all of expert token counts"):
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=group)  # [src][local expert], n_local per source
    # One wait for the device each way: the sizes as Python lists, their sums taken here.
    sizes = received.view(ep, n_local).tolist()  # [source][local expert]
    mine = counts.view(ep, n_local).tolist()  # [destination][its expert]
    send = [sum(row) for row in mine]  # tokens to each rank of the group
    recv = [sum(row) for row in sizes]
    with watch("ep", "all-to-all of tokens to their experts"):
        got = all_to_all_single_autograd(x.contiguous(), recv, send, group)
    # Received in (source, expert) order; the experts want (expert, source).
    pieces = torch.split(got, [n for row in sizes for n in row])
    by_expert = torch.cat([pieces[s * n_local + e] for e in range(n_local) for s in range(ep)])
    per_expert = [sum(sizes[s][e] for s in range(ep)) for e in range(n_local)]
    w1, w3, w2 = (_local(getattr(experts, name)) for name in WEIGHTS)
    y = expert_mlps(by_expert, per_expert, w1, w3, w2)
    outs = torch.split(y, [sizes[s][e] for e in range(n_local) for s in range(ep)])
    by_source = torch.cat([outs[e * ep + s] for s in range(ep) for e in range(n_local)])
    with watch("ep", "all-to-all of expert outputs back to their tokens"):
        return all_to_all_single_autograd(by_source, send, recv, group)


class ExpertSplitOptimizer:
    """The optimizer of a model with expert parallelism: one data-parallel optimizer for the experts
    (reduced and ZeRO-sharded over the ranks holding the same experts) and one for everything else (over
    all dp ranks), stepped as one: the gradient norm clipped to is the whole model's."""

    def __init__(self, dense: DataParallelOptimizer, experts: DataParallelOptimizer) -> None:
        self.dense, self.experts = dense, experts
        self.parts = (dense, experts)

    @property
    def mutating(self) -> bool:
        return any(o.mutating for o in self.parts)

    def before_backward(self, last_microbatch: bool) -> None:
        for o in self.parts:
            o.before_backward(last_microbatch)

    def after_backward(self, last_microbatch: bool) -> None:
        for o in self.parts:
            o.after_backward(last_microbatch)

    def step(self, lr: float, max_norm: float) -> torch.Tensor:
        for o in self.parts:
            o.take_grads()
        norm = (self.dense.grad_sq() + self.experts.grad_sq()).sqrt().float()
        for o in self.parts:
            o.update(lr, max_norm, norm)
        return norm

    def export_states(self) -> dict[int, dict[str, torch.Tensor]]:
        return self.dense.export_states() | self.experts.export_states()

    def import_states(self, states: dict[int, dict[str, torch.Tensor]], step: int) -> None:
        for o in self.parts:
            o.import_states(states, step)

    def local_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The dense optimizer's parameters then the experts', and their states in the same order."""
        (p1, s1), (p2, s2) = (o.local_tensors() for o in self.parts)
        return p1 + p2, s1 + s2

    def load_local(self, params: list[torch.Tensor], states: list[torch.Tensor], step: int) -> None:
        n = len(self.dense.params)
        k = 2 * self.dense.n_owners if states else 0  # two AdamW states per tensor the optimizer owns
        self.dense.load_local(params[:n], states[:k], step)
        self.experts.load_local(params[n:], states[k:], step)

    def close(self) -> None:
        for o in self.parts:
            o.close()

    def zero_grad(self) -> None:
        for o in self.parts:
            o.zero_grad()

    def state_tensors(self) -> list[torch.Tensor]:
        return self.dense.state_tensors() + self.experts.state_tensors()

    def grad_tensors(self) -> list[torch.Tensor]:
        return self.dense.grad_tensors() + self.experts.grad_tensors()
