"""Memory per rank: model state under each ZeRO stage, and the peak of a step, itemised.

The engine keeps fp32 weights (they are the master weights: bf16 runs under autocast), fp32 gradients
and AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes per parameter before sharding, whatever the compute
dtype. The bf16 copies autocast makes are activations (`activation_bytes`: low_precision_weights).
"""

from __future__ import annotations

import math

from parallel.config import Config
from parallel.planner.activations import inflight, rank_activations, unit_bytes
from parallel.planner.shapes import rank_stages

PARAM, GRAD, ADAM = 4, 4, 8  # bytes per element: fp32 weights, fp32 gradients, exp_avg + exp_avg_sq


def zero_paper_bytes(psi: float, nd: int, stage: int, k: int = 12) -> float:
    """Model-state bytes per device in Rajbhandari et al. 2020 ("ZeRO", Section 3 and Figure 1) for mixed
    precision Adam: fp16 parameters (2 psi), fp16 gradients (2 psi), K psi of fp32 optimizer state (master
    weights, momentum, variance: K = 12). Stage 0 keeps all, 1 (P_os) shards the K psi over Nd devices,
    2 (P_os+g) the gradients too, 3 (P_os+g+p) everything."""
    p, g, o = 2 * psi, 2 * psi, k * psi
    return {0: p + g + o, 1: p + g + o / nd, 2: p + (g + o) / nd, 3: (p + g + o) / nd}[stage]


def zero_sizes(cfg: Config, pp_rank: int) -> tuple[int, int, int, int]:
    """(P, flat padded, flat shard S, FSDP2 shard) in elements for this rank's tensors."""
    p = cfg.parallel
    n = p.dp_shard
    stages = rank_stages(cfg.model, p, pp_rank)
    local = sum(s.numel for s in stages)
    fsdp = sum(s.fsdp_numel(n) for s in stages)
    if p.zero == 0:
        return local, local, local, fsdp
    # Under expert parallelism the routed experts are a second flat vector, sharded over dp_shard / ep.
    experts = sum(s.expert_numel for s in stages) if p.ep > 1 else 0
    shard = math.ceil((local - experts) / n)
    flat = shard * n
    if experts:
        edp = max(1, n // p.ep)
        shard += math.ceil(experts / edp)
        flat += math.ceil(experts / edp) * edp
    return local, flat, shard, fsdp


def state_bytes(cfg: Config, pp_rank: int = 0) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states one rank holds at their peak inside a step,
    the convention of tests/dist/test_memory.py (P = this rank's parameters x 4 bytes: its tp shard of
    its pipeline stages; N = dp_shard; S = ceil(P/N), the flat shard, padded):

    zero 0: P, P, 2P. zero 1: P, P, 2S. zero 2: P, P + S (each backward produces whole gradients before
    reducing them into the shard S), 2S. zero 3 (FSDP2, each tensor's dim 0 padded to a multiple of N):
    P/N, P/N, 2P/N without pipelining (blocks are gathered one at a time: see `memory`'s zero3_unsharded);
    with pipelining the stages stay gathered all step and their gradients unsharded until the reduction,
    so P + P/N, P, 2P/N.
    HSDP divides by dp_shard only; cp never shards state.

    Measured (tests/dist/test_planner_measured.py) and counted so: under pipelining, ZeRO-3's gradients
    peak at P, not P + P/N (the unsharded ones are freed group by group as the sharded ones are made);
    and with tp > 1 outside ZeRO-3, a rank holding the vocab-parallel embedding has its whole V x C
    gradient (Replicate after backward) until the engine cuts it to its shard, so V*C*(1 - 1/tp) more."""
    local, _, shard, fsdp = zero_sizes(cfg, pp_rank)
    out = _state(cfg.parallel.zero, cfg.parallel.pp, local, shard, fsdp)
    p, m = cfg.parallel, cfg.model
    holds_embedding = any(s.first for s in rank_stages(m, p, pp_rank))
    if p.tp > 1 and p.zero != 3 and holds_embedding:
        out["grads"] += (m.vocab_size * m.dim - m.vocab_size // p.tp * m.dim) * GRAD
    return out


def _state(zero: int, pp: int, local: int, shard: int, fsdp: int) -> dict[str, int]:
    if zero == 3:
        whole = local if pp > 1 else 0
        elems = (whole + fsdp, whole or fsdp, fsdp)  # gradients: P under pipelining, else P/N
    elif zero == 2:
        elems = (local, local + shard, shard)
    else:
        elems = (local, local, shard if zero == 1 else local)
    return {"params": elems[0] * PARAM, "grads": elems[1] * GRAD, "optimizer": elems[2] * ADAM}


def memory_phases(
    cfg: Config, dtype: str = "fp32", pp_rank: int = 0, runtime_bytes: int = 0
) -> dict[str, dict[str, int]]:
    """Bytes one rank holds at three moments of a step, itemised, each with its "total":

    backward (activations at their peak): params, optimizer, the gradients present then (whole at zero 0-1
    and under pipelining; at zero 2 the shard plus the whole gradients as they outgrow the freed
    activations; at zero 3 the shard plus one block's unsharded gradient), activations
    (`activation_bytes` total), zero3_unsharded (without pipelining: two gathered blocks, the one computing
    and the one prefetched, and the root part, embedding and head, gathered for the whole micro-batch;
    fp32), backward_workspace (the gradients of one layer's intermediate tensors, about one layer kept
    without checkpointing, plus with checkpointing the part of the layer it rematerialises), logits_loss
    (the fp32 gradients of the log-probs and logits of one micro-batch, 8 bytes per logit; 10 under bf16,
    for the forward's fp32 copy of the bf16 logits);
    reduce (after the last backward): gradients at their peak and comm_buffers, the flat vector ZeRO 0-2
    packs the gradients into to reduce them (at zero 2 also the new shard);
    step (the update): comm_buffers of the all-gather of updated parameters (zero 1-2: the shard and the
    whole flat vector) and optimizer_step temporaries (one fp32 element per owned element for torch's
    foreach AdamW on GPU; the largest tensor on CPU, where AdamW goes tensor by tensor).

    runtime (`runtime_bytes`, the accelerator's stated constant) is in every phase."""
    return rank_phases(cfg, dtype, pp_rank, runtime_bytes, unit_bytes(cfg, dtype))


def rank_phases(cfg: Config, dtype: str, pp_rank: int, runtime_bytes: int, units: dict[str, float]) -> dict:
    """`memory_phases` of one pp rank, from `unit_bytes` computed once per config."""
    p = cfg.parallel
    local, flat, shard, fsdp = zero_sizes(cfg, pp_rank)
    state = _state(p.zero, p.pp, local, shard, fsdp)
    acts = rank_activations(cfg, pp_rank, dtype, units)
    stages = rank_stages(cfg.model, p, pp_rank)
    logits = (
        units["tokens"] * cfg.model.vocab_size / p.tp * (10 if dtype == "bf16" else 8) * any(x.last for x in stages)
    )
    block = stages[0].block_numel * PARAM
    unsharded = 2 * block + sum(x.root_numel for x in stages) * PARAM if p.zero == 3 and p.pp == 1 else 0
    if p.zero == 3:
        grads_bwd = state["grads"] + (block if p.pp == 1 else 0)
    elif p.zero == 2 and p.pp == 1:
        grads_bwd = shard * GRAD + max(0, local * GRAD - acts["total"])
    else:
        grads_bwd = local * GRAD
    base = {"params": state["params"], "optimizer": state["optimizer"]}
    workspace = max(2 * units[f"{kind}_none"] - units[kind] for kind in _layer_kinds(stages))
    backward = base | {
        "grads": grads_bwd, "activations": acts["total"], "zero3_unsharded": unsharded,
        "backward_workspace": round(workspace), "logits_loss": round(logits),
    }  # fmt: skip
    reduce_buf = {0: flat, 1: flat, 2: flat + shard, 3: 0}[p.zero] * GRAD
    if p.zero < 2 and p.dp * p.cp == 1:
        reduce_buf = 0  # nothing to reduce: ZeRO 0-1 skip the pack (ZeRO 2 packs even alone)
    reduce = base | {"grads": state["grads"], "comm_buffers": reduce_buf}
    gather = (shard + flat) * PARAM if p.zero in (1, 2) and p.dp_shard > 1 else 0
    owned = fsdp if p.zero == 3 else shard
    largest = max(st.largest for st in stages)
    step_tmp = (owned if dtype == "bf16" else min(owned, largest)) * 4
    grads_step = state["grads"] - (local * GRAD if p.zero == 2 else 0)  # zero 2 dropped the whole ones
    step = base | {"grads": grads_step, "comm_buffers": gather, "optimizer_step": step_tmp}
    phases = {"backward": backward, "reduce": reduce, "step": step}
    return {
        k: {**v, "runtime": runtime_bytes, "total": int(sum(v.values()) + runtime_bytes)} for k, v in phases.items()
    }


def _layer_kinds(stages: tuple) -> list[str]:
    """Which of `unit_bytes`' layer kinds the stages have ("layer": dense, "moe_layer")."""
    kinds = {kind for st in stages for kind, n in (("layer", st.dense_layers), ("moe_layer", st.moe_layers)) if n}
    return sorted(kinds) or ["layer"]


ITEMS = ("params", "grads", "optimizer", "activations", "zero3_unsharded", "backward_workspace", "logits_loss",
         "comm_buffers", "optimizer_step", "runtime")  # fmt: skip


def memory(cfg: Config, dtype: str = "fp32", pp_rank: int | None = None, runtime_bytes: int = 0) -> dict[str, int]:
    """The largest phase of `memory_phases` (over pp ranks when pp_rank is None), every item in `ITEMS`
    (0 where that phase has none) and its "total", the peak bytes the rank needs."""
    return peak_memory(cfg, dtype, runtime_bytes, pp_rank)[0]


def peak_memory(
    cfg: Config, dtype: str = "fp32", runtime_bytes: int = 0, pp_rank: int | None = None
) -> tuple[dict[str, int], str, int]:
    """(`memory`'s items, the phase, the pp rank) where the peak falls."""
    p = cfg.parallel
    best: tuple[dict[str, int], str, int] = ({"total": -1}, "backward", 0)
    units = unit_bytes(cfg, dtype)
    seen = set()
    for r in range(p.pp) if pp_rank is None else [pp_rank]:
        # ranks holding stages of the same shape with as many micro-batches in flight need the same memory
        shape = (tuple((s.first, s.last, s.n_layers) for s in rank_stages(cfg.model, p, r)), str(inflight(cfg, r)))
        if shape in seen:
            continue
        seen.add(shape)
        for name, phase in rank_phases(cfg, dtype, r, runtime_bytes, units).items():
            if phase["total"] > best[0]["total"]:
                best = ({k: int(phase.get(k, 0)) for k in ITEMS} | {"total": phase["total"]}, name, r)
    return best
