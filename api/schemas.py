"""What the API returns about jobs (the store's records, shaped for clients)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, computed_field

from service.states import TERMINAL, JobState
from service.store import JobRecord, MetricRecord


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
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None

    @computed_field
    @property
    def finished(self) -> bool:
        """Whether the job has ended: its state is terminal and will not change again (clients stop
        following it here rather than keeping their own list of terminal states)."""
        return self.state in TERMINAL

    @classmethod
    def of(cls, job: JobRecord, latest: MetricRecord | None = None) -> Any:
        data = job.model_dump(exclude=set() if "spec" in cls.model_fields else {"spec"})
        data["steps"] = job.spec.get("train", {}).get("steps", 0)
        if latest is not None:
            data.update(step=latest.step, loss=latest.loss, tokens_per_s=latest.tokens_per_s, mfu=latest.mfu)
        return cls.model_validate(data)


class JobPublic(JobSummary):
    """One job, with its whole (normalised) spec."""

    spec: dict[str, Any]


class JobList(BaseModel):
    items: list[JobSummary]
    total: int
    limit: int
    offset: int


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
