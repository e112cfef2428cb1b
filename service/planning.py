"""The layout planner (parallel/planner/) for the service and the CLI: the cluster a plan is made for (a
named one, or Ray's live nodes), the plan as one JSON document, and the two uses the service makes of it:
resolving `parallel: auto` at admission (`resolve_auto`) and refusing at submit a layout that cannot fit
(`memory_refusal`).

    cluster = parse_cluster("8x8xh100-80gb")
    doc = plan(cfg, cluster, top=5)                 # what `fourfold plan --json` and POST /v1/plan return
    cfg, event = resolve_auto(cfg, live_cluster)    # a concrete layout, and the reasons it was chosen

Errors in what a user gave are `PlanInputError`s naming the field (as the CLI option or API field).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from parallel.config import Config, ConfigError, ResourcesConfig, build_config
from parallel.planner import (
    ACCELERATORS,
    Accelerator,
    Candidate,
    Cluster,
    cpu_measured,
    min_accelerators,
    search,
    total_params,
)
from parallel.planner import accelerator as lookup
from parallel.planner.hardware import ALIASES
from parallel.planner.memory import peak_memory
from parallel.planner.search import kept_fields
from parallel.planner.timing import CPU_EFFICIENCY, DEFAULT_EFFICIENCY, DEFAULT_MARGIN, compute_dtype, describe, size
from service.changes import Change
from service.states import EventKind, JobState
from workers.placement import slots_of

log = logging.getLogger(__name__)

PLANNING = "planning the layout"

LAYOUT_FIELDS = ("dp", "tp", "pp", "cp", "zero", "dp_replicate", "ep", "pp_schedule", "activation_checkpointing")


class PlanInputError(ValueError):
    """A planning input that cannot be used: `field` (the CLI option's or API field's name), the value
    given (None when the field was missing), and what is wrong or valid."""

    def __init__(self, field: str, value: object, message: str) -> None:
        super().__init__(message)
        self.field, self.value, self.message = field, value, message

    def __str__(self) -> str:
        shown = "" if self.value is None else f" {self.value}"
        return f"{self.field}{shown}: {self.message}"


# -- the cluster -------------------------------------------------------------------------------------------------


_MEASURING = threading.Lock()


@functools.cache
def _measured_tflops(threads: int) -> float:
    """This machine's matmul peak at a rank's thread count, measured once per process and thread count
    (half a second of matmuls; one at a time, as the thread setting is the process's)."""
    from parallel.flops import measure_cpu_matmul_tflops

    with _MEASURING:
        return measure_cpu_matmul_tflops(threads=threads)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_accelerator(
    ranks_per_node: int, tflops: float | None = None, node_memory: int | None = None, threads: int = 1
) -> Accelerator:
    """This machine's CPU as `cpu_measured` describes it (the matmul peak at `threads` threads, a rank's,
    measured once unless `tflops`), each rank holding its share of the node's memory (`node_memory`,
    default this machine's): a node's ranks are processes sharing one memory, not devices with their own."""
    share = (node_memory or physical_memory()) // max(1, ranks_per_node)
    peak = tflops or _measured_tflops(threads)
    return cpu_measured(tflops=peak, memory_bytes=share, per_node=ranks_per_node, threads=threads)


def parse_cluster(text: str, cpu_tflops: float | None = None, field: str = "cluster") -> Cluster:
    """`8x8xh100-80gb`, `4xcpu` or `h100` as a planner Cluster. A CPU cluster gets this machine's CPU,
    each rank with its share of the memory."""
    placeholder = cpu_measured(tflops=1.0, memory_bytes=1)  # no measurement until the string is known good
    try:
        parsed = Cluster.parse(text, accelerators={"cpu": placeholder})
    except ValueError as err:
        message = str(err).removeprefix(f"cluster {text!r}: ")
        if message.startswith("unknown accelerator"):
            message += f" (aliases: {', '.join(ALIASES)})"
        elif message.startswith("a cluster needs"):
            message = "give at least one node and one device per node, e.g. 8x8xh100-80gb"
        raise PlanInputError(field, text.strip() or repr(text), message) from None
    if parsed.accelerator is placeholder:
        return dataclasses.replace(parsed, accelerator=cpu_accelerator(parsed.per_node, cpu_tflops))
    return parsed


def cluster_from_ray(
    resources: dict[str, dict[str, float]],
    job: ResourcesConfig,
    accelerator: str | None = None,
    cpu_tflops: float | None = None,
    field: str = "ray",
) -> tuple[Cluster, list[str]]:
    """A planner Cluster from Ray's alive nodes' totals (`workers.group.node_resources()`: node id ->
    {"CPU": n, "GPU": n, "memory": bytes, ...}) and the notes that say what was assumed.

    GPUs when `accelerator` names one, or the job runs on GPUs (resources.accelerator=gpu); Ray does not say
    which GPU, so then `accelerator` is required. Each node holds the ranks the launcher would put there
    (`workers.placement.slots_of`: its GPUs with cpus_per_rank CPUs each, or its CPUs / cpus_per_rank). On
    CPU the peak is measured here (or `cpu_tflops`) and each rank gets its share of the node's Ray memory.
    The planner takes equal nodes: unequal ones are planned as that many nodes of the smallest. `field`
    names the cluster in errors (the CLI's --ray, the API's cluster)."""
    gpu = accelerator.lower() != "cpu" if accelerator is not None else job.accelerator == "gpu"
    if gpu and accelerator is None:
        known = ", ".join(ACCELERATORS)
        raise PlanInputError(
            "accelerator", None, f"the job runs on GPUs and Ray does not say which; give one of {known}"
        )
    acc = None
    if gpu:
        try:
            acc = lookup(str(accelerator))
        except ValueError as err:
            raise PlanInputError("accelerator", accelerator, str(err)) from None
    res = job.model_copy(update={"accelerator": "gpu" if gpu else "cpu"})
    slots = {node: slots_of(have, res) for node, have in resources.items()}
    slots = {node: n for node, n in slots.items() if n > 0}
    unit = "GPUs" if gpu else f"CPU slots (resources.cpus_per_rank={res.cpus_per_rank:g})"
    if not slots:
        raise PlanInputError(field, None, f"no alive node of the Ray cluster has {unit} for a rank "
                                          f"({len(resources)} nodes)")  # fmt: skip
    per_node = min(slots.values())
    notes = [f"Ray: {len(slots)} node(s) of {', '.join(str(n) for n in sorted(slots.values()))} {unit}"]
    if len(set(slots.values())) > 1:
        notes.append(f"nodes differ; planned as {len(slots)} nodes of {per_node}, the smallest")
    if acc is None:
        memory = min(int(resources[node].get("memory", 0)) for node in slots) or None
        acc = cpu_accelerator(per_node, cpu_tflops, memory, threads=max(1, int(res.cpus_per_rank)))
        peak = "as given" if cpu_tflops else "measured on this machine"
        notes.append(f"CPU peak {peak}; each rank's memory is its share of the node's ({size(acc.memory_bytes)})")
    return Cluster(len(slots), per_node, acc), notes


def accelerator_key(acc: Accelerator) -> str:
    return next((k for k, v in ACCELERATORS.items() if v == acc), "cpu" if acc.kind == "cpu" else acc.name)


def cluster_text(c: Cluster) -> str:
    return f"{c.nodes}x{c.per_node}x{accelerator_key(c.accelerator)}"


def node_size(c: Cluster) -> int:
    """The node `min_accelerators` counts in: the cluster's, or for one node smaller than the accelerator's
    usual (8 GPUs), the usual one: the answer says how many devices a job needs, not how many such nodes."""
    return c.per_node if c.nodes > 1 else max(c.per_node, c.accelerator.per_node)


def default_efficiency(c: Cluster) -> float:
    """CPU_EFFICIENCY of a CPU's measured matmul peak, DEFAULT_EFFICIENCY of a datasheet peak elsewhere."""
    return CPU_EFFICIENCY if c.accelerator.kind == "cpu" else DEFAULT_EFFICIENCY


# -- the plan as one document ------------------------------------------------------------------------------------


def layout_of(cfg: Config) -> dict[str, Any]:
    p, t = cfg.parallel, cfg.train
    return {
        "dp": p.dp, "dp_replicate": p.dp_replicate, "ep": p.ep, "tp": p.tp, "pp": p.pp, "cp": p.cp,
        "cp_mode": p.cp_mode,
        "zero": p.zero, "pp_schedule": p.pp_schedule if p.pp > 1 else None, "pp_virtual": p.pp_virtual,
        "activation_checkpointing": p.activation_checkpointing, "micro_batch": t.micro_batch,
        "global_batch": t.global_batch,
    }  # fmt: skip


def plan(
    cfg: Config,
    cluster: Cluster,
    top: int = 10,
    margin: float = DEFAULT_MARGIN,
    efficiency: float | None = None,
    notes: list[str] | None = None,
    field: str = "cluster",
) -> tuple[dict[str, Any], list[Candidate]]:
    """The ranked layouts for `cfg` on `cluster` as plain data (the --json document, POST /v1/plan's
    answer), and the candidates themselves."""
    eff = efficiency if efficiency is not None else default_efficiency(cluster)
    try:
        found = search(cfg, cluster, efficiency=eff, margin=margin, top=top, fixed=kept_fields(cfg))
        fewest = min_accelerators(cfg, cluster.accelerator, per_node=node_size(cluster), margin=margin)
    except ValueError as err:  # an accelerator without a peak for the job's dtype
        hint = f" or plan with train.dtype=auto (was {cfg.train.dtype})" if "peak" in str(err) else ""
        raise PlanInputError(field, cluster_text(cluster), f"{err}{hint}") from None
    if not found:
        raise PlanInputError(
            field, cluster_text(cluster), f"no layout the engine accepts runs on {cluster.world} devices"
        )
    acc = cluster.accelerator
    doc = {
        "job": {
            "name": cfg.name, "params": total_params(cfg.model), "global_batch": cfg.train.global_batch,
            "seq_len": cfg.train.seq_len, "dtype": found[0].prediction.dtype,
        },
        "cluster": {
            "text": cluster_text(cluster), "nodes": cluster.nodes, "per_node": cluster.per_node,
            "world": cluster.world, "accelerator": accelerator_key(acc), "accelerator_name": acc.name,
            "memory_bytes": acc.memory_bytes, "usable_bytes": int(acc.memory_bytes * (1 - margin)),
            "peak_tflops": acc.peak_tflops,
        },
        "efficiency": eff, "margin": margin, "notes": list(notes or []),
        "fits": any(x.prediction.fits for x in found),
        "candidates": [
            {"rank": x.rank, "layout": layout_of(x.config), "reaches_target": x.reaches_target, "reasons": x.reasons,
             "prediction": x.prediction.as_dict()}
            for x in found
        ],
        "min_accelerators": {"count": fewest, "accelerator": accelerator_key(acc), "per_node": node_size(cluster)},
    }  # fmt: skip
    return doc, found


# -- the service's uses ------------------------------------------------------------------------------------------


def memory_refusal(cfg: Config, cluster: Cluster, margin: float = DEFAULT_MARGIN) -> str | None:
    """Why `cfg`'s own layout cannot fit one `cluster` device (its predicted peak per rank over the usable
    memory, with the breakdown), or None when it fits."""
    acc = cluster.accelerator
    phases = peak_memory(cfg, compute_dtype(cfg, cluster), acc.runtime_bytes)
    items, phase = phases[0], phases[1]
    usable = acc.memory_bytes * (1 - margin)
    if items["total"] <= usable:
        return None
    parts = ", ".join(f"{k} {size(v)}" for k, v in sorted(items.items(), key=lambda kv: -kv[1]) if v and k != "total")
    return (
        f"{describe(cfg)} needs {size(items['total'])} per rank at its {phase} peak, over the "
        f"{size(usable)} usable of one {acc.name} ({size(acc.memory_bytes)} less a {margin:.0%} margin): {parts}. "
        "Try more ranks, a higher parallel.zero, parallel.activation_checkpointing, a smaller "
        "train.micro_batch (`fourfold plan` ranks the layouts that fit), or set plan.memory_check: false"
    )


def live_cluster(
    cfg: Config, total: dict[str, dict[str, float]], accelerator: str | None
) -> tuple[Cluster, list[str], int]:
    """The planner's Cluster for `cfg` on Ray's alive nodes (`total`), its notes, and the slots the
    nodes hold for this job in all. GPUs are the spec's plan.accelerator, else `accelerator` (the
    service's FOURFOLD_ACCELERATOR)."""
    gpu = cfg.resources.accelerator == "gpu"
    name = cfg.plan.accelerator or accelerator
    if gpu and name is None:
        known = ", ".join(ACCELERATORS)
        raise PlanInputError("plan.accelerator", None, f"Ray does not say which GPU the nodes have; give one of {known}"
                                                       " (or the service's FOURFOLD_ACCELERATOR)")  # fmt: skip
    cluster, notes = cluster_from_ray(total, cfg.resources, name if gpu else None, field="cluster")
    slots = sum(slots_of(have, cfg.resources) for have in total.values())
    return cluster, notes, slots


def shaped(cluster: Cluster, ranks: int) -> Cluster:
    """`cluster` cut to exactly `ranks` devices: whole nodes where `ranks` is a multiple of a node, else
    the largest node size dividing `ranks` (tp stays within that)."""
    per = max(d for d in range(1, min(ranks, cluster.per_node) + 1) if ranks % d == 0)
    return dataclasses.replace(cluster, nodes=ranks // per, per_node=per)


def resolve_auto(
    cfg: Config, total: dict[str, dict[str, float]], accelerator: str | None = None, max_ranks: int | None = None
) -> tuple[Config, str]:
    """The layout the service runs for a spec with plan.auto fields, planned on the live cluster (`total`:
    Ray's alive nodes), and the message its `plan` event records: the layout, why, and the runners-up.
    plan.ranks ranks (null: every slot, at most `max_ranks`); the best layout that fits and runs the
    spec's global batch. Raises PlanInputError when none does."""
    cluster, notes, slots = live_cluster(cfg, total, accelerator)
    ranks = cfg.plan.ranks or min(slots, max_ranks or slots)
    if ranks > slots:
        raise PlanInputError("plan.ranks", ranks, f"the cluster has {slots} slots for this job's ranks in all")
    target = shaped(cluster, ranks)
    eff = default_efficiency(target)
    try:
        found = search(cfg, target, efficiency=eff, top=3, fixed=kept_fields(cfg))
    except ValueError as err:  # an accelerator without a peak for the spec's dtype
        raise PlanInputError("plan.accelerator", target.accelerator.name, str(err)) from None
    best = next((c for c in found if c.prediction.fits and c.reaches_target), None)
    auto = ", ".join(cfg.plan.auto)
    if best is None:
        why = "; ".join(found[0].reasons) if found else "no layout the engine accepts"
        fits = [c for c in found if c.prediction.fits]
        if fits:
            runs = fits[0].config.train.global_batch
            why = f"the layouts that fit run global_batch={runs}, not {cfg.train.global_batch}"
        raise PlanInputError("plan.auto", f"[{auto}]", f"no layout of {ranks} ranks on {cluster_text(target)} fits "
                                                       f"and runs the spec's batch: {why}")  # fmt: skip
    chosen = best.config.model_copy(update={"plan": cfg.plan.model_copy(update={"auto": [], "ranks": None})})
    p = best.prediction
    others = [f"#{c.rank} {c.prediction.layout}: {c.reasons[-1]}" for c in found[1:] if c.reasons]
    message = (
        f"planned {p.layout} for [{auto}] on {cluster_text(target)}: {'; '.join(best.reasons)}; predicted "
        f"{size(p.memory['total'])} per rank, {p.tokens_per_s:,.0f} tokens/s"
        + (f"; runners-up: {' | '.join(others)}" if others else "")
        + (f" ({'; '.join(notes)})" if notes else "")
    )
    return chosen, message


def at_submit(
    cfg: Config, total: dict[str, dict[str, float]] | None, accelerator: str | None, max_ranks: int
) -> tuple[Config, list[str]]:
    """What the service checks and fills in at submit: an auto spec without plan.ranks gets the cluster's
    slots (at most `max_ranks`); a fixed layout whose predicted memory per rank is over the accelerator's
    is refused (PlanInputError on `parallel`) unless plan.memory_check is false. Returns the spec and
    the notes for the job's log (what could not be checked, and why)."""
    if cfg.plan.accelerator is not None:
        try:
            lookup(cfg.plan.accelerator)
        except ValueError as err:
            raise PlanInputError("plan.accelerator", cfg.plan.accelerator, str(err)) from None
    if total is None:  # the API alone (tests, `create_app(supervise=False)`): nothing will run the job
        return cfg, []
    try:
        cluster, _, slots = live_cluster(cfg, total, accelerator)
    except PlanInputError as err:  # no GPU type known, no node with room for a rank: the run itself says more
        return cfg, [f"planner: memory not checked at submit ({err})"]
    if cfg.plan.auto:
        if cfg.plan.ranks is None:
            ranks = max(1, min(slots, max_ranks))
            cfg = cfg.model_copy(update={"plan": cfg.plan.model_copy(update={"ranks": ranks})})
        return cfg, []
    if not cfg.plan.memory_check:
        return cfg, ["planner: memory check off (plan.memory_check: false)"]
    refusal = memory_refusal(cfg, shaped(cluster, min(cfg.parallel.world_size, cluster.world)))
    if refusal is not None:
        raise PlanInputError("parallel", None, refusal)
    return cfg, []


def predicted_run(cfg: Config, total: dict[str, dict[str, float]], accelerator: str | None = None) -> dict[str, Any]:
    """The planner's prediction for `cfg`'s own layout on the live cluster (`Prediction.as_dict`)."""
    from parallel.planner import predict

    cluster, notes, _ = live_cluster(cfg, total, accelerator)
    target = shaped(cluster, min(cfg.parallel.world_size, cluster.world))
    try:
        out = predict(cfg, target, default_efficiency(target)).as_dict()
    except ValueError as err:  # an accelerator without a peak for the spec's dtype
        raise PlanInputError("plan.accelerator", target.accelerator.name, str(err)) from None
    out["notes"] = [*notes, *out["notes"]]
    out["cluster"] = cluster_text(target)
    return out


def plan_queue(
    queued: list[Any], total: dict[str, dict[str, float]], apply: Callable[[str, Change], None],
    accelerator: str | None = None, max_ranks: int | None = None,
) -> list[Any]:  # fmt: skip
    """The supervisor's queue (job records: id, spec) with each spec's auto layout fields chosen on the live
    cluster: `apply` stores the resolved spec and a `plan` event saying why; a job no layout fits fails,
    saying why, and leaves the queue. An unforeseen planner error fails that job too, rather than stalling
    the queue behind it."""
    out = []
    for job in queued:
        if not (job.spec.get("plan") or {}).get("auto"):
            out.append(job)
            continue
        try:
            cfg, message = resolve_auto(build_config(job.spec), total, accelerator, max_ranks)
        except (PlanInputError, ConfigError) as err:
            apply(job.id, Change(states=((JobState.STARTING, PLANNING), (JobState.FAILED, f"planner: {err}"))))
            continue
        except Exception as err:
            log.exception("planning job %s failed", job.id)
            why = f"planner: internal error ({type(err).__name__}: {err}); the service log has the details"
            apply(job.id, Change(states=((JobState.STARTING, PLANNING), (JobState.FAILED, why))))
            continue
        spec = cfg.model_dump(mode="json", by_alias=True)
        apply(job.id, Change(spec=spec, events=((EventKind.PLAN, message),), logs=(message,)))
        out.append(job.model_copy(update={"spec": spec}))
    return out
