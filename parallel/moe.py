"""The mixture-of-experts MLP: a router picks top_k of n_experts SwiGLU experts per token.

One process, no parallel branches: expert parallelism (parallel/expert_parallel.py) shards `Experts` over
ranks and replaces its forward by an all-to-all around the same computation.

- Router: a linear map to n_experts logits, scores by softmax or sigmoid (`moe.score`). The experts
  are chosen by score + bias (`expert_bias`, a buffer moved by the auxiliary-loss-free update, 0 by
  default) and weighted by the scores alone, rescaled to sum to 1 per token with `moe.norm_topk`.
- Dispatch: the (token, choice) pairs are sorted by expert, so each expert's tokens are one
  contiguous slice and each expert runs one matmul per weight over all of its tokens (torch has a
  grouped GEMM only for CUDA bf16 yet). Outputs are weighted and summed back per token with
  `index_add_`.
- Capacity (`moe.capacity_factor`): per sequence an expert takes at most
  ceil(factor * seq_len * top_k / n_experts) tokens, first come first served in token order; the
  others are dropped (their share of the output is zero). Counting per sequence, not per batch, keeps
  which tokens drop independent of how sequences are spread over ranks and micro-batches.
- Load balancing: the auxiliary loss coef * n_experts * sum_e f_e * P_e (f_e: the share of the
  sequence's choices that went to e, P_e: e's mean normalised score over the sequence), averaged
  over sequences, again so that it does not depend on the layout. It enters training through
  `_AddAuxLoss`: the block's output is passed through unchanged in forward, and in backward the aux
  loss's gradient (times `aux_scale`, 1/micro-batches where the trainer divides its loss by them) is
  added. So every MoE block feeds its own aux loss to backward, also inside a pipeline stage.
- Statistics of the step (`stats`): tokens per expert, dropped choices, the aux loss summed over
  forwards; the trainer reads and resets them after each step.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel.moe_config import MoEConfig


class Experts(nn.Module):
    """n SwiGLU experts with their weights stacked: w1, w3 (E, F, C) and w2 (E, C, F)."""

    def __init__(self, n: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(n, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, hidden))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, C): tokens sorted by expert, counts[e] of them for expert e -> (N, C).
        (Expert parallelism replaces this forward: parallel/expert_parallel.py.)"""
        return expert_mlps(x, counts.tolist(), self.w1, self.w3, self.w2)


def expert_mlps(
    x: torch.Tensor, counts: list[int], w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """SwiGLU expert e (weights w1[e], w3[e], w2[e]) on its counts[e] consecutive rows of x: one matmul
    per weight and expert over all of the expert's tokens."""
    # An expert without tokens still runs (on 0 rows): its weights get a zero gradient rather than none,
    # so every rank holds gradients for the same tensors (ZeRO-3 reduces only those that have one).
    out = [(F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())) @ w2[e].t() for e, xe in enumerate(torch.split(x, counts))]
    return torch.cat(out)


class _AddAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward, `scale` as the gradient of `aux` (a scalar in the same graph)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class MoE(nn.Module):
    """Router, routed experts and optional shared experts; a drop-in for the block's FeedForward."""

    def __init__(self, dim: int, cfg: MoEConfig, shared: nn.Module | None = None) -> None:
        """`shared`: the dense SwiGLU of the shared experts (the model builds it), or None."""
        super().__init__()
        assert cfg.expert_ffn_dim is not None
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, dim, cfg.expert_ffn_dim)
        self.shared = shared
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        self.aux_scale = 1.0  # set by the trainer: 1/micro-batches where it divides the loss by them
        # Where this rank's tokens are only part of each sequence (context parallelism sets it): the
        # per-sequence capacity and aux loss then count the other ranks' parts too.
        self.sequence: SequenceParts | None = None
        self.counting = True  # off while a pipeline stage runs its shape-inference forward
        self.stats: dict[str, torch.Tensor] = {}
        self.reset_stats()

    def reset_stats(self) -> None:
        device = self.expert_bias.device
        self.stats = {
            "tokens": torch.zeros(self.cfg.n_experts, device=device),  # choices per expert (kept or not)
            "dropped": torch.zeros((), device=device),
            "aux_loss": torch.zeros((), device=device),  # summed over forwards
            "forwards": torch.zeros((), device=device),
        }

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> (chosen experts (B, T, k), their weights (B, T, k), normalised scores (B, T, E))."""
        logits = self.router(x).float()
        scores = logits.softmax(-1) if self.cfg.score == "softmax" else logits.sigmoid()
        chosen = torch.topk(scores.detach() + self.expert_bias, self.cfg.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if self.cfg.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        probs = scores if self.cfg.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        return chosen, weights, probs

    def keep_mask(self, chosen: torch.Tensor) -> torch.Tensor | None:
        """(B, T, k) bool: which choices fit their expert's per-sequence capacity (None: dropless)."""
        if self.cfg.capacity_factor is None:
            return None
        B, T, k = chosen.shape
        E, seq = self.cfg.n_experts, self.sequence
        whole = T * (seq.ranks if seq else 1)  # the sequence's length
        capacity = math.ceil(self.cfg.capacity_factor * whole * k / E)
        n = seq.chunks if seq else 1  # runs of consecutive tokens this rank holds, in sequence order
        onehot = F.one_hot(chosen.reshape(B, n, T * k // n), E)  # (B, chunk, choices, E), token order
        before = seq.earlier(onehot.sum(2)) if seq else 0  # (B, chunk, E): choices in earlier chunks
        position = onehot.cumsum(2) - 1 + (before.unsqueeze(2) if seq else 0)
        position = position.view(B, T * k, E).gather(-1, chosen.reshape(B, T * k, 1)).squeeze(-1)
        return (position < capacity).view(B, T, k)

    def aux_loss(self, chosen: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """coef * E * sum_e f_e P_e per sequence, averaged over sequences."""
        B, T, k = chosen.shape
        E, seq = self.cfg.n_experts, self.sequence
        counts = F.one_hot(chosen.reshape(B, T * k), E).float().sum(1)  # (B, E): choices per expert
        scores = probs.sum(1)  # (B, E)
        if seq:  # the whole sequence's sums (differentiable in the scores)
            counts, scores, T = seq.total(counts), seq.total(scores), T * seq.ranks
        f, P = counts / (T * k), scores / T  # the share of the choices, the mean normalised score
        return self.cfg.aux_loss_coef * E * (f * P).sum(-1).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        chosen, weights, probs = self.route(x)
        keep = self.keep_mask(chosen)
        if keep is not None:
            weights = weights * keep
        flat_expert = chosen.reshape(-1)  # (B*T*k,)
        order = torch.argsort(flat_expert, stable=True)
        if keep is not None:  # dropped choices leave the computation
            order = order[keep.reshape(-1)[order]]
        routed = torch.bincount(flat_expert, minlength=self.cfg.n_experts)  # choices per expert, dropped or not
        counts = routed if keep is None else torch.bincount(flat_expert[order], minlength=self.cfg.n_experts)
        token = order // self.cfg.top_k  # which of the B*T tokens each sorted choice belongs to
        tokens = x.reshape(B * T, C)
        y = self.experts(tokens[token], counts)
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros_like(tokens).index_add_(0, token, y.to(tokens.dtype)).view(B, T, C)
        if self.shared is not None:
            out = out + self.shared(x)
        # Activation checkpointing runs this forward again inside backward: count the step once.
        # (torch has no public "am I recomputing"; inside backward the graph task id is not -1.)
        first = self.counting and torch._C._current_graph_task_id() == -1
        if first:
            with torch.no_grad():
                self.stats["tokens"] += routed
                if keep is not None:
                    self.stats["dropped"] += (~keep).sum()
                self.stats["forwards"] += 1
        if self.cfg.aux_loss_coef > 0 and torch.is_grad_enabled():
            aux = self.aux_loss(chosen, probs)
            if first:
                self.stats["aux_loss"] += aux.detach()
            out = _AddAuxLoss.apply(out, aux, self.aux_scale)
        return out


class SequenceParts(Protocol):
    """How a rank's tokens sit in their sequences when the sequence is split over ranks
    (`parallel.context_parallel.SequenceShards`)."""

    ranks: int  # ranks sharing each sequence, equal parts
    chunks: int  # runs of consecutive tokens this rank holds, in its tokens' order

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks (differentiable)."""
        ...

    def earlier(self, counts: torch.Tensor) -> torch.Tensor:
        """(B, chunks, E) counts of this rank's chunks -> the counts summed over every chunk of the
        sequence (on any rank) that comes before each of them."""
        ...


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


class RouterStats:
    """This rank's MoE blocks, seen from the trainer: their aux-loss scale, their statistics of the step
    summed over the ranks, and the auxiliary-loss-free bias update. Every rank of a model with experts
    calls `step` once per step (it runs collectives), with MoE blocks of its own or none."""

    def __init__(
        self, parts: list[nn.Module], cfg: MoEConfig, aux_scale: float,
        data_groups: list[dist.ProcessGroup], stage_groups: list[dist.ProcessGroup],
    ) -> None:  # fmt: skip
        """data_groups: the axes whose ranks hold the same blocks and see other tokens (dp, cp);
        stage_groups: the pipeline axis, whose ranks hold other blocks."""
        self.cfg, self.data_groups, self.stage_groups = cfg, data_groups, stage_groups
        self.layers = [m for part in parts for m in moe_layers(part)]
        for m in self.layers:
            m.aux_scale = aux_scale

    @torch.no_grad()
    def step(self, device: torch.device) -> dict[str, float]:
        """After the optimizer step: the router metrics of the step, equal to one process's (the
        counts are sums over every rank's tokens); moves the routing biases; resets the counts."""
        E = self.cfg.n_experts
        keys = ("dropped", "aux_loss", "forwards")
        rows = [torch.cat([m.stats["tokens"], torch.stack([m.stats[k] for k in keys])]) for m in self.layers]
        per_layer = torch.stack(rows) if rows else torch.zeros(0, E + 3, device=device)
        for group in self.data_groups:
            dist.all_reduce(per_layer, group=group)
        tokens = per_layer[:, :E]
        if self.cfg.bias_update_rate > 0:  # towards the mean load: up for the under-loaded experts
            for m, load in zip(self.layers, tokens, strict=True):
                m.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        load = tokens.max(1).values / tokens.mean(1).clamp_min(1e-9)
        sums = torch.stack([per_layer[:, E].sum(), per_layer[:, E + 1].sum(), per_layer[:, E + 2].sum(), tokens.sum()])
        top = load.max() if len(self.layers) else torch.zeros((), device=device)
        for group in self.stage_groups:  # other pipeline stages hold other blocks
            dist.all_reduce(sums, group=group)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        dropped, aux, forwards, choices = sums.tolist()
        for m in self.layers:
            m.reset_stats()
        return {
            "moe_aux_loss": aux / max(forwards, 1.0),  # per block and micro-batch
            "moe_dropped_frac": dropped / max(choices, 1.0),  # of the (token, expert) choices
            "moe_max_load": float(top),  # busiest expert's tokens over the mean, worst block
        }
