"""Which queued jobs start now: priority first, then age, whole gangs only. Pure logic, no Ray.

    decisions = admit(queued_jobs, free_nodes, total_nodes)

A job starts only when its whole placement fits the free slots (gang admission); an elastic
job (parallel.dp_min) starts at the largest dp that fits, down to dp_min. The queue is
strict: when the job at its head does not fit yet, nothing behind it starts,
so a large high-priority job is never starved by small ones slipping past. A job that
could not fit even on the empty cluster is refused with the planner's reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from parallel.config import Config, ConfigError, build_config
from service.recovery import fit
from service.resources import Resources, take
from workers.placement import Plan, bundles_of, make_plan, nodes_for, unit_of


@dataclass
class Decision:
    job_id: str
    action: Literal["start", "refuse"]
    cfg: Config | None = None
    plan: Plan | None = None
    reason: str = ""


def admit(
    queued: list[Any],
    free: Resources,
    total: Resources,
) -> list[Decision]:
    """queued: job records (id, spec) in queue order; free/total: node id -> resources."""
    if not total:  # no node has joined yet: nothing to decide
        return []
    out: list[Decision] = []
    for job in queued:
        try:
            cfg = build_config(job.spec)
            if fit(cfg, total) is None:  # not even at dp_min on the empty cluster: say why at full dp
                make_plan(cfg.parallel, nodes_for(total, cfg.resources), unit_of(cfg.resources), cfg.restart.spares)
        except ConfigError as err:  # cannot run even on the empty cluster (or the spec went bad)
            out.append(Decision(job.id, "refuse", reason=str(err)))
            continue
        fitted = fit(cfg, free)  # full dp, or for an elastic job the largest dp down to dp_min
        if fitted is None:
            break  # the head of the queue waits for room; nothing overtakes it
        cfg, plan = fitted
        free = take(free, bundles_of(plan, cfg.resources))
        out.append(Decision(job.id, "start", cfg, plan))
    return out
