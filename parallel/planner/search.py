"""Search every layout the engine accepts on a cluster, and rank them by the usual recipe: first fit in
memory (with a margin), then run the target global batch, then maximise throughput.

Candidates are real Configs: each is built from the job's config with the layout's fields and passed
through `parallel.config.check` with the cluster's world size, so only layouts the engine would start
are returned; tp never exceeds a node (the placement rule).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from parallel.config import Config, ConfigError, ParallelConfig, check
from parallel.planner.hardware import Accelerator, Cluster
from parallel.planner.memory import memory, peak_memory
from parallel.planner.timing import (
    DEFAULT_COMM_EFFICIENCY,
    DEFAULT_EFFICIENCY,
    DEFAULT_MARGIN,
    Prediction,
    compute_dtype,
    min_step_time,
    predict,
    size,
)

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zbv")
CHECKPOINTING = ("none", "selective", "full")


@dataclass
class Candidate:
    """One layout, its prediction, and why it ranks where it does."""

    config: Config
    prediction: Prediction
    reaches_target: bool
    """Runs exactly the job's train.global_batch (else the nearest global batch the layout can run)."""
    rank: int = 0
    reasons: list[str] = field(default_factory=list)

    def sort_key(self) -> tuple[bool, bool, float]:
        return (self.prediction.fits, self.reaches_target, self.prediction.tokens_per_s)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(
    cfg: Config,
    world: int,
    per_node: int,
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    checkpointing: tuple[str, ...] = CHECKPOINTING,
    schedules: tuple[str, ...] = SCHEDULES,
    micro_batches: tuple[int, ...] | None = None,
) -> Iterator[tuple[Config, bool]]:
    """Every (config, reaches_target) that `check` accepts at this world size, tp <= per_node."""
    for _, _, target, group in _groups(cfg, world, per_node, zero_stages, checkpointing, schedules, micro_batches):
        for c in group:
            yield c, target


def _groups(
    cfg: Config,
    world: int,
    per_node: int,
    zero_stages: tuple[int, ...],
    checkpointing: tuple[str, ...],
    schedules: tuple[str, ...],
    micro_batches: tuple[int, ...] | None,
    fixed: Mapping[str, Any] | None = None,
) -> Iterator[tuple[tuple, int, bool, list[Config]]]:
    """(layout key, micro_batch, reaches_target, configs in `checkpointing` order) for every layout,
    micro-batches ascending within a key; `fixed` holds axes (dp, tp, pp, cp, dp_replicate) to keep."""
    n_layers, gb = cfg.model.n_layers, cfg.train.global_batch
    keep = dict(fixed or {})

    def free(axis: str, value: int) -> bool:
        return axis not in keep or keep[axis] == value

    for tp in (d for d in _divisors(world) if d <= per_node and free("tp", d)):
        for cp in (d for d in _divisors(world // tp) if free("cp", d)):
            for pp in (d for d in _divisors(world // (tp * cp)) if d <= n_layers and free("pp", d)):
                dp = world // (tp * cp * pp)
                if not free("dp", dp):
                    continue
                target = gb % dp == 0
                batch = gb if target else max(dp, round(gb / dp) * dp)
                for sched, virtual in _schedules(pp, n_layers, schedules):
                    for rep, ep in _replicas_and_experts(cfg, dp, free):
                        for zero in zero_stages:
                            if (rep > 1 and zero == 0) or (dp == 1 and zero > 0 and 0 in zero_stages):
                                continue  # HSDP needs a ZeRO stage; over one dp rank every stage is ZeRO 0
                            for mb in _divisors(batch // dp):
                                if micro_batches is not None and mb not in micro_batches:
                                    continue
                                base = _build(cfg, world, tp, cp, pp, dp, rep, zero, sched, virtual, mb, batch, ep)
                                if base is None:
                                    continue
                                group = []
                                for ac in checkpointing:
                                    par = base.parallel.model_copy(update={"activation_checkpointing": ac})
                                    group.append(base.model_copy(update={"parallel": par}))
                                yield (tp, cp, pp, dp, sched, virtual, rep, zero, ep), mb, target, group


def kept_fields(cfg: Config) -> dict[str, Any]:
    """The layout fields a search keeps for `cfg`: none when its plan.auto is empty (plan every layout),
    else every layout field that plan.auto does not name, at the spec's value."""
    auto = set(cfg.plan.auto)
    if not auto:
        return {}
    p = cfg.parallel
    fields = {"dp": p.dp, "tp": p.tp, "pp": p.pp, "cp": p.cp, "zero": p.zero, "dp_replicate": p.dp_replicate,
              "ep": p.ep,
              "pp_schedule": p.pp_schedule, "activation_checkpointing": p.activation_checkpointing,
              "micro_batch": cfg.train.micro_batch}  # fmt: skip
    return {k: v for k, v in fields.items() if k not in auto}


def _replicas_and_experts(cfg: Config, dp: int, free: Any) -> Iterator[tuple[int, int]]:
    """(dp_replicate, ep) pairs: every HSDP replica count, and for a mixture-of-experts model every ep that
    divides both the dp_shard ranks and n_experts (1 for a dense model)."""
    moe = cfg.model.moe
    for rep in (r for r in _divisors(dp) if free("dp_replicate", r)):
        eps = [e for e in _divisors(dp // rep) if moe.n_experts % e == 0] if moe is not None else [1]
        yield from ((rep, e) for e in eps if free("ep", e))


def _schedules(pp: int, n_layers: int, schedules: tuple[str, ...]) -> Iterator[tuple[str, int]]:
    if pp == 1:
        yield "1f1b", 1
        return
    for s in schedules:
        if s in ("gpipe", "1f1b"):
            yield s, 1
        elif s == "zbv" and 2 * pp <= n_layers:
            yield s, 2
        elif s == "interleaved_1f1b":
            yield from ((s, v) for v in (2, 4) if pp * v <= n_layers)


def _build(cfg: Config, world: int, tp: int, cp: int, pp: int, dp: int, rep: int, zero: int, sched: str,
           virtual: int, mb: int, batch: int, ep: int = 1) -> Config | None:  # fmt: skip
    fields = cfg.parallel.model_dump(exclude={"dp", "tp", "pp", "cp", "zero", "dp_replicate", "pp_schedule",
                                              "pp_virtual", "microbatches", "dp_min", "ep"})  # fmt: skip
    try:
        par = ParallelConfig(**fields, dp=dp, tp=tp, pp=pp, cp=cp, zero=zero, dp_replicate=rep, pp_schedule=sched,
                             pp_virtual=virtual, ep=ep)  # fmt: skip
        train = cfg.train.model_copy(update={"micro_batch": mb, "global_batch": batch})
        return check(cfg.model_copy(update={"parallel": par, "train": train}), world_size=world)
    except (ConfigError, ValueError):
        return None


def search(
    cfg: Config,
    cluster: Cluster,
    efficiency: float = DEFAULT_EFFICIENCY,
    comm_efficiency: float = DEFAULT_COMM_EFFICIENCY,
    margin: float = DEFAULT_MARGIN,
    top: int = 10,
    zero_stages: tuple[int, ...] = (0, 1, 2, 3),
    checkpointing: tuple[str, ...] = CHECKPOINTING,
    schedules: tuple[str, ...] = SCHEDULES,
    micro_batches: tuple[int, ...] | None = None,
    dominated: bool = False,
    fixed: Mapping[str, Any] | None = None,
) -> list[Candidate]:
    """The `top` best layouts for the whole cluster, best first, each with its reasons.

    Every layout `layouts` yields is considered; for each, the least recomputation that fits (none, then
    selective, then full: less recomputation is never slower) is the one ranked. Layouts that do not fit
    (peak > capacity x (1 - margin)) are dropped, unless none fits: then the `top` nearest to fitting come
    back, marked, so the answer says how far off the job is. Unless `dominated`, a layout is left out
    when one ranked above it needs no more memory, so each layout after the first is slower but leaves
    more room (HSDP variants of a layout, which here only cost memory, are never listed behind it).

    `fixed` keeps layout fields at the given values (`kept_fields`: those of a spec's layout that its
    plan.auto does not leave to the planner): axes, zero, pp_schedule, activation_checkpointing,
    micro_batch."""
    keep = dict(fixed or {})
    zero_stages = tuple(z for z in zero_stages if "zero" not in keep or z == keep["zero"])
    checkpointing = tuple(m for m in checkpointing if keep.get("activation_checkpointing", m) == m)
    schedules = tuple(x for x in schedules if keep.get("pp_schedule", x) == x)
    if "micro_batch" in keep:
        micro_batches = tuple(m for m in micro_batches or (keep["micro_batch"],) if m == keep["micro_batch"])
    dtype = compute_dtype(cfg, cluster)
    acc = cluster.accelerator
    usable = acc.memory_bytes * (1 - margin)
    fitting: list[tuple[Config, bool, tuple]] = []
    nearest: list[tuple[float, Config, bool, tuple]] = []
    too_big: set[tuple] = set()
    # Within a layout, less recomputation is never slower, and memory grows with the micro-batch: take
    # the first checkpointing mode (in `checkpointing` order) that fits, and once even the last does
    # not fit, skip the layout's larger micro-batches.
    order = [m for m in CHECKPOINTING if m in checkpointing]
    groups = _groups(cfg, cluster.world, cluster.per_node, zero_stages, tuple(order), schedules, micro_batches, keep)
    for key, _mb, target, group in groups:
        if key in too_big:
            continue
        for c in group:
            peak = peak_memory(c, dtype, acc.runtime_bytes)
            if peak[0]["total"] <= usable:
                fitting.append((c, target, peak))
                break
            if not fitting:
                nearest.append((peak[0]["total"], c, target, peak))
        else:
            too_big.add(key)
    if not fitting:  # the nearest misses, least memory first
        found = [Candidate(c, predict(c, cluster, efficiency, comm_efficiency, None, margin, pk), t)
                 for _, c, t, pk in sorted(nearest, key=lambda x: x[0])[:top]]  # fmt: skip
        return _ranked(found, cfg.train.global_batch)
    # Predict in order of the best each could do (compute and bubble only); stop once that bound cannot
    # beat the `top`-th prediction so far: the ranking is exact, only hopeless layouts go unpredicted.
    bound = [(t, c.train.global_batch * c.train.seq_len / max(min_step_time(c, cluster, efficiency), 1e-30), c, pk)
             for c, t, pk in fitting]  # fmt: skip
    bound.sort(key=lambda x: (x[0], x[1]), reverse=True)
    found: list[Candidate] = []
    for target, best_rate, c, pk in bound:
        if len(found) >= top and (target, best_rate) < found[-1].sort_key()[1:]:
            break
        found.append(Candidate(c, predict(c, cluster, efficiency, comm_efficiency, None, margin, pk), target))
        found.sort(key=Candidate.sort_key, reverse=True)
        if not dominated:
            found = _undominated(found)
        del found[top:]
    return _ranked(found, cfg.train.global_batch)


def _ranked(found: list[Candidate], target: int) -> list[Candidate]:
    for i, cand in enumerate(found):
        cand.rank = i + 1
        cand.reasons = _reasons(cand, found[0], target)
    return found


def _undominated(ranked: list[Candidate]) -> list[Candidate]:
    kept: list[Candidate] = []
    for c in ranked:
        if not any(k.sort_key()[:2] == c.sort_key()[:2] and k.prediction.memory["total"] <= c.prediction.memory["total"]
                   for k in kept):  # fmt: skip
            kept.append(c)
    return kept


def _reasons(c: Candidate, best: Candidate, target: int) -> list[str]:
    p, b = c.prediction, best.prediction
    items = {k: v for k, v in p.memory.items() if k != "total"}
    biggest = max(items, key=lambda k: items[k])
    peak = f"peak {size(p.memory['total'])} at the {p.memory_phase} phase; largest: {biggest} {size(items[biggest])}"
    out = []
    if not p.fits:
        out.append(f"does not fit: {size(p.memory['total'] - p.usable_bytes)} over the {size(p.usable_bytes)} usable "
                   f"({peak})")  # fmt: skip
        if c is not best:
            out.append(f"needs {size(p.memory['total'] - b.memory['total'])} more than #1")
        return out
    out.append(f"fits with {size(p.usable_bytes - p.memory['total'])} to spare ({peak})")
    if not c.reaches_target:
        out.append(f"runs global_batch={c.config.train.global_batch}, not the target {target}: dp*micro_batch "
                   "does not divide it")  # fmt: skip
    if c is best:
        out.append(f"best predicted throughput: {p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%}; bottleneck "
                   f"{p.bottleneck} ({p.bottleneck_share:.0%} of the step)")  # fmt: skip
        return out
    slower = 1 - p.tokens_per_s / b.tokens_per_s if b.tokens_per_s else 0.0
    diffs = {k: p.time.get(k, 0.0) - b.time.get(k, 0.0) for k in set(p.time) | set(b.time)}
    worse = sorted((k for k in diffs if diffs[k] > 0), key=lambda k: -diffs[k])[:2]
    why = ", ".join(f"{k.replace('comm_', '')}{' communication' if k.startswith('comm_') else ''} "
                    f"+{diffs[k] * 1e3:.1f} ms" for k in worse)  # fmt: skip
    out.append(f"{slower:.0%} slower than #1 ({p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%})"
               + (f": {why} per step" if why else ""))  # fmt: skip
    spare = b.memory["total"] - p.memory["total"]
    if spare > 0:
        out.append(f"leaves {size(spare)} more memory free than #1")
    return out


def min_accelerators(
    cfg: Config, accelerator: Accelerator, per_node: int | None = None, margin: float = DEFAULT_MARGIN,
    max_nodes: int = 256,
) -> int | None:  # fmt: skip
    """The fewest devices of this kind on which some layout fits in memory (any global batch the layout can
    run near the target): 1, 2, 4 ... up to a node, then whole nodes. None if not even `max_nodes` do.
    Only the most frugal settings are tried (ZeRO 1-3, full checkpointing, micro-batch 1, 1f1b or zbv)."""
    per = per_node or accelerator.per_node
    sizes = [w for w in (2**i for i in range(per.bit_length())) if w < per] + [per * k for k in range(1, max_nodes + 1)]
    for world in sizes:
        cluster = Cluster(max(1, world // per), min(world, per), accelerator)
        dtype = compute_dtype(cfg, cluster)
        usable = accelerator.memory_bytes * (1 - margin)
        for c, _ in layouts(cfg, world, cluster.per_node, zero_stages=(1, 2, 3), checkpointing=("full",),
                            schedules=("1f1b", "zbv"), micro_batches=(1,)):  # fmt: skip
            if memory(c, dtype, runtime_bytes=accelerator.runtime_bytes)["total"] <= usable:
                return world
    return None
