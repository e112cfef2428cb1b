"""How a failed job comes back: backoff, elastic data parallelism, resuming. Pure logic, no Ray.

delay = backoff_s(cfg.restart, failures=2)           # 2 x backoff_s, capped
fitted = fit(cfg, free_nodes_resources)              # (cfg at the largest dp that fits, plan) or None
spec = resume_spec(fitted[0])                         # resume from the newest complete checkpoint
"""

from __future__ import annotations

from typing import Any

from parallel.config import Config, ConfigError, RestartConfig, check
from workers.placement import Plan, make_plan, nodes_for, unit_of

BACKOFF_CAP_S = 300.0


def backoff_s(restart: RestartConfig, failures: int) -> float:
    """Seconds before restart number `failures` (1 = the first): doubling from backoff_s, capped."""
    return min(restart.backoff_s * 2 ** max(failures - 1, 0), BACKOFF_CAP_S)


def fit(cfg: Config, free: dict[str, dict[str, float]]) -> tuple[Config, Plan] | None:
    """The job at the largest dp from parallel.dp down to parallel.dp_min that fits the free slots.

    tp, pp and cp stay; ep becomes the largest divisor of itself that divides the new dp_shard; the global
    batch stays, so gradient accumulation absorbs a smaller dp."""
    p = cfg.parallel
    for dp in range(p.dp, (p.dp_min or p.dp) - 1, -1):
        trial = cfg.model_copy(deep=True)
        if dp != p.dp:
            trial.parallel.dp = dp
            trial.parallel.dp_replicate = 1 if p.dp_replicate > 1 and dp % p.dp_replicate else p.dp_replicate
            # expert parallelism within the fewer dp_shard ranks: the largest ep that still divides them
            # (checkpoints hold the experts whole, so a restart takes any ep)
            shard = dp // trial.parallel.dp_replicate
            trial.parallel.ep = max(e for e in range(1, p.ep + 1) if p.ep % e == 0 and shard % e == 0)
            trial.parallel.microbatches = None  # follows the new accumulation count
            try:
                check(trial)
            except ConfigError:  # e.g. the global batch does not split over this dp
                continue
        try:
            nodes = nodes_for(free, trial.resources)
            return trial, make_plan(trial.parallel, nodes, unit_of(trial.resources), trial.restart.spares)
        except ConfigError:
            continue
    return None


def resume_spec(cfg: Config) -> dict[str, Any]:
    """The spec a restart runs: resume from the newest complete checkpoint when there is a checkpoint dir."""
    spec = cfg.model_dump(mode="json", by_alias=True)
    if cfg.checkpoint.dir:
        spec["checkpoint"]["resume"] = "auto"
    return spec


PHASES = ("teardown", "backoff", "reservation", "actors", "imports", "rendezvous", "state", "first_step")
"""Where a recovery's seconds go, in order, each from the end of the one before:
teardown (failure detected -> the old attempt's actors and placement group gone), backoff (-> the restart
begins: restart.backoff_s, room on the cluster, Ray's verdict on a lost node), reservation (-> the new
placement group ready), actors (-> one actor per rank started, the rendezvous opened), imports (-> every
rank has imported torch and the engine), rendezvous (-> every rank joined the process groups), state (->
every rank built its model and loaded the checkpoint), first_step (-> the first step's metrics reached
the supervisor)."""
MARKS = ("detected", "torn_down", "restart", "reserved", "launched", "imported", "rendezvous", "state", "first_step")
"""The moments (wall-clock seconds) between the phases: the supervisor's, and the ranks' latest."""


def phases_of(marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase from the moments in `MARKS` (a missing moment counts as the one before it;
    a moment earlier than the one before, from another node's clock, counts as that one)."""
    out, last = {}, marks["detected"]
    for phase, mark in zip(PHASES, MARKS[1:], strict=True):
        at = max(last, marks.get(mark, last))
        out[phase] = round(at - last, 3)
        last = at
    return out


def start_phases(submitted: float, marks: dict[str, float]) -> dict[str, float]:
    """Where a job's first attempt spent the seconds from its submission to its first step: `queued`
    (waiting for admission and its placement group: -> reserved), then actors, imports, rendezvous,
    state (the model built) and first_step as for a recovery."""
    split = phases_of({"detected": submitted, "torn_down": submitted, "restart": submitted, **marks})
    return {"queued": split.pop("reservation"), **{k: v for k, v in split.items() if k not in ("teardown", "backoff")}}


def rank_marks(marks: dict[int, dict[str, float]]) -> dict[str, float]:
    """The ranks' moments (`workers.worker.RankRunner` reports imported, rendezvous and state per rank)
    as the job's: each the latest over the ranks, when the last rank got there."""
    out: dict[str, float] = {}
    for per_rank in marks.values():
        for name, at in per_rank.items():
            out[name] = max(out.get(name, at), at)
    return out
