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

    tp, pp and cp stay; the global batch stays, so gradient accumulation absorbs a smaller dp."""
    p = cfg.parallel
    for dp in range(p.dp, (p.dp_min or p.dp) - 1, -1):
        trial = cfg.model_copy(deep=True)
        if dp != p.dp:
            trial.parallel.dp = dp
            trial.parallel.dp_replicate = 1 if p.dp_replicate > 1 and dp % p.dp_replicate else p.dp_replicate
            trial.parallel.microbatches = None  # follows the new accumulation count
            try:
                check(trial)
            except ConfigError:  # e.g. the global batch does not split over this dp
                continue
        try:
            return trial, make_plan(trial.parallel, nodes_for(free, trial.resources), unit_of(trial.resources))
        except ConfigError:
            continue
    return None


def resume_spec(cfg: Config) -> dict[str, Any]:
    """The spec a restart runs: resume from the newest complete checkpoint when there is a checkpoint dir."""
    spec = cfg.model_dump(mode="json", by_alias=True)
    if cfg.checkpoint.dir:
        spec["checkpoint"]["resume"] = "auto"
    return spec
