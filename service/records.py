"""Detached, read-only pydantic records that `service.store.Store` returns instead of ORM objects.

Each mirrors the columns of one table in `service.models`; build one with
`JobRecord.model_validate(orm_object)`. Times are timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict

from service.states import JobState


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


UTCTime = Annotated[datetime, AfterValidator(_utc)]
"""A datetime that is always aware and in UTC (a naive one is taken to be UTC)."""


class _Record(BaseModel):
    model_config = ConfigDict(from_attributes=True, frozen=True)


class JobSummaryRecord(_Record):
    """A job as a list page shows it: the row without its spec, with train.steps and the newest metrics."""

    id: str
    name: str
    owner: str
    priority: int
    state: JobState
    created_at: UTCTime
    updated_at: UTCTime
    started_at: UTCTime | None = None
    finished_at: UTCTime | None = None
    failure_reason: str | None = None
    attempts: int
    cancel_requested: bool
    steps: int = 0
    """train.steps of the spec."""
    last_step: int | None = None
    """The newest metrics (the newest attempt's highest step); None before the first step."""
    last_loss: float | None = None
    last_tokens_per_s: float | None = None
    last_mfu: float | None = None


class JobRecord(JobSummaryRecord):
    spec: dict[str, Any]
    idempotency_key: str | None = None
    storage: dict[str, Any] | None = None
    """What the job may read and write (a `workers.confine.Grant` as a dict); None: not confined."""


class AttemptRecord(_Record):
    id: int
    job_id: str
    number: int
    started_at: UTCTime
    finished_at: UTCTime | None = None
    outcome: str | None = None
    reason: str | None = None
    recovery_s: float | None = None
    """Seconds from the failure's detection to this attempt's first step (an attempt after a failure)."""
    recovery_phases: dict[str, float] | None = None
    """Where those seconds went, in order: `service.recovery.PHASES`."""


class EventRecord(_Record):
    id: int
    job_id: str
    time: UTCTime
    kind: str
    from_state: JobState | None = None
    to_state: JobState | None = None
    message: str
    actor: str | None = None
    """The API caller who did it; None when the service itself did."""
    address: str | None = None
    """The caller's network address."""


class MetricRecord(_Record):
    id: int
    job_id: str
    step: int
    time: UTCTime
    loss: float | None = None
    grad_norm: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    step_time_s: float | None = None
    peak_mem_bytes: int | None = None
    moe_aux_loss: float | None = None  # mixture-of-experts models: the aux loss per block and micro-batch
    moe_dropped_frac: float | None = None  # share of the (token, expert) choices dropped by capacity
    moe_max_load: float | None = None  # the busiest expert's tokens over the mean, worst block
    attempt: int


class CheckpointRecordOut(_Record):
    id: int
    job_id: str
    step: int
    path: str
    time: UTCTime


class LogRecord(_Record):
    id: int
    time: UTCTime
    line: str
