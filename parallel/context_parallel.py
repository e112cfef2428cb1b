"""Context parallelism: the sequence is split over the cp ranks, attention spans it all.

torch's own `context_parallel` shards SDPA through kernels that have no CPU
implementation, so we write ring attention here; it runs the same on gloo and nccl.

Zig-zag load balance: the sequence is cut into 2*cp chunks and cp rank i holds
chunks i and 2*cp-1-i. Under a causal mask a late chunk attends to far more keys
than an early one; pairing them gives every rank the same work.

Ring (`cp_mode: ring`): each rank keeps its queries; K/V blocks travel around the
ring by point-to-point sends that are posted before the current block is
computed, so transfer overlaps compute. Partial outputs of the blocks merge
through their log-sum-exp. Backward runs the ring again: K/V travel as before and
their gradients dK/dV travel with them, arriving home after a full circle.
All-gather (`cp_mode: allgather`): K/V are gathered once and each rank attends its
queries to the whole sequence under a position mask.

Both handle grouped-query attention (fewer K/V heads than query heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_gather_tensor_autograd

from parallel.comms import watch
from parallel.moe import MoE


def chunk_ids(rank: int, cp: int, zigzag: bool = True) -> list[int]:
    """Which of the sequence's chunks a cp rank holds (2*cp chunks zig-zag, else cp)."""
    return [rank, 2 * cp - 1 - rank] if zigzag else [rank]


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1, zigzag: bool = True) -> torch.Tensor:
    """This rank's part of a full sequence tensor, chunks in `chunk_ids` order."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp if zigzag else cp, dim=dim)
    return torch.cat([chunks[i] for i in chunk_ids(rank, cp, zigzag)], dim=dim)


def positions(seq_len: int, cp: int, rank: int, zigzag: bool = True) -> torch.Tensor:
    """Global token positions of this rank's shard: (seq_len // cp,)."""
    return shard_sequence(torch.arange(seq_len), cp, rank, dim=0, zigzag=zigzag)


def _expand(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.repeat_interleave(rep, dim=1)  # (B, Hkv, T, D) -> (B, Hq, T, D)


def _fold(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t if rep == 1 else t.unflatten(1, (-1, rep)).sum(2)  # gradient back to (B, Hkv, T, D)


class _Ring:
    """Neighbours on the cp ring and one exchange step (send to next, receive from previous)."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def start(self, t: torch.Tensor) -> tuple[torch.Tensor, list]:
        recv = torch.empty_like(t)
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]  # fmt: skip
        return recv, dist.batch_isend_irecv(ops)


class RingAttention:
    """Attention core `(q, k, v) -> out` over the cp group; q (B, Hq, T/cp, D), k/v (B, Hkv, T/cp, D)."""

    def __init__(self, group: dist.ProcessGroup, causal: bool = True, zigzag: bool = True) -> None:
        self.ring = _Ring(group)
        self.causal, self.zigzag = causal, zigzag
        self.work = 0.0  # score elements computed by this rank (forward), for load-balance checks

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _RingFn.apply(q, k, v, self)

    def pairs(self, src: int) -> list[tuple[int, int, bool]]:
        """(local query segment, key segment of `src`, diagonal?) pairs that need computing."""
        cp = self.ring.size
        mine, theirs = chunk_ids(self.ring.rank, cp, self.zigzag), chunk_ids(src, cp, self.zigzag)
        out = []
        for qa, a in enumerate(mine):
            for kb, b in enumerate(theirs):
                if not self.causal or b < a:
                    out.append((qa, kb, False))
                elif b == a:
                    out.append((qa, kb, True))
        return out


def _segments(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(t.chunk(n, dim=2))


def _scores(q: torch.Tensor, k: torch.Tensor, diagonal: bool) -> torch.Tensor:
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    if diagonal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return s


def _arrive(transfer: tuple[torch.Tensor, list], action: str) -> torch.Tensor:
    """Wait for a transfer `Ring.start` posted; its buffer then holds the neighbour's tensor."""
    buffer, works = transfer
    with watch("cp", action):
        for w in works:
            w.wait()
    return buffer


class _RingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn: RingAttention):  # noqa: ANN001, ANN205 (autograd signature)
        # The blocks and their log-sum-exp merge run in fp32 whatever the autocast dtype, so the
        # forward agrees with the fp32 backward below; the output goes back in q's dtype.
        with torch.autocast(q.device.type, enabled=False):
            return _RingFn._forward(ctx, q, k, v, attn)

    @staticmethod
    def _forward(ctx, q, k, v, attn: RingAttention):  # noqa: ANN001, ANN205
        ring, rep = attn.ring, q.shape[1] // k.shape[1]
        n_seg = len(chunk_ids(0, ring.size, attn.zigzag))
        qf = q.float()
        out = [torch.zeros_like(s) for s in _segments(qf, n_seg)]
        lse = [torch.full(s.shape[:-1], float("-inf"), device=q.device) for s in _segments(qf, n_seg)]
        kv = torch.stack([k, v]).float()  # (2, B, Hkv, T/cp, D) travels as one message
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            pending = ring.start(kv) if step < ring.size - 1 else None  # overlap: next block in flight
            ks, vs = _segments(_expand(kv[0], rep), n_seg), _segments(_expand(kv[1], rep), n_seg)
            qs = _segments(qf, n_seg)
            for qa, kb, diag in attn.pairs(src):
                s = _scores(qs[qa], ks[kb], diag)
                blk_lse = torch.logsumexp(s, dim=-1)  # (B, H, Tq)
                blk_out = torch.exp(s - blk_lse[..., None]) @ vs[kb]
                new_lse = torch.logaddexp(lse[qa], blk_lse)
                out[qa] = (
                    out[qa] * torch.exp(lse[qa] - new_lse)[..., None]
                    + blk_out * torch.exp(blk_lse - new_lse)[..., None]
                )
                lse[qa] = new_lse
                attn.work += s.shape[-2] * (s.shape[-1] + 1) / 2 if diag else s.shape[-2] * s.shape[-1]
            if pending is not None:
                kv = _arrive(pending, f"ring attention forward step {step + 1}/{ring.size - 1}: K/V from cp rank "
                                      f"{(src - 1) % ring.size}")  # fmt: skip
        out_t, lse_t = torch.cat(out, dim=2), torch.cat(lse, dim=2)
        ctx.save_for_backward(q, k, v, out_t, lse_t)
        ctx.attn = attn
        return out_t.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):  # noqa: ANN001, ANN205
        q, k, v, out, lse = ctx.saved_tensors
        attn = ctx.attn
        ring, rep = attn.ring, q.shape[1] // k.shape[1]
        n_seg = len(chunk_ids(0, ring.size, attn.zigzag))
        qf, dout = q.float(), dout.float()
        delta = (dout * out).sum(-1)  # (B, H, T/cp): rowsum(dO * O)
        qs, dos = _segments(qf, n_seg), _segments(dout, n_seg)
        lses, deltas = list(lse.chunk(n_seg, dim=2)), list(delta.chunk(n_seg, dim=2))
        dq = [torch.zeros_like(s) for s in qs]
        scale = 1 / math.sqrt(q.shape[-1])
        kv = torch.stack([k, v]).float()
        # dK/dV of a block travel with it: the sum for the block in hand arrives from the previous
        # rank while this step computes, and after the last step each sum is back with its owner.
        incoming = None  # (buffer, works) of the sum for the block in hand; none at step 0 (our own)
        for step in range(ring.size):
            src = (ring.rank - step) % ring.size
            pending = ring.start(kv) if step < ring.size - 1 else None
            ke, ve = _expand(kv[0], rep), _expand(kv[1], rep)
            ks, vs = _segments(ke, n_seg), _segments(ve, n_seg)
            dks = [torch.zeros_like(s) for s in ks]
            dvs = [torch.zeros_like(s) for s in vs]
            for qa, kb, diag in attn.pairs(src):
                p = torch.exp(_scores(qs[qa], ks[kb], diag) - lses[qa][..., None])  # (B, H, Tq, Tk)
                dvs[kb] += p.transpose(-1, -2) @ dos[qa]
                ds = p * (dos[qa] @ vs[kb].transpose(-1, -2) - deltas[qa][..., None])
                dq[qa] += (ds @ ks[kb]) * scale
                dks[kb] += (ds.transpose(-1, -2) @ qs[qa]) * scale
            dkv = torch.stack([_fold(torch.cat(dks, 2), rep), _fold(torch.cat(dvs, 2), rep)])
            if incoming is not None:
                dkv += _arrive(incoming, f"ring attention backward step {step}/{ring.size}: dK/dV from cp rank "
                                         f"{(ring.rank - 1) % ring.size}")  # fmt: skip
            incoming = ring.start(dkv)  # one hop on, with its block
            if pending is not None:
                kv = _arrive(pending, f"ring attention backward step {step + 1}/{ring.size}: K/V from cp rank "
                                      f"{(src - 1) % ring.size}")  # fmt: skip
        dkv = _arrive(incoming, f"ring attention backward step {ring.size}/{ring.size}: dK/dV from cp rank "
                                f"{(ring.rank - 1) % ring.size}")  # fmt: skip
        dk, dv = dkv[0].to(k.dtype), dkv[1].to(v.dtype)
        return torch.cat(dq, dim=2).to(q.dtype), dk, dv, None


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 of a (cp, ...) stack; backward reduce-scatters the gradient."""

    @staticmethod
    def forward(ctx, t, group):  # noqa: ANN001, ANN205
        ctx.group = group
        out = torch.empty((dist.get_world_size(group) * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        with watch("cp", "all-gather of K/V"):
            dist.all_gather_single(out, t.contiguous(), group=group)
        return out.unflatten(0, (-1, t.shape[0]))

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        out = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
        with watch("cp", "reduce-scatter of dK/dV"):
            dist.reduce_scatter_single(out, grad.flatten(0, 1).contiguous(), group=ctx.group)
        return out, None


class AllGatherAttention:
    """Attention core that gathers K/V from the cp group once, then masks by position."""

    def __init__(self, group: dist.ProcessGroup, seq_len: int, causal: bool = True) -> None:
        self.group, self.causal = group, causal
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        self.q_pos = positions(seq_len, cp, rank)
        # Gathered order is rank-major over zig-zag shards; keep their positions alongside.
        self.k_pos = torch.cat([positions(seq_len, cp, r) for r in range(cp)])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kv = _GatherSeq.apply(torch.stack([k, v]), self.group)  # (cp, 2, B, Hkv, T/cp, D)
        k_all, v_all = kv[:, 0].permute(1, 2, 0, 3, 4).flatten(2, 3), kv[:, 1].permute(1, 2, 0, 3, 4).flatten(2, 3)
        mask = None
        if self.causal:
            mask = (self.k_pos[None, :] <= self.q_pos[:, None]).to(q.device)  # (T/cp, T)
        return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class SequenceShards:
    """For mixture-of-experts blocks (`parallel.moe.SequenceParts`): this rank holds the zig-zag chunks
    `chunk_ids` of every sequence; capacity and the aux loss are per whole sequence, so they add up the
    other cp ranks' chunks."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.ranks, self.chunks = group, dist.get_world_size(group), 2
        self.rank = dist.get_rank(group)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        # all_gather's autograd sends each rank the sum of the gradients back (an all-reduce would too,
        # but torch's differentiable all_reduce is deprecated)
        gathered = all_gather_tensor_autograd(t.contiguous(), 0, self.group)
        return gathered.view(self.ranks, *t.shape).sum(0)

    @torch.no_grad()
    def earlier(self, counts: torch.Tensor) -> torch.Tensor:
        everyone = torch.empty(self.ranks * counts.shape[0], *counts.shape[1:], dtype=counts.dtype,
                               device=counts.device)  # fmt: skip
        with watch("cp", "all-gather of expert counts per chunk"):
            dist.all_gather_into_tensor(everyone, counts.contiguous(), group=self.group)
        everyone = everyone.view(self.ranks, *counts.shape)
        by_chunk = torch.empty(counts.shape[0], 2 * self.ranks, counts.shape[2], dtype=counts.dtype,
                               device=counts.device)  # fmt: skip
        for r in range(self.ranks):
            for i, chunk in enumerate(chunk_ids(r, self.ranks)):
                by_chunk[:, chunk] = everyone[r, :, i]
        before = by_chunk.cumsum(1) - by_chunk  # (B, 2cp, E): counts of the chunks before each
        return torch.stack([before[:, c] for c in chunk_ids(self.rank, self.ranks)], dim=1)


def apply_cp(model: torch.nn.Module, group: dist.ProcessGroup, seq_len: int, mode: str) -> None:
    """Give every attention layer a cp-aware core, every mixture-of-experts block the sequence's layout,
    and the model its shard's RoPE positions."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    model.set_positions(positions(seq_len, cp, rank))
    for block in model.layers.values():  # before activation checkpointing wraps the blocks
        core: Callable = RingAttention(group) if mode == "ring" else AllGatherAttention(group, seq_len)
        block.attention.core = core
        if isinstance(block.feed_forward, MoE):
            block.feed_forward.sequence = SequenceShards(group)
