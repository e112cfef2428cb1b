"""SQLAlchemy 2 models of the job store: jobs, their attempts, events, metrics, checkpoints, logs; API tokens.

Only `service.store.Store` uses these; everything else gets detached pydantic records from it.
The schema itself is created by the Alembic migrations in `service/migrations/` (which do not import
this module), so a change here needs a new migration; `tests/service` checks that both agree.

All times are timezone-aware UTC (`UTCDateTime`), also on SQLite, which stores them without a zone.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """A `DateTime(timezone=True)` that always binds and returns aware UTC datetimes.

    SQLite keeps no zone: values are written as naive UTC and read back with UTC attached.
    PostgreSQL returns the session time zone; it is converted to UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the job store only takes timezone-aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def _job_fk() -> ForeignKey:
    return ForeignKey("jobs.id", ondelete="CASCADE")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_state_priority_created_at", "state", "priority", "created_at"),
        # Newest first, everyone's or one owner's: what a page of GET /v1/jobs reads (keyset pagination).
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_owner_created_at_id", "owner", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_job_id)
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str] = mapped_column(String(100), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    storage: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # what the job may read and write (a Grant)
    # Kept on the row so that a list page reads neither the specs nor the metrics table: train.steps,
    # and the newest metrics (the newest attempt's highest step; Store.add_metrics keeps them).
    steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    last_attempt: Mapped[int | None] = mapped_column(Integer)
    last_step: Mapped[int | None] = mapped_column(Integer)
    last_loss: Mapped[float | None] = mapped_column(Float)
    last_tokens_per_s: Mapped[float | None] = mapped_column(Float)
    last_mfu: Mapped[float | None] = mapped_column(Float)


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), _job_fk(), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str | None] = mapped_column(String(16))  # succeeded | failed | cancelled | stopped | interrupted
    reason: Mapped[str | None] = mapped_column(Text)
    recovery_s: Mapped[float | None] = mapped_column(Float)  # failure detected -> this attempt's first step
    recovery_phases: Mapped[dict[str, float] | None] = mapped_column(JSON)  # where those seconds went


class Event(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), _job_fk(), index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))  # "state", "cancel", ...
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(100))  # who did it (a caller of the API), None: the service
    address: Mapped[str | None] = mapped_column(String(64))  # the caller's address


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        UniqueConstraint("job_id", "step", "attempt", name="uq_metrics_job_id_step_attempt"),
        Index("ix_metrics_job_id_step", "job_id", "step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), _job_fk())
    step: Mapped[int] = mapped_column(Integer)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    loss: Mapped[float | None] = mapped_column(Float)
    grad_norm: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    tflops: Mapped[float | None] = mapped_column(Float)
    mfu: Mapped[float | None] = mapped_column(Float)
    step_time_s: Mapped[float | None] = mapped_column(Float)
    peak_mem_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Mixture-of-experts router statistics of the step (parallel/moe.py RouterStats); null for dense models.
    moe_aux_loss: Mapped[float | None] = mapped_column(Float)
    moe_dropped_frac: Mapped[float | None] = mapped_column(Float)
    moe_max_load: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer)


class CheckpointRecord(Base):
    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), _job_fk(), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LogLine(Base):
    __tablename__ = "log_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32), _job_fk(), index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    line: Mapped[str] = mapped_column(Text)


class Token(Base):
    """A bearer token of the API, kept only as its sha256 (`service.tokens` makes and checks them)."""

    __tablename__ = "tokens"
    __table_args__ = (UniqueConstraint("hash", name="uq_tokens_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user: Mapped[str] = mapped_column(String(100))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the token; the token itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # its first characters, so that `token list` can name it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
