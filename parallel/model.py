"""A plain Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

There is no parallelism in here. Tensor, data, pipeline and context parallelism
are applied from outside (see tensor_parallel.py, data_parallel.py), which is why
`forward` infers head counts from shapes (`-1`) instead of reading the config:
under tensor parallelism each rank sees only its share of the heads.

Weights are initialised per parameter from a generator seeded by (seed, name),
so every layout, and every pipeline stage holding a subset of the layers, starts
from exactly the weights one process would have.

    python -c "from parallel.model import Transformer; from parallel.config import ModelConfig; \
print(Transformer(ModelConfig(preset='tiny')))"
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from parallel.config import ModelConfig
from parallel.moe import MoE


def rope_cache(head_dim: int, max_len: int, theta: float) -> torch.Tensor:
    """cos and sin of every position and frequency, in pairs: (max_len, head_dim // 2, 2), which
    `torch.view_as_complex` reads as cos + i sin without a copy."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, T, H, Dh) by the angles in rope (T, Dh/2, 2)."""
    # As one complex multiplication, (x[2i] + i x[2i+1]) * (cos + i sin): one kernel each way where
    # the pairwise form (four products, a sum, a difference and a `stack`) cost 5x the time on CPU.
    rot = torch.view_as_complex(rope)[None, :, None, :]  # (1, T, 1, Dh/2), a view of the table
    z = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, Dh/2), a view
    return torch.view_as_real(z * rot).flatten(-2).type_as(x)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (B, Hq, T, Dh), k and v (B, Hkv, T, Dh) -> (B, Hq, T, Dh)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is a single op, so DTensor's sequence-parallel sharding rule applies to it.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.n_rep = cfg.n_heads // cfg.n_kv_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        # The attention kernel; context parallelism swaps in ring attention.
        self.core: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = causal_attention

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        rope = rope[:T]  # (T, Dh/2, 2): the table covers at least this rank's T positions
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, Hq, Dh); Hq local under TP
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, Hkv, Dh)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        out = self.core(q, k, v)  # (B, Hq, T, Dh)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class FeedForward(nn.Module):
    """The SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int = 0) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        moe = cfg.moe
        self.feed_forward: nn.Module
        if moe is not None and moe.is_moe_layer(index):
            assert moe.expert_ffn_dim is not None
            shared = FeedForward(cfg.dim, moe.n_shared_experts * moe.expert_ffn_dim) if moe.n_shared_experts else None
            self.feed_forward = MoE(cfg.dim, moe, shared)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. Pipeline stages delete `tok_embeddings`, layers or the head;
    layers sit in a ModuleDict keyed by their global index so names stay stable."""

    def __init__(self, cfg: ModelConfig, max_seq_len: int = 4096) -> None:
        super().__init__()
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.positions: torch.Tensor | None = None  # token positions held here; None = 0..T-1
        self.register_buffer("rope", self._rope_table(), persistent=False)

    def _rope_table(self) -> torch.Tensor:
        table = rope_cache(self.cfg.head_dim, self.max_seq_len, self.cfg.rope_theta)  # (max_seq_len, Dh/2, 2)
        return table if self.positions is None else table[self.positions]

    def set_positions(self, positions: torch.Tensor) -> None:
        """Hold only these token positions (a context-parallel shard); RoPE follows them."""
        self.positions = positions
        self.rope = self._rope_table().to(self.rope.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) ids, or (B, T, C) hidden states on a later pipeline stage."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens  # (B, T, C)
        for layer in self.layers.values():
            h = layer(h, self.rope)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h  # (B, T, V)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seed every parameter from (seed, its name); works on DTensor shards too.

        Each rank builds the full tensor and keeps its shard (no communication), so the
        cost is one parameter's full size at a time."""
        self.rope = self._rope_table().to(self.rope.device)
        for m in self.modules():
            if isinstance(m, MoE):  # its routing biases start at 0; its counts live where it does
                m.expert_bias.zero_()
                m.reset_stats()
        for name, param in self.named_parameters():
            full = _init_value(name, tuple(param.shape), seed, self.cfg)
            if isinstance(param, DTensor):
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full.to(param.device))


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, buffer) of the buffers a state_dict holds (MoE routing biases; RoPE's table is not one),
    found without building a state_dict (FSDP2 hooks that)."""
    return [
        (f"{prefix}.{name}" if prefix else name, b)
        for prefix, mod in model.named_modules()
        for name, b in mod._buffers.items()
        if b is not None and name not in mod._non_persistent_buffers_set
    ]


def _init_value(name: str, shape: tuple[int, ...], seed: int, cfg: ModelConfig) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    std = cfg.init_std
    # Residual-stream output projections are scaled down with depth (GPT-2 style) so
    # the residual variance does not grow with the number of layers.
    if name.endswith(("wo.weight", "w2.weight", "experts.w2")):
        std = std / (2 * cfg.n_layers) ** 0.5
    return torch.empty(shape).normal_(0.0, std, generator=gen)
