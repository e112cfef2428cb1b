"""The sections of a job spec about running it rather than the model and its layout: checkpoints,
what each rank takes on a Ray cluster, restarts, the planner. `parallel.config` re-exports them."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from parallel.config_base import Section as _Section


class CheckpointConfig(_Section):
    model_config = ConfigDict(**_Section.model_config, populate_by_name=True)

    dir: str | None = Field(None, json_schema_extra={"x-storage": "write"})
    """Where checkpoints go (local path or fsspec URL such as s3://bucket/run); null = no checkpoints."""
    every: int = Field(0, ge=0)
    """Save every this many steps (0 = only at the end); the last step is always saved."""
    keep_last: int = Field(2, ge=1)
    """Keep this many of the newest complete checkpoints."""
    keep_every: int | None = Field(None, ge=1)
    """Also keep every checkpoint whose step is a multiple of this (milestones)."""
    async_: bool = Field(False, alias="async")
    """Write in the background while training continues (the blocked time is in the metrics)."""
    resume: str | None = Field(None, json_schema_extra={"x-storage": "read", "x-keywords": ["auto"]})
    """`auto` = the newest complete checkpoint in `dir` (start fresh if none), or a checkpoint path."""
    memory_every: int = Field(0, ge=0)
    """Every this many steps each rank copies its state into host memory and sends a copy to a peer
    (on another node when the job has several): a dead rank without a live replica (ZeRO 1-3 over every
    dp rank) is then restored from those snapshots in place, redoing at most this many steps, without
    reading storage (docs/fault-tolerance.md). 0 = off. Costs one copy of the rank's state in host
    memory for its own snapshot and one for its peer's."""


class ResourcesConfig(_Section):
    """Read by the Ray launcher and the service, not by the engine."""

    accelerator: Literal["cpu", "gpu"] = "cpu"
    """What each rank runs on: one GPU per rank (nccl), or CPU slots (gloo)."""
    cpus_per_rank: float = Field(1, gt=0)
    """CPUs each rank takes (a whole number, or a fraction below 1 to put several ranks on a CPU);
    on a CPU cluster a node's CPUs divided by this are its slots."""

    @field_validator("cpus_per_rank")
    @classmethod
    def _ray_quantity(cls, c: float) -> float:
        # Ray takes fractional CPUs only below 1 (and to 4 decimals); above, whole CPUs.
        if (c > 1 and c != int(c)) or round(c, 4) != c:
            raise ValueError("use a whole number, or a fraction below 1 with at most 4 decimals")
        return c


class RestartConfig(_Section):
    """Read by the service's supervisor, not by the engine."""

    max_failures: int = Field(3, ge=0)
    """Restarts from the newest checkpoint before the job is marked FAILED."""
    backoff_s: float = Field(10.0, ge=0)
    """Seconds to wait before the first restart; doubled for each further one, capped at 300 s."""
    hang_timeout_s: float = Field(300.0, gt=0)
    """A job whose ranks report no heartbeat for this long is treated as failed."""
    in_place: bool = True
    """When a rank's process dies (its node still up), keep the other ranks' processes and their state
    in memory, start only a replacement, and re-form the process groups in place; the replacement gets
    its state from a live data-parallel replica, or every rank reloads the newest checkpoint where none
    holds it (docs/fault-tolerance.md). false: every failure restarts the whole job from its checkpoint."""
    spares: int = Field(0, ge=0, le=64)
    """Warm spare processes kept beside the job (torch imported, the model built on the meta device),
    each holding one rank's resources: a replacement then starts in well under a second. Placed on the
    job's nodes first; a job whose cluster has no room for them waits like one without room for its ranks."""


class PlanConfig(_Section):
    """Read by the service (and `fourfold plan`), not by the engine: docs/planner.md."""

    auto: list[Literal["dp", "tp", "pp", "cp", "zero", "dp_replicate", "ep", "pp_schedule",
                       "activation_checkpointing", "micro_batch"]] = Field(default_factory=list)  # fmt: skip
    """Layout fields the service chooses when it admits the job, planning against the live cluster; a
    spec says `parallel: auto` (all of them) or `auto` for a field (parallel.tp: auto, train.micro_batch:
    auto), which lands here. The choice and its reasons are the job's `plan` event."""
    ranks: int | None = Field(None, ge=1)
    """With auto fields: how many ranks to plan for (null: every slot of the cluster when submitted, up
    to the service's limit on ranks)."""
    accelerator: str | None = Field(None, max_length=64)
    """The GPU the planner assumes (h100-80gb, a100-80gb, ...: `fourfold plan --help`); null: the
    service's FOURFOLD_ACCELERATOR. Ray does not say which GPU a node has; CPU nodes are measured."""
    memory_check: bool = True
    """Refuse at submit a layout whose predicted peak memory per rank is over the accelerator's (less a
    10% margin); false runs it anyway."""
