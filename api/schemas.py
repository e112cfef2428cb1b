"""What the API returns about jobs (the store's records, shaped for clients)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Self

from pydantic import AliasChoices, BaseModel, Field, computed_field

from service.states import TERMINAL, JobState
from service.store import JobSummaryRecord


class JobSummary(BaseModel):
    """A job in a list: everything but the spec."""

    id: str
    name: str
    owner: str
    priority: int
    state: JobState
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    failure_reason: str | None
    attempts: int
    cancel_requested: bool
    steps: int
    """train.steps of the spec: the step a finished job reaches."""
    # The newest metrics; read from the store's row (`last_*`) when a list page is built from rows.
    step: int | None = Field(None, validation_alias=AliasChoices("step", "last_step"))
    loss: float | None = Field(None, validation_alias=AliasChoices("loss", "last_loss"))
    tokens_per_s: float | None = Field(None, validation_alias=AliasChoices("tokens_per_s", "last_tokens_per_s"))
    mfu: float | None = Field(None, validation_alias=AliasChoices("mfu", "last_mfu"))

    @computed_field
    @property
    def finished(self) -> bool:
        """Whether the job has ended: its state is terminal and will not change again (clients stop
        following it here rather than keeping their own list of terminal states)."""
        return self.state in TERMINAL

    @classmethod
    def of(cls, job: JobSummaryRecord) -> Self:
        """The API's view of a stored job (its spec too, for `JobPublic`). Built without validating
        again: the store's record was validated when it was read."""
        data = {name: getattr(job, name) for name in _FROM_RECORD}
        data.update(step=job.last_step, loss=job.last_loss, tokens_per_s=job.last_tokens_per_s, mfu=job.last_mfu)
        if "spec" in cls.model_fields:
            data["spec"] = job.spec  # type: ignore[attr-defined]  # JobPublic.of takes a JobRecord
        return cls.model_construct(**data)


class JobPublic(JobSummary):
    """One job, with its whole (normalised) spec."""

    spec: dict[str, Any]


_FROM_RECORD = tuple(n for n in JobSummary.model_fields if n in JobSummaryRecord.model_fields)


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    """How many jobs match the filters."""
    limit: int
    offset: int
    next: str | None = None
    """The next page's cursor: pass it as `?after=` (None on the last page)."""


class Health(BaseModel):
    ok: bool
    jobs: dict[str, int]
    """How many jobs are in each state (states without jobs left out)."""


class ClusterNode(BaseModel):
    id: str
    total: dict[str, float]
    """CPU, GPU and memory (bytes) the node has."""
    free: dict[str, float]
    """What the service's running jobs leave of it."""


class Cluster(BaseModel):
    connected: bool
    """Whether this server runs jobs on a Ray cluster (`fourfold up`), not just stores them."""
    nodes: list[ClusterNode]
    running_jobs: list[str] = []
