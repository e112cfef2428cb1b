"""Activation memory: what autograd (or the checkpoint) keeps per layer, and how many micro-batches of it
each pipeline schedule holds at once on each rank.

A block is described generically, as the list of tensors it keeps for backward (`Saved`), each with its
elements per token, bytes per element and how tensor parallelism divides it. One evaluator
(`layer_bytes`) serves both the published GPT block of Korthikanti et al. 2022 (`gpt_block`, checked
against the paper's closed forms in `korthikanti_layer_bytes`) and this engine's Llama block
(`llama_block`), whose lists were read off the engine by counting what `saved_tensors_hooks` sees on
CPU in fp32, each storage once, parameters and buffers left out (and, for selective recomputation,
which op outputs the checkpoint policy caches): see the docstring of `llama_block`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from parallel.config import Config, ModelConfig
from parallel.planner.shapes import model_key, rank_stages

Split = Literal["seq", "heads", "none"]


@dataclass(frozen=True)
class Saved:
    """One tensor kept for backward, per token of the micro-batch on this rank.

    split: how tp divides it: "seq" = a sequence-parallel shard (divided by tp when sequence parallelism
    is on, else replicated), "heads" = split by heads or features (always divided by tp), "none" = every
    tp rank keeps it whole (an all-gathered input). per_key: elements are also per attended key (scores)."""

    name: str
    per_token: float
    nbytes: float
    split: Split
    per_key: bool = False


@dataclass(frozen=True)
class BlockSpec:
    """What one block keeps under each activation-checkpointing mode."""

    name: str
    none: tuple[Saved, ...]
    selective: tuple[Saved, ...]
    full: tuple[Saved, ...]

    def saved(self, mode: str) -> tuple[Saved, ...]:
        return {"none": self.none, "selective": self.selective, "full": self.full}[mode]


def saved_bytes(saved: tuple[Saved, ...], tokens: int, keys: int, tp: int, sequence_parallel: bool = True) -> float:
    """Bytes of `saved` for `tokens` tokens (micro_batch x sequence on this rank), `keys` keys per query."""
    total = 0.0
    for t in saved:
        elems = t.per_token * tokens * (keys if t.per_key else 1)
        if t.split == "heads" or (t.split == "seq" and sequence_parallel):
            elems /= tp
        total += elems * t.nbytes
    return total


def layer_bytes(
    spec: BlockSpec, mode: str, tokens: int, keys: int, tp: int = 1, sequence_parallel: bool = True
) -> float:
    """Bytes one layer keeps for one micro-batch under activation checkpointing `mode`."""
    return saved_bytes(spec.saved(mode), tokens, keys, tp, sequence_parallel)


# -- the published GPT block ------------------------------------------------------------------------------


def gpt_block(h: int, a: int) -> BlockSpec:
    """The GPT block of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models", Section 4), fp16 activations, 1-byte dropout masks, MLP width 4h, a attention heads.

    Under Megatron's sequence parallelism the inputs of the QKV and first MLP matmuls are kept as sequence
    shards and gathered again in backward, hence "seq". Their selective recomputation recomputes the
    attention core (scores, softmax, dropout) and keeps the rest; full recomputation keeps the input."""
    seq, heads = "seq", "heads"
    kept = (
        Saved("layernorm1.input", h, 2, seq),
        Saved("qkv.input", h, 2, seq),
        Saved("q", h, 2, heads),
        Saved("k", h, 2, heads),
        Saved("v", h, 2, heads),
        Saved("projection.input", h, 2, heads),
        Saved("attention.dropout_mask", h, 1, seq),
        Saved("layernorm2.input", h, 2, seq),
        Saved("mlp.input", h, 2, seq),
        Saved("gelu.input", 4 * h, 2, heads),
        Saved("gelu.output", 4 * h, 2, heads),
        Saved("mlp.dropout_mask", h, 1, seq),
    )
    core = (
        Saved("softmax.output", a, 2, heads, per_key=True),
        Saved("softmax.dropout_mask", a, 1, heads, per_key=True),
        Saved("softmax.dropout_output", a, 2, heads, per_key=True),
    )
    return BlockSpec("gpt (Korthikanti et al. 2022)", kept + core, kept, (Saved("layer.input", h, 2, seq),))


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False, recompute: str = "none"
) -> float:
    """The paper's closed forms, bytes per layer (Korthikanti et al. 2022, Sections 4.1-4.2 and 5):
    sbh(34 + 5as/h) without parallelism; sbh(10 + 24/t + 5as/(ht)) with tensor parallelism; sbh/t (34 + 5as/h)
    with tensor and sequence parallelism; selective recomputation drops the 5as/h term (sbh 34/t with
    sequence parallelism); full recomputation keeps 2sbh (the layer input), /t with sequence parallelism."""
    sbh = s * b * h
    score = 5 * a * s / h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    if recompute == "selective":
        score = 0.0
    if sequence_parallel:
        return sbh / t * (34 + score)
    return sbh * (10 + 24 / t + score / t)


# -- this engine's Llama block ----------------------------------------------------------------------------


def compute_bytes(dtype: str) -> int:
    """Bytes per element of the compute dtype: "fp32" 4, "bf16" (autocast) 2."""
    return {"fp32": 4, "bf16": 2}[dtype]


def llama_block(m: ModelConfig, seq_len: int, micro_batch: int, cp: int = 1, cp_mode: str = "ring",
                dtype: str = "fp32") -> BlockSpec:  # fmt: skip
    """What one block of `parallel.model.Block` keeps, per token on this rank (C = dim, Q = n_heads x
    head_dim, KV = n_kv_heads x head_dim, F = ffn_dim, H = n_heads; "seq" shards, "heads" shards, whole):

    none (fp32, no cp): each RMSNorm keeps its input, rstd and normalised input (C + 1 + C, seq; torch's
    rms_norm is composite on CPU); wq/wk/wv keep the all-gathered norm output (C, whole) and w1/w3 theirs
    (C, whole); RoPE keeps nothing (its tables are a buffer); SDPA keeps q, k, v after RoPE (Q + 2 KV),
    its output (Q) and log-sum-exp (H), and wo reads that output as a view; SiLU keeps w1's output, the
    product keeps silu(w1) and w3's output, w2 keeps the product (4 F). 8C + 2KV + 4F + H + 2 in all.
    Under bf16 autocast the norms stay fp32, every matmul input is cast per matmul (the gathered norm
    output three times for wq/wk/wv, twice for w1/w3: 6 and 4 bytes per element), the rest is bf16
    except the log-sum-exp. Ring attention keeps its output in fp32 and wo a bf16 (or fp32) copy; the
    all-gather mode keeps the gathered K/V (cp times KV) and the position mask as floats (T/cp x T per
    layer, shared by the micro-batch's sequences: T / micro_batch per token).
    These lists match, byte for byte, what saved_tensors_hooks sees on CPU in fp32 and under bf16
    autocast, at tp=2 and at cp=2 in both modes. On CUDA, torch may fuse rms_norm and keep only its
    input and rstd (2C per layer less than counted here).

    selective: the checkpoint keeps the block input (C) and caches the outputs of every matmul and of
    SDPA: wq, wk, wv (Q + 2 KV), SDPA output and lse (Q + H), wo and w2 before their reduce-scatter
    (C each, whole sequence under tp), w1 and w3 (2 F). Ring attention is not SDPA: its score and output
    blocks are bmm outputs and get cached instead, (2cp+1) pairs of (T/2cp)^2 scores and (T/2cp) x Q
    outputs per sequence, in fp32: quadratic in the sequence.

    full: the block input (C), fp32."""
    return _llama_block(model_key(m), seq_len, micro_batch, cp, cp_mode, dtype)


@lru_cache(maxsize=1024)
def _llama_block(key: tuple[int, ...], seq_len: int, micro_batch: int, cp: int, cp_mode: str, dtype: str) -> BlockSpec:
    cb = compute_bytes(dtype)
    bf16 = dtype == "bf16"
    c, _, h, kv_heads, f, _ = key
    q, kv = c, kv_heads * (c // h)
    ring, gather = cp > 1 and cp_mode == "ring", cp > 1 and cp_mode == "allgather"
    kv_kept = kv * (cp if gather else 1)  # the all-gather mode keeps the whole sequence's K/V
    norm = lambda n: (Saved(f"{n}.input", c, 4, "seq"), Saved(f"{n}.rstd", 1, 4, "seq"),  # noqa: E731
                      Saved(f"{n}.normalized", c, 4, "seq"))  # fmt: skip
    attention = [
        *norm("attention_norm"),
        Saved("attention.input (gathered)", c, 6 if bf16 else 4, "none"),
        Saved("q", q, cb, "heads"),
        Saved("k", kv_kept, cb, "heads"),
        Saved("v", kv_kept, cb, "heads"),
        Saved("attention.lse", h, 4, "heads"),
        Saved("attention.output", q, 4 if ring else cb, "heads"),
    ]
    if ring:
        attention.append(Saved("wo.input (copy)", q, cb, "heads"))
    if gather:
        attention.append(Saved("attention.mask", seq_len / micro_batch, cb, "none"))
    mlp = [
        *norm("ffn_norm"),
        Saved("feed_forward.input (gathered)", c, 4, "none"),
        Saved("w1.output", f, cb, "heads"),
        Saved("w3.output", f, cb, "heads"),
        Saved("silu.output", f, cb, "heads"),
        Saved("w2.input", f, cb, "heads"),
    ]
    if ring:
        pairs = 2 * cp + 1
        core = (Saved("ring.scores", h * pairs / 4, 4, "heads", per_key=True),
                Saved("ring.block_outputs", q * pairs / 2, 4, "heads"))  # fmt: skip
    else:
        core = (Saved("attention.output", q, cb, "heads"), Saved("attention.lse", h, 4, "heads"))
    selective = (
        Saved("block.input", c, 4, "seq"),
        Saved("wq.output", q, cb, "heads"),
        Saved("wk.output", kv, cb, "heads"),
        Saved("wv.output", kv, cb, "heads"),
        *core,
        Saved("wo.output (partial)", c, cb, "none"),
        Saved("w1.output", f, cb, "heads"),
        Saved("w3.output", f, cb, "heads"),
        Saved("w2.output (partial)", c, cb, "none"),
    )
    return BlockSpec("llama", tuple(attention + mlp), selective, (Saved("block.input", c, 4, "seq"),))


_MLP = ("ffn_norm.", "feed_forward.", "w1.", "w3.", "silu.", "w2.")


def moe_block(m: ModelConfig, seq_len: int, micro_batch: int, cp: int = 1, cp_mode: str = "ring",
              dtype: str = "fp32") -> BlockSpec:  # fmt: skip
    """What one mixture-of-experts block keeps: the attention part of `llama_block`, and for its MLP (per
    token, E =
    n_experts, k = top_k, Fe = expert_ffn_dim, every tp rank keeping it whole, the experts not being split
    by tp): the norm's three tensors, the gathered input (C), the router's logits, scores and normalised
    scores (3E, fp32), the tokens copied in expert order (k C), each routed expert's w1 and w3 outputs,
    SiLU output and product (4 k Fe), the experts' outputs and their weighted copies (2 k C), and the
    shared experts' four (4 n_shared Fe): within 1% of what saved_tensors_hooks sees in one process
    (tiny-moe), the ranks' mean within 10% at ep=2 and ep=4 (tests/dist/test_planner_measured.py). A rank under
    expert parallelism keeps its experts' share of the ep group's tokens: k per token when the router
    balances them, more on the rank of a busier expert. Selective keeps the matmul outputs of those
    (router E, 2 k Fe, k C, 2 n_shared Fe); full the block input."""
    moe = m.moe
    assert moe is not None and moe.expert_ffn_dim is not None
    dense = llama_block(m, seq_len, micro_batch, cp, cp_mode, dtype)
    cb = compute_bytes(dtype)
    c, e, k, fe, sh = m.dim, moe.n_experts, moe.top_k, moe.expert_ffn_dim, moe.n_shared_experts
    none = [t for t in dense.none if not t.name.startswith(_MLP)] + [
        *(t for t in dense.none if t.name.startswith("ffn_norm.")),  # input, rstd, normalised input
        Saved("feed_forward.input (gathered)", c, 4, "none"),
        Saved("router.logits and scores", 3 * e, 4, "none"),
        Saved("experts.input (tokens in expert order)", k * c, cb, "none"),
        Saved("experts.w1, w3, silu, product", 4 * k * fe, cb, "none"),
        Saved("experts.output and its weighted copy", 2 * k * c, cb, "none"),
        Saved("shared.w1, w3, silu, product", 4 * sh * fe, cb, "none"),
    ]
    selective = [t for t in dense.selective if not t.name.startswith(_MLP)] + [
        Saved("router.logits", e, 4, "none"),
        Saved("experts.w1 and w3 outputs", 2 * k * fe, cb, "none"),
        Saved("experts.output", k * c, cb, "none"),
        Saved("shared.w1 and w3 outputs", 2 * sh * fe, cb, "none"),
    ]
    return BlockSpec("llama-moe", tuple(none), tuple(selective), dense.full)


def head_saved(m: ModelConfig, dtype: str = "fp32") -> tuple[Saved, ...]:
    """What the final norm, the output head and the loss keep (the last stage; never checkpointed): the
    norm's three tensors, the gathered head input (fp32, or its one bf16 cast), and the fp32 log-probs of
    the cross entropy (vocab-sharded under tp). The logits themselves are in `logits_saved`."""
    return (
        Saved("norm.input", m.dim, 4, "seq"),
        Saved("norm.rstd", 1, 4, "seq"),
        Saved("norm.normalized", m.dim, 4, "seq"),
        Saved("output.input (gathered)", m.dim, 2 if dtype == "bf16" else 4, "none"),
        Saved("loss.log_probs", m.vocab_size, 4, "heads"),
    )


def logits_saved(m: ModelConfig, dtype: str = "fp32") -> tuple[Saved, ...]:
    """The logits, held by the trainer (or the pipeline stage's output cache) until backward."""
    return (Saved("logits", m.vocab_size, compute_bytes(dtype), "heads"),)


# -- micro-batches in flight ------------------------------------------------------------------------------


def inflight(cfg: Config, pp_rank: int) -> list[list[int]]:
    """Micro-batches whose activations a pp rank holds at its peak, per local stage (in `stage_ids`
    order); more than one list when the peak can fall at different moments (zbv).

    No pipeline: 1 (each micro-batch's backward runs before the next forward). gpipe: all m. 1f1b:
    min(m, pp - r). interleaved_1f1b: the warm-up forwards plus one, min(m v, (v-1) m_round + 2(pp-1-r) + 1),
    spread over the chunks in the order the schedule runs them (m_round = m / max(1, m // pp) per round).
    zbv: 2 pp chunk-micro-batches on every rank: (2pp - r, r) or (2pp - r - 1, r + 1) over its two chunks."""
    p = cfg.parallel
    m = p.microbatches or cfg.grad_accum
    if p.pp == 1:
        return [[1]]
    r, pp, v = pp_rank, p.pp, p.pp_virtual
    if p.pp_schedule == "gpipe":
        return [[m]]
    if p.pp_schedule == "1f1b":
        return [[min(m, pp - r)]]
    if p.pp_schedule == "zbv":
        return [[min(m, 2 * pp - r), min(m, r)], [min(m, 2 * pp - r - 1), min(m, r + 1)]]
    per_round = m // max(1, m // pp)
    held = min(m * v, (v - 1) * per_round + 2 * (pp - 1 - r) + 1)
    counts = [0] * v
    for op in range(held):
        counts[(op // per_round) % v] += 1
    return [[min(m, c) for c in counts]]


def unit_bytes(cfg: Config, dtype: str = "fp32") -> dict[str, float]:
    """Bytes of one micro-batch's pieces on one rank, which `activation_bytes` multiplies and adds up:
    layer (under the config's checkpointing), layer_none (without), head, logits, residual (one
    (b, T/cp/tp, C) fp32 tensor, what pipeline stages pass), tokens (b x T/cp)."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    s = t.seq_len // p.cp
    tokens = t.micro_batch * s
    spec = llama_block(m, t.seq_len, t.micro_batch, p.cp, p.cp_mode, dtype)
    moe = moe_block(m, t.seq_len, t.micro_batch, p.cp, p.cp_mode, dtype) if m.moe is not None else spec
    return {
        "layer": layer_bytes(spec, p.activation_checkpointing, tokens, s, p.tp),
        "layer_none": layer_bytes(spec, "none", tokens, s, p.tp),
        "moe_layer": layer_bytes(moe, p.activation_checkpointing, tokens, s, p.tp),
        "moe_layer_none": layer_bytes(moe, "none", tokens, s, p.tp),
        "head": saved_bytes(head_saved(m, dtype), tokens, s, p.tp),
        "logits": saved_bytes(logits_saved(m, dtype), tokens, s, p.tp),
        "residual": tokens * m.dim * 4 / p.tp,
        "tokens": tokens,
    }


def activation_bytes(cfg: Config, pp_rank: int | None = None, dtype: str = "fp32") -> dict[str, int]:
    """Activation memory of one rank at its peak, bytes, itemised (pp_rank None: the pp rank where the
    total is largest). Every count is for this rank's micro-batch of `micro_batch` sequences of
    `seq_len / cp` tokens, divided over tp as `Saved.split` says.

    layers: what its blocks keep (`llama_block`), times the micro-batches in flight (`inflight`);
    embedding: the token ids the embedding keeps (8 bytes a token, first stage); head: `head_saved`
    (last stage); logits: `logits_saved` (last stage); stage_outputs: the output a non-last pipeline stage
    keeps for its backward (fp32 residual stream, seq shard); pipeline_buffers: the receive buffers torch's
    PipelineStage allocates once for every micro-batch, activations on non-first stages and gradients on
    non-last ones (persistent; the first layer's saved input of an in-flight micro-batch is one of them,
    so this double counts that much); low_precision_weights: the bf16 casts of the weights that
    autocast's matmuls keep, per micro-batch in flight (blocks only without checkpointing; head always)."""
    units = unit_bytes(cfg, dtype)
    ranks = range(cfg.parallel.pp) if pp_rank is None else [pp_rank]
    return max((rank_activations(cfg, r, dtype, units) for r in ranks), key=lambda d: d["total"])


def rank_activations(cfg: Config, pp_rank: int, dtype: str, units: dict[str, float]) -> dict[str, int]:
    """`activation_bytes` of one pp rank from `unit_bytes`."""
    p = cfg.parallel
    n_micro = p.microbatches or cfg.grad_accum
    stages = rank_stages(cfg.model, p, pp_rank)
    keep_blocks = dtype == "bf16" and p.activation_checkpointing == "none"
    best: dict[str, int] = {}
    for moment in inflight(cfg, pp_rank):
        layers = emb = head = logits = outputs = buffers = weights = 0.0
        for stage, held in zip(stages, moment, strict=True):
            layers += held * (stage.dense_layers * units["layer"] + stage.moe_layers * units["moe_layer"])
            if stage.first:
                emb += held * units["tokens"] * 8
            if stage.last:
                head += held * units["head"]
                logits += held * units["logits"]
            elif p.pp > 1:
                outputs += held * units["residual"]
            if p.pp > 1:
                buffers += n_micro * units["residual"] * ((not stage.first) + (not stage.last))
            if dtype == "bf16":
                cast = stage.n_layers * stage.block_matmul_numel if keep_blocks else 0
                weights += held * 2 * (cast + stage.head_numel)
        out = {"layers": layers, "embedding": emb, "head": head, "logits": logits, "stage_outputs": outputs,
               "pipeline_buffers": buffers, "low_precision_weights": weights}  # fmt: skip
        total = sum(out.values())
        if not best or total > best["total"]:
            best = {k: round(v) for k, v in out.items()} | {"total": round(total)}
    return best


def per_layer_bytes(cfg: Config, dtype: str = "fp32", mode: str | None = None) -> int:
    """Bytes one block keeps for one micro-batch on one rank (mode: the config's checkpointing unless given)."""
    p, t = cfg.parallel, cfg.train
    s = t.seq_len // p.cp
    spec = llama_block(cfg.model, t.seq_len, t.micro_batch, p.cp, p.cp_mode, dtype)
    return round(layer_bytes(spec, mode or p.activation_checkpointing, t.micro_batch * s, s, p.tp))
