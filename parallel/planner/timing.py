"""Time per step: compute at a stated efficiency, the pipeline bubble, communication per mesh axis over
the link the placement gives it, and the optimizer; then tokens/s, MFU and the bottleneck.

    from parallel.config import build_config
    from parallel.planner import Cluster, predict
    cfg = build_config({"model": {"preset": "8b"}, "parallel": {"tp": 8, "zero": 1},
                        "train": {"global_batch": 64, "micro_batch": 1, "seq_len": 8192}}, world_size=64)
    print(predict(cfg, Cluster.parse("8x8xh100-80gb")).explain())
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from parallel.config import Config
from parallel.planner.comms import collectives, comm_bytes
from parallel.planner.hardware import Cluster, GiB, axis_links
from parallel.planner.memory import peak_memory, zero_sizes
from parallel.planner.shapes import (
    block_tensors,
    flops_per_token,
    moe_layer_flops,
    rank_stages,
    stage_flops,
    stage_rank,
)

DEFAULT_EFFICIENCY = 0.55
"""Fraction of the dense peak the matmuls reach (kernel efficiency, not counting anything modelled here)."""
CPU_EFFICIENCY = 0.6
"""Share of the measured matmul peak a CPU rank's training step reaches: bench/planner_bench.py found the
predictions 1.4-1.7x fast at 1.0 (the model's matmuls are smaller than the 1024 x 1024 probe, and norms,
activations, RoPE, the loss and AdamW's elementwise work are no matmuls)."""
DEFAULT_COMM_EFFICIENCY = 0.8
"""Fraction of the nominal link bandwidth a ring collective reaches (bus bandwidth over link rate)."""
DEFAULT_MARGIN = 0.1
"""Memory held back for fragmentation and whatever the model misses."""


def bubble_fraction(schedule: str, pp: int, microbatches: int, pp_virtual: int = 1) -> float:
    """Idle share of a pipeline step when forward, backward-input and backward-weight work take equal time:
    (p-1)/(m+p-1) for gpipe and 1f1b; (p-1)/(v m + p-1) for interleaved_1f1b (a rank's v chunks each
    1/v of its layers); (p-1)/(6m + p-1) for zbv, whose V order leaves each rank idle for p-1 chunk
    operations out of 6m (F, I and W of two chunks per micro-batch), as simulating torch's own
    ScheduleZBVZeroBubble order shows (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", ZB-V)."""
    if pp == 1:
        return 0.0
    m, p = microbatches, pp
    if schedule == "zbv":
        return (p - 1) / (6 * m + p - 1)
    v = pp_virtual if schedule == "interleaved_1f1b" else 1
    return (p - 1) / (v * m + p - 1)


def bubble_time(schedule: str, pp: int, pp_virtual: int, fwd: float, bwd_input: float, bwd_weight: float) -> float:
    """Seconds a rank idles per step, given one micro-batch's forward, input-gradient and weight-gradient
    time on one rank (all its layers): (p-1)(F + B) for gpipe and 1f1b, divided by v when interleaved;
    for zbv (p-1) max(F, I) / 2, a chunk being half the rank's layers. For zbv this is what an event
    simulation of torch's own zbv order gives when I is the longest step, as the FLOP split here always
    has it (I = W + twice the attention's forward); with F or W the longest it reads 10-45% low."""
    if pp == 1:
        return 0.0
    if schedule == "zbv":
        return (pp - 1) * max(fwd, bwd_input) / 2
    v = pp_virtual if schedule == "interleaved_1f1b" else 1
    return (pp - 1) * (fwd + bwd_input + bwd_weight) / v


def compute_dtype(cfg: Config, cluster: Cluster) -> str:
    """The engine's rule (`parallelize.compute_dtype`): auto is bf16 on an accelerator, fp32 on CPU."""
    if cfg.train.dtype == "auto":
        return "fp32" if cluster.accelerator.kind == "cpu" else "bf16"
    return "bf16" if cfg.train.dtype == "bfloat16" else "fp32"


def describe(cfg: Config) -> str:
    """A layout in one line: `dp8(r2) tp4 pp2:1f1b cp1 zero1 ac:none mb2`."""
    p = cfg.parallel
    rep = f"(r{p.dp_replicate})" if p.dp_replicate > 1 else ""
    sched = f":{p.pp_schedule}" + (f"x{p.pp_virtual}" if p.pp_virtual > 1 else "") if p.pp > 1 else ""
    cp = f" cp{p.cp}" + (":allgather" if p.cp_mode == "allgather" and p.cp > 1 else "")
    ep = f" ep{p.ep}" if p.ep > 1 else ""
    return (f"dp{p.dp}{rep}{ep} tp{p.tp} pp{p.pp}{sched}{cp} zero{p.zero} ac:{p.activation_checkpointing} "
            f"mb{cfg.train.micro_batch}")  # fmt: skip


def size(n: float) -> str:
    """Bytes for people: `1.5 TiB`, `1.23 GiB`, `45.6 MiB`, `789 KiB`."""
    for unit, scale in (("TiB", 2**40), ("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


@dataclass
class Prediction:
    """What one layout costs on one cluster. Bytes, seconds, tokens per second."""

    layout: str
    world: int
    dtype: str
    fits: bool
    memory: dict[str, int]
    """The peak phase's items (`planner.memory`), with its total."""
    memory_phase: str
    capacity_bytes: int
    usable_bytes: int
    """capacity x (1 - margin): what the peak must stay under."""
    time: dict[str, float]
    """Seconds per step: compute, recompute, bubble, comm_<axis> (exposed), optimizer."""
    step_time_s: float
    tokens_per_s: float
    mfu: float
    bottleneck: str
    """The largest time term ("compute", "recompute", "bubble", "<axis> communication", "optimizer"), or
    "memory" when the layout does not fit."""
    bottleneck_share: float
    """The largest time term's share of the step."""
    bubble_fraction: float
    comm_bytes: dict[str, int]
    """Wire bytes per step per axis on the slowest rank."""
    links: dict[str, str]
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def explain(self) -> str:
        """The prediction as a few lines a person reads."""
        mem = ", ".join(f"{k} {size(v)}" for k, v in self.memory.items() if v and k != "total")
        tim = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in self.time.items() if v > 0)
        fit = "fits" if self.fits else "does NOT fit"
        lines = [
            f"{self.layout} on {self.world} devices ({self.dtype})",
            f"  memory: {size(self.memory['total'])} at the {self.memory_phase} peak, {fit} in "
            f"{size(self.usable_bytes)} usable of {size(self.capacity_bytes)} ({mem})",
            f"  step: {self.step_time_s * 1e3:.4g} ms = {tim}",
            f"  {self.tokens_per_s:,.0f} tokens/s, MFU {self.mfu:.1%}, bottleneck: {self.bottleneck}",
            f"  links: {', '.join(f'{a} {lk}' for a, lk in self.links.items()) or 'none'}",
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _rates(cfg: Config, cluster: Cluster, efficiency: float) -> tuple[float, float, float]:
    """(peak TFLOP/s of the compute dtype, FLOP/s the matmuls reach, seconds-per-FLOP factor of attention).

    The model FLOPs count the full score matrix; a causal kernel computes about half of it (SDPA's flash
    and memory-efficient kernels skip the blocks above the diagonal), the attention factor 0.5. Ring
    attention (cp > 1, cp_mode ring) computes its blocks in fp32 whatever the autocast dtype, so on an
    accelerator its FLOPs go at the fp32 peak; it skips the blocks the causal mask hides, (2cp+1)/(4cp) of
    the full matrix."""
    acc, p = cluster.accelerator, cfg.parallel
    key = compute_dtype(cfg, cluster) if acc.kind != "cpu" else "fp32"
    peak = acc.peak_tflops.get(key)
    if peak is None:
        raise ValueError(f"{acc.name} has no {key} peak in the table; give the accelerator one")
    slow = 0.5  # SDPA's causal kernels skip the blocks above the diagonal: half the score matrix
    if p.cp > 1 and p.cp_mode == "ring":
        slow = (2 * p.cp + 1) / (4 * p.cp) * peak / (acc.peak_tflops.get("fp32") or peak)
    return peak, peak * 1e12 * efficiency, slow


def _rank_seconds(cfg: Config, pp_rank: int, rate: float, slow: float) -> tuple[float, float, float, float, float]:
    """This rank's compute seconds per step: (forward, input-gradient, weight-gradient, recompute, attention),
    weights at `rate`, attention `slow` times slower; the backward of attention is twice its forward."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    tokens = t.global_batch // p.dp * (t.seq_len // p.cp)
    weights = attention = rec = 0.0
    block = sum(x.numel for x in block_tensors(m, 1))
    per_layer_attention = 12.0 * m.n_heads * m.head_dim * t.seq_len * tokens / p.tp
    for s in rank_stages(m, p, pp_rank):
        a = s.n_layers * per_layer_attention
        weights += stage_flops(m, s, t.seq_len, p.tp) * tokens - a
        attention += a
        if p.activation_checkpointing == "full":  # the block's forward again (norms and head are not wrapped)
            rec += s.dense_layers * 2.0 * block * tokens / p.tp + s.n_layers * per_layer_attention / 3 * slow
            if s.moe_layers:  # a mixture-of-experts block's forward: 1/3 of its training FLOPs
                moe_attention, moe_rest = moe_layer_flops(m)
                rec += s.moe_layers * (moe_attention / p.tp + moe_rest) / 3 * tokens
    w, a = weights / rate, attention * slow / rate
    return w / 3 + a / 3, w / 3 + 2 * a / 3, w / 3, rec / rate, a


def min_step_time(cfg: Config, cluster: Cluster, efficiency: float = DEFAULT_EFFICIENCY) -> float:
    """A lower bound of `predict`'s step time: the busiest rank's compute and recompute plus the bubble,
    as if communication and the optimizer took no time."""
    p = cfg.parallel
    _, rate, slow = _rates(cfg, cluster, efficiency)
    micro = p.microbatches or cfg.grad_accum
    best = 0.0
    for r in range(p.pp):
        fwd, bin_, wgt, rec, _ = _rank_seconds(cfg, r, rate, slow)
        bubble = bubble_time(p.pp_schedule, p.pp, p.pp_virtual, fwd / micro, (bin_ + rec) / micro, wgt / micro)
        best = max(best, fwd + bin_ + wgt + rec + bubble)
    return best


def predict(
    cfg: Config,
    cluster: Cluster,
    efficiency: float = DEFAULT_EFFICIENCY,
    comm_efficiency: float = DEFAULT_COMM_EFFICIENCY,
    overlap: dict[str, float] | None = None,
    margin: float = DEFAULT_MARGIN,
    peak: tuple[dict[str, int], str, int] | None = None,
) -> Prediction:
    """Memory, step time, throughput and MFU of a checked config on a cluster.

    Compute: this rank's model FLOPs (plus full checkpointing's second forward of every block; selective
    recomputes no matmul) over peak x `efficiency`; ring attention's at the fp32 peak (`_rates`).
    Communication: per axis, the wire bytes of `collectives` over the link `axis_links` gives that axis,
    at `comm_efficiency`, plus a latency per ring hop; collectives that can hide (FSDP2's behind compute,
    ring attention's behind the attention computation) hide up to `overlap[axis]` of themselves, at most
    as long as what hides them (default 1.0 for dp_shard, dp_replicate and cp on an accelerator, 0 on CPU,
    where a rank's one thread runs its transfers as well; 0 for tp and pp, whose DTensor and pipeline
    transfers block). Optimizer: AdamW reads and writes 32 bytes per owned element
    at memory bandwidth. Step = the slowest pp rank's sum plus the bubble. `peak`: what
    `planner.memory.peak_memory` answers, when the caller has it already."""
    acc = cluster.accelerator
    dtype = compute_dtype(cfg, cluster)
    tflops, rate, slow = _rates(cfg, cluster, efficiency)
    p = cfg.parallel
    links = axis_links(p, cluster)
    hides = 0.0 if acc.kind == "cpu" else 1.0  # a CPU rank's one thread runs its transfers too
    hide = {"dp_shard": hides, "dp_replicate": hides, "cp": hides, "tp": 0.0, "pp": 0.0, "ep": 0.0} | (overlap or {})
    micro = p.microbatches or cfg.grad_accum
    worst: tuple[float, dict[str, float], int] = (-1.0, {}, 0)
    bubble = 0.0
    seen = set()
    for r in range(p.pp):
        stages = rank_stages(cfg.model, p, r)
        shape = tuple(
            (s.n_layers, s.first, s.last, not s.last and stage_rank(s.index + 1, p) != r,
             not s.first and stage_rank(s.index - 1, p) != r) for s in stages
        )  # fmt: skip
        if shape in seen:
            continue  # same work and traffic as a rank already counted
        seen.add(shape)
        fwd, bin_, wgt, rec, att = _rank_seconds(cfg, r, rate, slow)
        times = {"compute": fwd + bin_ + wgt, "recompute": rec}
        hideable: dict[tuple[str, str], float] = {}
        for c in collectives(cfg, dtype, r):
            link = links.get(c.axis, "intra")
            sec = c.count * (c.wire / (cluster.bandwidth(link) * comm_efficiency) + c.steps * cluster.latency(link))
            times[f"comm_{c.axis}"] = times.get(f"comm_{c.axis}", 0.0) + sec
            if c.hides_behind:
                hideable[c.axis, c.hides_behind] = hideable.get((c.axis, c.hides_behind), 0.0) + sec
        for (axis, behind), sec in hideable.items():  # an axis's transfers share the compute that hides them
            cover = fwd + bin_ + wgt + rec if behind == "compute" else att
            times[f"comm_{axis}"] -= min(hide.get(axis, 0.0) * sec, cover)
        local, _, shard, fsdp = zero_sizes(cfg, r)
        owned = {0: local, 1: shard, 2: shard, 3: fsdp}[p.zero]
        times["optimizer"] = owned * 32 / (acc.hbm_gbps * 1e9)
        b = bubble_time(p.pp_schedule, p.pp, p.pp_virtual, fwd / micro, (bin_ + rec) / micro, wgt / micro)
        if sum(times.values()) > worst[0]:
            worst, bubble = (sum(times.values()), times, r), b
    _, times, rank = worst
    times = {"compute": times["compute"], "recompute": times["recompute"], "bubble": bubble} | {
        k: v for k, v in times.items() if k not in ("compute", "recompute")
    }
    step = sum(times.values())
    tokens_per_s = cfg.train.global_batch * cfg.train.seq_len / step
    mfu = tokens_per_s * flops_per_token(cfg.model, cfg.train.seq_len) / (p.world_size * tflops * 1e12)
    mem, phase, _ = peak or peak_memory(cfg, dtype, acc.runtime_bytes)
    usable = int(acc.memory_bytes * (1 - margin))
    fits = mem["total"] <= usable
    top = max(times, key=lambda k: times[k])
    bottleneck = "memory" if not fits else f"{top[5:]} communication" if top.startswith("comm_") else top
    notes = []
    if p.world_size > cluster.world:
        notes.append(f"the layout needs {p.world_size} devices; the cluster has {cluster.world}")
    if not fits:
        notes.append(f"needs {mem['total'] / GiB:.1f} GiB, {usable / GiB:.1f} GiB usable")
    return Prediction(
        layout=describe(cfg), world=p.world_size, dtype=dtype, fits=fits, memory=mem,
        memory_phase=phase, capacity_bytes=acc.memory_bytes,
        usable_bytes=usable, time=times, step_time_s=step, tokens_per_s=tokens_per_s, mfu=mfu,
        bottleneck=bottleneck, bottleneck_share=times[top] / step if step else 0.0,
        bubble_fraction=bubble / step if step else 0.0, comm_bytes=comm_bytes(cfg, dtype, rank, kind="wire"),
        links=links, notes=notes,
    )  # fmt: skip
