"""The collectives one rank takes part in during one optimizer step, per mesh axis, itemised.

Counts follow what the engine issues (parallel/data_parallel.py, FSDP2, DTensor's sequence-parallel
plans, parallel/context_parallel.py, torch's pipeline stages). Sizes are bytes of the *payload*:

- all_reduce: the buffer reduced; all_gather: the gathered (whole) output; reduce_scatter: the whole
  input; send: the message this rank sends (every rank of a ring or pipeline also receives as much).

`Collective.wire` is what one rank puts on its link under the ring algorithm: 2(n-1)/n x payload for
all_reduce, (n-1)/n x payload for all_gather and reduce_scatter, the payload for a send. Scalar
all-reduces (the loss, the gradient norm: 4-8 bytes each) are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from parallel.config import Config, ParallelConfig
from parallel.planner.activations import compute_bytes
from parallel.planner.memory import zero_sizes
from parallel.planner.shapes import rank_stages, stage_rank

Op = Literal["all_reduce", "all_gather", "reduce_scatter", "send", "all_to_all"]


@dataclass(frozen=True)
class Collective:
    """`count` calls per step of one collective over a group of `group` ranks on mesh axis `axis`."""

    axis: str
    op: Op
    payload: int
    count: int
    group: int
    what: str
    hides_behind: Literal["", "compute", "attention"] = ""
    """What it can overlap with: FSDP2's prefetched all-gathers and asynchronous reduce-scatters run beside
    the neighbouring block's compute, as ZeRO 0-2's gradient buckets do beside backward (tp=1, pp=1); ring
    attention posts the next K/V before computing the current block. Everything else blocks the step."""

    @property
    def wire(self) -> float:
        """Bytes this rank sends per call."""
        n = self.group
        factor = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n,
                  "all_to_all": (n - 1) / n}  # fmt: skip
        return self.payload * factor.get(self.op, 1.0)

    @property
    def steps(self) -> int:
        """Latency-bound hops per call (ring)."""
        return {"all_reduce": 2 * (self.group - 1), "send": 1}.get(self.op, self.group - 1)


def collectives(cfg: Config, dtype: str = "fp32", pp_rank: int = 0) -> list[Collective]:
    """Every collective of one step on one rank (of pipeline rank `pp_rank`); see the module docstring."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    out: list[Collective] = []

    def add(axis: str, op: Op, payload: float, count: int, group: int, what: str, hides: str = "") -> None:
        if group > 1 and count > 0 and payload > 0:
            out.append(Collective(axis, op, round(payload), count, group, what, hides))  # type: ignore[arg-type]

    micro = p.microbatches or cfg.grad_accum
    stages = rank_stages(m, p, pp_rank)
    layers = sum(s.n_layers for s in stages)
    n, rep = p.dp_shard, p.dp_replicate
    local, flat, shard, fsdp = zero_sizes(cfg, pp_rank)
    cb = compute_bytes(dtype)
    # Expert parallelism: the routed experts' gradients reduce over the dp_shard / ep ranks holding them
    # (parallel/expert_parallel.py), the rest over dp_shard.
    edp = max(1, n // p.ep)
    experts = sum(s.expert_numel for s in stages) if p.ep > 1 else 0
    e_flat = -(-experts // edp) * edp if p.zero >= 1 else experts
    flat -= e_flat

    # data parallel (and cp, whose ranks average gradients like data-parallel ranks)
    # ZeRO 0-2 reduce in buckets while backward runs where tp=1 and pp=1 (parallel/grad_buckets.py), over
    # the first axis that reduces; the other axes follow after backward.
    buckets = p.tp == 1 and p.pp == 1
    if p.zero in (0, 1):
        first = next((a for a, size in (("dp_shard", n), ("dp_replicate", rep), ("cp", p.cp)) if size > 1), "")
        for axis, size in (("dp_shard", n), ("dp_replicate", rep), ("cp", p.cp)):
            hides = "compute" if buckets and axis == first else ""
            add(axis, "all_reduce", flat * 4, 1, size, "gradients (flat, once per step)", hides)
            add(axis, "all_reduce", e_flat * 4, 1, edp if axis == "dp_shard" else size, "expert gradients")
        if p.zero == 1:
            add("dp_shard", "all_gather", flat * 4, 1, n, "updated parameters")
            add("dp_shard", "all_gather", e_flat * 4, 1, edp, "updated expert parameters")
    elif p.zero == 2:
        hides = "compute" if buckets else ""
        add("dp_shard", "reduce_scatter", flat * 4, micro if p.pp == 1 else 1, n, "gradients into shards", hides)
        add("dp_shard", "reduce_scatter", e_flat * 4, micro if p.pp == 1 else 1, edp, "expert gradients into shards")
        add("dp_replicate", "all_reduce", shard * 4, 1, rep, "gradient shard")
        add("cp", "all_reduce", shard * 4, 1, p.cp, "gradient shard")
        add("dp_shard", "all_gather", flat * 4, 1, n, "updated parameters")
        add("dp_shard", "all_gather", e_flat * 4, 1, edp, "updated expert parameters")
    else:  # FSDP2: one unit per block and one per stage root; fp32 (autocast leaves parameters fp32)
        per_mb = micro if p.pp == 1 else 1  # under pp the stages stay gathered, gradients reduce once
        for s in stages:
            block = sum(x.fsdp_shard(n) for x in s.block) * n * 4
            root = sum(x.fsdp_shard(n) for x in s.root) * n * 4
            gathers = 2 if p.pp == 1 else 1  # forward, and again in backward after resharding
            if s.moe_layers:  # mixture-of-experts blocks: the experts over edp, the rest over dp_shard
                rest = sum(x.fsdp_shard(n) for x in s.moe_block if not x.expert) * n * 4
                mine = sum(x.fsdp_shard(edp) for x in s.moe_block if x.expert) * edp * 4
                for payload, size, what in ((rest, n, "MoE block parameters"), (mine, edp, "expert parameters")):
                    add("dp_shard", "all_gather", payload, gathers * per_mb * s.moe_layers, size, what, "compute")
                    add("dp_shard", "reduce_scatter", payload, per_mb * s.moe_layers, size, f"{what}' gradients",
                        "compute")  # fmt: skip
                    add("dp_replicate", "all_reduce", payload / size, per_mb * s.moe_layers, rep, f"{what}' shards",
                        "compute")  # fmt: skip
                block_layers = s.dense_layers
            else:
                block_layers = s.n_layers
            add("dp_shard", "all_gather", block, gathers * per_mb * block_layers, n, "block parameters", "compute")
            # The root reshards after forward too (reshard_after_forward=True without pp): gathered again in backward.
            add("dp_shard", "all_gather", root, gathers * per_mb, n, "root parameters (embedding, head)", "compute")
            add("dp_shard", "reduce_scatter", block, per_mb * block_layers, n, "block gradients", "compute")
            add("dp_shard", "reduce_scatter", root, per_mb, n, "root gradients", "compute")
            add("dp_replicate", "all_reduce", block / n, per_mb * block_layers, rep, "block gradient shards", "compute")
            add("dp_replicate", "all_reduce", root / n, per_mb, rep, "root gradient shards", "compute")
        add("cp", "all_reduce", fsdp * 4, 1, p.cp, "gradient shards (one call per tensor)")

    # tensor parallel with sequence parallelism: per layer and micro-batch, on (b, T/cp, C) whole
    s_len = t.seq_len // p.cp
    x = t.micro_batch * s_len * m.dim
    tp, per = p.tp, micro * layers
    add("tp", "all_gather", x * 4, 2 * per, tp, "norm outputs before wq/wk/wv and w1/w3 (forward, fp32)")
    add("tp", "reduce_scatter", x * cb, 2 * per, tp, "wo and w2 outputs (forward)")
    add("tp", "reduce_scatter", x * 4, 2 * per, tp, "gradients of the gathered norm outputs (backward)")
    add("tp", "all_gather", x * cb, 2 * per, tp, "gradients of the wo and w2 outputs (backward)")
    if p.activation_checkpointing != "none":  # recompute stops after w2's matmul: its reduce-scatter is not redone
        add("tp", "all_gather", x * 4, 2 * per, tp, "norm outputs again (recomputation)")
        add("tp", "reduce_scatter", x * cb, per, tp, "wo output again (recomputation)")
    if any(s.first for s in stages):
        add("tp", "reduce_scatter", x * 4, micro, tp, "embedding output (forward)")
        add("tp", "all_gather", x * 4, micro, tp, "embedding output gradient (backward)")
    if any(s.last for s in stages):
        add("tp", "all_gather", x * 4, micro, tp, "final norm output before the head (forward)")
        add("tp", "reduce_scatter", x * 4, micro, tp, "its gradient (backward)")
        add("tp", "all_reduce", t.micro_batch * s_len * 4, 3 * micro, tp, "vocab-parallel cross entropy")
    if p.zero < 3:
        norms = 2 * layers + sum(s.last for s in stages)
        times = micro if p.zero == 2 and p.pp == 1 else 1
        add("tp", "all_reduce", m.dim * 4, norms * times, tp, "norm weight gradients (partial sums)")

    # expert parallel: per MoE block and micro-batch, the tokens to their experts and the outputs back in
    # forward (again when recomputed), their gradients in backward; each rank sends its top_k copies of
    # its tokens (whole under tp: every tp rank dispatches all of them), (ep-1)/ep of them off the rank.
    if m.moe is not None and p.ep > 1:
        moe_layers = sum(s.moe_layers for s in stages)
        tokens = t.micro_batch * s_len * m.moe.top_k * m.dim
        calls = (4 + 2 * again_ac(p)) * micro * moe_layers
        add("ep", "all_to_all", tokens * cb, calls, p.ep, "tokens to their experts and back (and gradients)")

    # context parallel: K/V of this rank's tokens, (2, b, Hkv/tp, T/cp, Dh)
    kv = 2 * t.micro_batch * s_len * m.n_kv_heads * m.head_dim / tp
    again = p.activation_checkpointing != "none"  # either mode reruns the attention's communication
    if p.cp_mode == "ring":
        sends = (p.cp - 1) * (2 + again) + p.cp  # forward (and recompute) K/V, backward K/V and dK/dV
        add("cp", "send", kv * 4, sends * per, p.cp, "ring attention K/V and dK/dV blocks (fp32)", "attention")
    else:
        add("cp", "all_gather", kv * cb * p.cp, (1 + again) * per, p.cp, "K/V of the whole sequence")
        add("cp", "reduce_scatter", kv * cb * p.cp, per, p.cp, "dK/dV")

    # pipeline: the fp32 residual stream (b, T/cp/tp, C) between stages on different ranks
    msg = t.micro_batch * s_len * m.dim * 4 / tp
    for s in stages:
        fwd = not s.last and stage_rank(s.index + 1, p) != pp_rank
        bwd = not s.first and stage_rank(s.index - 1, p) != pp_rank
        add("pp", "send", msg, micro * (fwd + bwd), p.pp, f"stage {s.index} activations and gradients")
    return out


def comm_bytes(cfg: Config, dtype: str = "fp32", pp_rank: int = 0, kind: str = "payload") -> dict[str, int]:
    """Bytes per step per mesh axis for one rank: the sum of `collectives` payloads (kind="payload"), or of
    what the rank sends under ring algorithms (kind="wire"). Axes without traffic are absent."""
    out: dict[str, float] = {}
    for c in collectives(cfg, dtype, pp_rank):
        out[c.axis] = out.get(c.axis, 0) + (c.payload if kind == "payload" else c.wire) * c.count
    return {k: round(v) for k, v in out.items()}


def again_ac(p: ParallelConfig) -> bool:
    """Whether activation checkpointing reruns a block's forward (and its communication) in backward."""
    return p.activation_checkpointing != "none"
