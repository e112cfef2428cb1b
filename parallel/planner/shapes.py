"""What one rank holds of the model: its pipeline stages, their layers, parameter shapes after tensor
parallelism, and the model FLOPs each stage does per token. Pure arithmetic on the config.

The rules restate the engine's (tested against it): stages of consecutive layers as even as possible,
earlier stages taking the remainder (`pipeline_parallel.layer_ranges`); a pp rank holds stage r (gpipe,
1f1b), r, r+pp, ... (interleaved) or r and 2*pp-1-r (zbv) (`pipeline_parallel.stage_ids`); tp splits
every weight but the norms (`tensor_parallel.apply_tp`); FLOPs follow `parallel.flops.flops_per_token`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache

from parallel.config import ModelConfig, ParallelConfig


def layer_counts(n_layers: int, n_stages: int) -> list[int]:
    """Layers per pipeline stage, earlier stages taking the remainder."""
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if s < extra else 0) for s in range(n_stages)]


def stage_ids(pp_rank: int, p: ParallelConfig) -> list[int]:
    """Global stage indices a pp rank holds, in the engine's order."""
    return p.stage_ids(pp_rank)


def stage_rank(stage: int, p: ParallelConfig) -> int:
    """The pp rank holding a global stage."""
    if p.pp_schedule == "zbv" and p.pp > 1:
        return stage if stage < p.pp else p.stages - 1 - stage
    return stage % p.pp


@dataclass(frozen=True)
class Tensor:
    """One parameter as one rank holds it: its local shape under tp, and whether tp split it."""

    name: str
    shape: tuple[int, ...]
    tp_sharded: bool
    expert: bool = False  # a routed experts' stacked weight: its dim 0 is this rank's experts (1/ep)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def fsdp_shard(self, n: int) -> int:
        """Elements of this rank's FSDP2 shard over n ranks: dim 0 split, padded to a multiple of n."""
        rest = math.prod(self.shape[1:])
        return math.ceil(self.shape[0] / n) * rest


def model_key(m: ModelConfig) -> tuple[int, ...]:
    """The fields of a model config the arithmetic depends on (a cache key)."""
    return (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size)


MoEKey = tuple[int, int, int, int, int, int] | None


def moe_key(m: ModelConfig) -> MoEKey:
    """The mixture-of-experts fields the arithmetic depends on: (n_experts, top_k, expert_ffn_dim,
    n_shared_experts, first_dense, every), or None for a dense model."""
    e = m.moe
    if e is None or e.expert_ffn_dim is None:
        return None
    return (e.n_experts, e.top_k, e.expert_ffn_dim, e.n_shared_experts, e.first_dense, e.every)


def is_moe_layer(moe: MoEKey, index: int) -> bool:
    return moe is not None and index >= moe[4] and (index - moe[4]) % moe[5] == 0


def moe_block_tensors(m: ModelConfig, tp: int, ep: int = 1) -> list[Tensor]:
    """The parameters of one mixture-of-experts block on one rank (tp shard, ep share), in model order."""
    return list(_moe_block(model_key(m), moe_key(m), tp, ep))


@lru_cache(maxsize=256)
def _moe_block(key: tuple[int, ...], moe: MoEKey, tp: int, ep: int) -> tuple[Tensor, ...]:
    """Attention as in a dense block (tp-split); router, shared and routed experts kept whole on every tp
    rank (parallel/tensor_parallel.py), the routed experts' dim 0 split over ep."""
    assert moe is not None
    d = key[0]
    n_experts, _, fe, shared, _, _ = moe
    out = [*_block(key, tp)[:6], Tensor("router", (n_experts, d), False)]
    local = n_experts // ep
    out += [Tensor("experts.w1", (local, fe, d), False, True), Tensor("experts.w3", (local, fe, d), False, True),
            Tensor("experts.w2", (local, d, fe), False, True)]  # fmt: skip
    if shared:
        h = shared * fe
        out += [
            Tensor("shared.w1", (h, d), False),
            Tensor("shared.w3", (h, d), False),
            Tensor("shared.w2", (d, h), False),
        ]
    return tuple(out)


def block_tensors(m: ModelConfig, tp: int) -> list[Tensor]:
    """The parameters of one transformer block on one tp rank, in model order."""
    return list(_block(model_key(m), tp))


@lru_cache(maxsize=256)
def _block(key: tuple[int, ...], tp: int) -> tuple[Tensor, ...]:
    d, _, heads, kv_heads, f, _ = key
    q, kv = d, kv_heads * (d // heads)
    return (
        Tensor("attention_norm", (d,), False),
        Tensor("wq", (q // tp, d), tp > 1),
        Tensor("wk", (kv // tp, d), tp > 1),
        Tensor("wv", (kv // tp, d), tp > 1),
        Tensor("wo", (d, q // tp), tp > 1),  # row-parallel: split along its input features
        Tensor("ffn_norm", (d,), False),
        Tensor("w1", (f // tp, d), tp > 1),
        Tensor("w3", (f // tp, d), tp > 1),
        Tensor("w2", (d, f // tp), tp > 1),
    )


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as one tp rank holds it."""

    index: int
    n_layers: int
    first: bool
    last: bool
    block: tuple[Tensor, ...]
    root: tuple[Tensor, ...]  # embedding (first stage), final norm and output head (last stage)
    moe_layers: int = 0  # of its n_layers, how many are mixture-of-experts blocks (`moe_block`)
    moe_block: tuple[Tensor, ...] = ()
    ep: int = 1  # expert parallelism: the routed experts' FSDP2 shards are over dp_shard / ep ranks

    @property
    def dense_layers(self) -> int:
        return self.n_layers - self.moe_layers

    @cached_property
    def block_numel(self) -> int:
        """Elements of its largest block (a dense one, or a mixture-of-experts one)."""
        return max(sum(t.numel for t in self.block), sum(t.numel for t in self.moe_block))

    @cached_property
    def root_numel(self) -> int:
        return sum(t.numel for t in self.root)

    @cached_property
    def numel(self) -> int:
        return self.layers_numel(lambda t: True) + self.root_numel

    @cached_property
    def expert_numel(self) -> int:
        """Elements of its routed experts (ZeRO shards them over dp_shard / ep ranks)."""
        return self.layers_numel(lambda t: t.expert)

    def layers_numel(self, which: Callable[[Tensor], bool]) -> int:
        return self.dense_layers * sum(t.numel for t in self.block if which(t)) + self.moe_layers * sum(
            t.numel for t in self.moe_block if which(t)
        )

    @cached_property
    def block_matmul_numel(self) -> int:
        """Elements of one block's matmul weights (all but the norms), its blocks averaged."""
        return round(self.layers_numel(lambda t: len(t.shape) >= 2) / max(1, self.n_layers))

    @cached_property
    def head_numel(self) -> int:
        """Elements of the output head (0 unless the last stage)."""
        return sum(t.numel for t in self.root if t.name == "output")

    @cached_property
    def largest(self) -> int:
        """Elements of its largest tensor."""
        return max(t.numel for t in (*self.block, *self.moe_block, *self.root))

    @cached_property
    def _fsdp(self) -> dict[int, int]:
        return {}

    def fsdp_numel(self, n: int) -> int:
        """Elements of this rank's FSDP2 shards of every tensor of the stage over n ranks (the routed
        experts over n / ep)."""
        if n not in self._fsdp:
            each = lambda ts: sum(t.fsdp_shard(max(1, n // self.ep) if t.expert else n) for t in ts)  # noqa: E731
            blocks = self.dense_layers * each(self.block) + self.moe_layers * each(self.moe_block)
            self._fsdp[n] = blocks + each(self.root)
        return self._fsdp[n]

    def tensors(self) -> list[Tensor]:
        emb = [t for t in self.root if t.name == "tok_embeddings"]
        blocks = list(self.block) * self.dense_layers + list(self.moe_block) * self.moe_layers
        return emb + blocks + [t for t in self.root if t.name != "tok_embeddings"]


def stages_of(m: ModelConfig, p: ParallelConfig) -> list[Stage]:
    """Every pipeline stage, in global order, as one tp rank holds it."""
    return list(_stages(model_key(m), p.tp, p.stages, moe_key(m), p.ep))


@lru_cache(maxsize=1024)
def _stages(key: tuple[int, ...], tp: int, n: int, moe: MoEKey = None, ep: int = 1) -> tuple[Stage, ...]:
    dim, n_layers, _, _, _, vocab = key
    block = _block(key, tp)
    moe_block = _moe_block(key, moe, tp, ep) if moe is not None else ()
    out, start = [], 0
    for s, layers in enumerate(layer_counts(n_layers, n)):
        root = []
        if s == 0:
            root.append(Tensor("tok_embeddings", (vocab // tp, dim), tp > 1))
        if s == n - 1:
            root += [Tensor("norm", (dim,), False), Tensor("output", (vocab // tp, dim), tp > 1)]
        moe_layers = sum(is_moe_layer(moe, i) for i in range(start, start + layers))
        out.append(Stage(s, layers, s == 0, s == n - 1, block, tuple(root), moe_layers, moe_block, ep))
        start += layers
    return tuple(out)


def rank_stages(m: ModelConfig, p: ParallelConfig, pp_rank: int) -> tuple[Stage, ...]:
    """The stages one pp rank holds, in execution order."""
    return _rank_stages(model_key(m), p.tp, p.pp, p.pp_virtual, p.pp_schedule, pp_rank, moe_key(m), p.ep)


@lru_cache(maxsize=4096)
def _rank_stages(
    key: tuple[int, ...], tp: int, pp: int, virtual: int, schedule: str, pp_rank: int, moe: MoEKey = None,
    ep: int = 1,
) -> tuple[Stage, ...]:  # fmt: skip
    every = _stages(key, tp, pp * virtual, moe, ep)
    if pp == 1:
        return (every[0],)
    if schedule == "zbv":
        return (every[pp_rank], every[2 * pp - 1 - pp_rank])
    return tuple(every[pp_rank + i * pp] for i in range(virtual))


def local_params(m: ModelConfig, p: ParallelConfig, pp_rank: int) -> int:
    """Parameters one rank holds before any ZeRO sharding: its stages, its tp shard of each tensor."""
    return sum(s.numel for s in rank_stages(m, p, pp_rank))


def total_params(m: ModelConfig) -> int:
    """Parameters of the whole model, every expert counted (equals `parallel.flops.param_count`)."""
    one = ParallelConfig()
    return stages_of(m, one)[0].numel


# -- FLOPs ------------------------------------------------------------------------------------------------


def layer_flops(m: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Training FLOPs of one dense block per token: (weights, attention) = (6 * block params, 12 * D * S),
    the terms of `flops.flops_per_token` (norm weights included in the 6N, as there)."""
    block = sum(t.numel for t in block_tensors(m, 1))
    return 6.0 * block, 12.0 * m.n_heads * m.head_dim * seq_len


def moe_layer_flops(m: ModelConfig) -> tuple[float, float]:
    """Weight FLOPs per token of one mixture-of-experts block: (attention part, split by tp; router, shared
    and top_k routed experts, which every tp rank computes whole). 6 x the active parameters, as
    `flops.flops_per_token` counts them."""
    moe = moe_key(m)
    assert moe is not None
    tensors = moe_block_tensors(m, 1)
    attention = sum(t.numel for t in tensors[:6])
    routed = sum(t.numel for t in tensors if t.expert) * moe[1] // moe[0]  # top_k of n_experts
    rest = sum(t.numel for t in tensors[6:] if not t.expert)
    return 6.0 * attention, 6.0 * (rest + routed)


def stage_flops(m: ModelConfig, stage: Stage, seq_len: int, tp: int) -> float:
    """Training FLOPs per token of one stage on one tp rank (the input embedding does none). A
    mixture-of-experts block's experts are kept whole under tp: every tp rank computes them."""
    weights, attention = layer_flops(m, seq_len)
    head = 6.0 * (m.dim + m.dim * m.vocab_size) if stage.last else 0.0
    split = stage.dense_layers * (weights + attention) + head
    whole = 0.0
    if stage.moe_layers:
        moe_attention, moe_rest = moe_layer_flops(m)
        split += stage.moe_layers * (moe_attention + attention)
        whole = stage.moe_layers * moe_rest
    return split / tp + whole


def flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Model training FLOPs per token, 6N + 12 L D S (the same number as `parallel.flops.flops_per_token`)."""
    return sum(stage_flops(m, s, seq_len, 1) for s in stages_of(m, ParallelConfig()))
