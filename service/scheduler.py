"""Which queued jobs start now: priority first, then age, whole gangs only. Pure logic, no Ray.

    decisions = admit(queued_jobs, free_nodes, total_nodes)

A job starts only when its whole placement fits the free slots (gang admission). The
queue is strict: when the job at its head does not fit yet, nothing behind it starts,
so a large high-priority job is never starved by small ones slipping past. A job that
could not fit even on the empty cluster is refused with the planner's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from parallel.config import Config, ConfigError, build_config
from workers.placement import Node, Plan, make_plan


@dataclass
class Decision:
    job_id: str
    action: str  # start | refuse
    cfg: Config | None = None
    plan: Plan | None = None
    reason: str = ""


def unit_of(cfg: Config) -> str:
    return "GPUs" if cfg.resources.accelerator == "gpu" else "CPU slots"


def slots_of(node_resources: dict[str, float], cfg: Config) -> int:
    """How many ranks of this job a node's resources hold."""
    res = cfg.resources
    cpu = int(node_resources.get("CPU", 0) // res.cpus_per_rank)
    return min(int(node_resources.get("GPU", 0)), cpu) if res.accelerator == "gpu" else cpu


def admit(
    queued: list[Any],
    free: dict[str, dict[str, float]],
    total: dict[str, dict[str, float]],
) -> list[Decision]:
    """queued: job records (id, spec) in queue order; free/total: node id -> resources."""
    if not total:  # no node has joined yet: nothing to decide
        return []
    free = {node: dict(res) for node, res in free.items()}
    out: list[Decision] = []
    for job in queued:
        try:
            cfg = build_config(job.spec)
            make_plan(cfg.parallel, [Node(n, slots_of(r, cfg)) for n, r in total.items()], unit_of(cfg))
        except ConfigError as err:  # cannot run even on the empty cluster (or the spec went bad)
            out.append(Decision(job.id, "refuse", reason=str(err)))
            continue
        try:
            plan = make_plan(cfg.parallel, [Node(n, slots_of(r, cfg)) for n, r in free.items()], unit_of(cfg))
        except ConfigError:
            break  # the head of the queue waits for room; nothing overtakes it
        for node in plan.nodes():
            n = len(plan.on_node(node))
            free[node]["CPU"] = free[node].get("CPU", 0) - n * cfg.resources.cpus_per_rank
            if cfg.resources.accelerator == "gpu":
                free[node]["GPU"] = free[node].get("GPU", 0) - n
        out.append(Decision(job.id, "start", cfg, plan))
    return out
