"""The job store: the only way the control plane reads or writes its database.

    store = Store("sqlite:///var/fourfold/jobs.db")        # or "postgresql://user@host/fourfold"
    job, created = store.create_job(spec, owner="ada", name="tiny", idempotency_key="req-1")
    store.transition(job.id, JobState.STARTING, "placement group ready")
    number = store.start_attempt(job.id)
    store.add_metrics(job.id, [{"step": 1, "loss": 5.5}], attempt=number)
    store.close()

Every method is synchronous and thread-safe: each call runs in its own session and transaction and
returns detached pydantic records (`service.records`), never ORM objects. The schema is brought up to
date by Alembic when a `Store` is created. Unknown job ids raise `KeyError`; state changes the state
machine forbids raise `service.states.InvalidTransition`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from types import SimpleNamespace
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Select, func, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.changes import Change
from service.db import make_engine, session_factory, single_reads, upgrade, writer
from service.history import JobHistory
from service.models import Attempt, Event, Job, LogLine, new_job_id, utcnow
from service.quota import Quota, QuotaExceeded
from service.records import (
    AttemptRecord,
    CheckpointRecordOut,
    EventRecord,
    JobRecord,
    JobSummaryRecord,
    LogRecord,
    MetricRecord,
)  # fmt: skip
from service.states import ACTIVE, TERMINAL, AttemptOutcome, EventKind, JobState, check_transition

__all__ = [
    "AttemptRecord", "CheckpointRecordOut", "EventRecord", "JobRecord", "JobSummaryRecord", "LogRecord",
    "MetricRecord", "Quota",
    "Change", "QuotaExceeded", "Store", "new_job_id",
]  # fmt: skip

OUTCOMES = frozenset(AttemptOutcome)
R = TypeVar("R", bound=BaseModel)
# A list page reads these columns only (no spec), as plain rows: no ORM objects to build.
_SUMMARY = tuple(Job.__table__.c[name] for name in JobSummaryRecord.model_fields)
_NEWEST_FIRST = (Job.created_at.desc(), Job.id.desc())


def train_steps(spec: dict[str, Any]) -> int:
    """train.steps of a spec (0 when it has none): kept on the job row for list pages."""
    return int((spec.get("train") or {}).get("steps") or 0)


class Store(JobHistory):
    """Jobs, attempts, events, metrics, checkpoints and logs in SQLite or PostgreSQL (the last four
    in `service.history.JobHistory`)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        upgrade(self.engine)
        self._sessions = session_factory(writer(self.engine))
        self._read_sessions = session_factory(self.engine)
        self._single = single_reads(self.engine)
        self.local = self.engine.dialect.name == "sqlite"
        """A database file on this machine (SQLite), not a server across a network."""
        self._writers: AbstractContextManager[Any] = threading.RLock() if self.local else nullcontext()
        self.tokens_seen = SimpleNamespace(any=False, checked=-1e9)
        """Whether a token exists, and when the store was last asked (service.tokens.Tokens.any_exist)."""

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        """A session inside one writing transaction: committed on success, rolled back on an exception.

        On SQLite the threads of this process take turns at a lock first: one writer at a time holds
        the database's write lock anyway, and a thread that finds it taken would poll for it (SQLite's
        busy handler sleeps 1, 2, 5, ... 100 ms between tries), where the lock hands over at once.
        Writers in other processes (the CLI) still meet the busy timeout."""
        with self._writers, self._sessions.begin() as session:
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        """A session inside one read-only transaction (on SQLite it does not take the write lock)."""
        with self._read_sessions.begin() as session:
            yield session

    @staticmethod
    def _locked_job(session: Session, job_id: str) -> Job:
        job = session.scalars(select(Job).where(Job.id == job_id).with_for_update()).one_or_none()
        if job is None:
            raise KeyError(job_id)
        return job

    # -- jobs ----------------------------------------------------------------------------------

    def create_job(
        self,
        spec: dict[str, Any],
        owner: str,
        name: str,
        priority: int = 0,
        idempotency_key: str | None = None,
        *,
        job_id: str | None = None,
        storage: dict[str, Any] | None = None,
        quota: Quota | None = None,
        address: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a new job; returns (job, True), or (existing job, False) for a reused idempotency key.

        With `quota`, the owner's limits are checked in the same transaction that stores the job
        (QuotaExceeded, nothing stored). The "submitted" event names the owner and `address`."""
        existing = self.job_by_key(owner, idempotency_key)
        if existing is not None:
            return existing, False
        now = utcnow()
        job = Job(id=job_id or new_job_id(), name=name, owner=owner, priority=priority, state=JobState.QUEUED.value)
        job.spec, job.storage, job.steps = spec, storage, train_steps(spec)
        job.created_at = job.updated_at = now
        job.attempts, job.cancel_requested, job.idempotency_key = 0, False, idempotency_key
        try:
            with self._tx() as session:
                if quota is not None:
                    quota.check(session, owner, spec, now)
                session.add(job)
                session.flush()
                session.add(
                    Event(job_id=job.id, time=now, kind=EventKind.STATE.value, to_state=job.state, message="submitted",
                          actor=owner, address=address)
                )  # fmt: skip
                record = JobRecord.model_validate(job)
        except IntegrityError:
            # Another submission with the same key committed between our check and our insert.
            if (existing := self.job_by_key(owner, idempotency_key)) is None:
                raise
            return existing, False
        return record, True

    def job_by_key(self, owner: str, idempotency_key: str | None) -> JobRecord | None:
        """The owner's job submitted with this idempotency key, if any."""
        if idempotency_key is None:
            return None
        return self._first(select(Job).where(Job.owner == owner, Job.idempotency_key == idempotency_key))

    def _first(self, query: Select[tuple[Job]]) -> JobRecord | None:
        # A job is read on every API call about it: one statement, no transaction, no session, and the
        # table's columns as a plain row (no ORM object).
        with self._single.connect() as conn:
            result = conn.execute(query.with_only_columns(*Job.__table__.c).limit(1))
            row = result.first()
        return None if row is None else JobRecord.model_validate(dict(zip(result.keys(), row, strict=True)))

    def scalar(self, query: Select[Any]) -> Any:
        """The first column of the first row of one read-only statement (no transaction around it)."""
        with self._single.connect() as conn:
            return conn.execute(query).scalar()

    def get_job(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """The job, or None when there is none (or, with `owner` given, it belongs to someone else)."""
        query = select(Job).where(Job.id == job_id)
        if owner is not None:
            query = query.where(Job.owner == owner)
        return self._first(query)

    def list_jobs(
        self,
        owner: str | None = None,
        state: JobState | None = None,
        limit: int = 50,
        offset: int = 0,
        after: tuple[datetime, str] | None = None,
        record: type[R] = JobSummaryRecord,  # type: ignore[assignment]
    ) -> tuple[list[R], int]:
        """One page of jobs, newest first, and the number of jobs matching the filters.

        `after` (created_at, id) of the last job of the previous page starts the page right after it
        (keyset pagination: an index range, however deep the page); `offset` skips that many jobs.
        Each row is validated into `record` (a model that reads `JobSummaryRecord`'s fields: the API
        builds its page from the rows in one step)."""
        where = []
        if owner is not None:
            where.append(Job.owner == owner)
        if state is not None:
            where.append(Job.state == JobState(state).value)
        count = select(func.count()).select_from(Job).where(*where)
        if after is not None:
            where.append(tuple_(Job.created_at, Job.id) < tuple_(*after))
        query = select(*_SUMMARY).where(*where).order_by(*_NEWEST_FIRST).limit(limit).offset(offset)
        with self.engine.connect() as conn, conn.begin():  # Core, no session: plain rows, one transaction
            total = conn.execute(count).scalar() or 0
            result = conn.execute(query)
            names, rows = tuple(result.keys()), result.all()
        # Plain dicts: pydantic validates one several times faster than a RowMapping.
        return [record.model_validate(dict(zip(names, row, strict=True))) for row in rows], total

    def transition(self, job_id: str, new: JobState, reason: str) -> JobRecord:
        """Move a job to `new` (checked against the state machine under a row lock) and record the event."""
        with self._tx() as session:
            job = self._locked_job(session, job_id)
            self._apply(session, job, JobState(new), reason)
            return JobRecord.model_validate(job)

    @staticmethod
    def _apply(session: Session, job: Job, new: JobState, reason: str) -> None:
        current = JobState(job.state)
        check_transition(job.id, current, new)
        now = utcnow()
        job.state = new.value
        job.updated_at = now
        if new is JobState.RUNNING and job.started_at is None:
            job.started_at = now
        if new in TERMINAL:
            job.finished_at = now
        if new is JobState.FAILED:
            job.failure_reason = reason
        session.add(
            Event(
                job_id=job.id,
                time=now,
                kind=EventKind.STATE.value,
                from_state=current.value,
                to_state=new.value,
                message=reason,
            )
        )

    def apply(self, job_id: str, change: Change) -> int | None:
        """Write one lifecycle change (`service.changes.Change`) in one transaction, under the job's
        row lock; returns the new attempt's number when the change starts one."""
        with self._tx() as session:
            job = self._locked_job(session, job_id)
            now = utcnow()
            if change.close_open is not None:
                outcome, reason = change.close_open
                rows = select(Attempt).where(Attempt.job_id == job_id, Attempt.outcome.is_(None)).with_for_update()
                for attempt in session.scalars(rows).all():
                    attempt.finished_at, attempt.outcome, attempt.reason = now, AttemptOutcome(outcome).value, reason
            if change.end_attempt is not None:
                number, outcome, reason = change.end_attempt
                attempt = self._locked_attempt(session, job_id, number)
                attempt.finished_at, attempt.outcome, attempt.reason = now, AttemptOutcome(outcome).value, reason
            if change.recovery is not None:
                number, seconds, phases = change.recovery
                attempt = self._locked_attempt(session, job_id, number)
                attempt.recovery_s, attempt.recovery_phases = float(seconds), phases
            for kind, message in change.events:
                session.add(Event(job_id=job_id, time=now, kind=EventKind(kind).value, message=message))
            if change.spec is not None:
                job.spec, job.steps = change.spec, train_steps(change.spec)
            for state, reason in change.states:
                self._apply(session, job, JobState(state), reason)
            number = None
            if change.new_attempt:
                job.attempts += 1
                number = job.attempts
                session.add(Attempt(job_id=job_id, number=number, started_at=now))
            session.add_all(LogLine(job_id=job_id, time=now, line=line) for line in change.logs)
            return number

    def request_cancel(self, job_id: str, actor: str | None = None, address: str | None = None) -> JobRecord:
        """Flag the job for cancellation; a QUEUED job is CANCELLED at once. A no-op on a finished job.
        The "cancel" event names `actor` and `address`."""
        with self._tx() as session:
            job = self._locked_job(session, job_id)
            if JobState(job.state) in TERMINAL or job.cancel_requested:
                return JobRecord.model_validate(job)
            job.cancel_requested = True
            job.updated_at = utcnow()
            message = "cancel requested" + (f" by {actor}" if actor else "")
            session.add(
                Event(
                    job_id=job.id,
                    time=job.updated_at,
                    kind=EventKind.CANCEL.value,
                    message=message,
                    actor=actor,
                    address=address,
                )
            )
            if job.state == JobState.QUEUED:
                self._apply(session, job, JobState.CANCELLED, "cancelled while queued")
            return JobRecord.model_validate(job)

    def queued(self, limit: int = 100) -> list[JobRecord]:
        """QUEUED jobs in scheduling order: highest priority first, then oldest first."""
        query = (
            select(Job)
            .where(Job.state == JobState.QUEUED.value)
            .order_by(Job.priority.desc(), Job.created_at.asc(), Job.id.asc())
            .limit(limit)
        )
        with self._read() as session:
            return [JobRecord.model_validate(job) for job in session.scalars(query)]

    def oldest_queued_at(self) -> datetime | None:
        """When the longest-waiting QUEUED job was submitted; None when nothing is queued."""
        query = select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED.value)
        with self._read() as session:
            return session.scalar(query)

    def active(self) -> list[JobRecord]:
        """Jobs in STARTING, RUNNING or RESTARTING, oldest first."""
        query = select(Job).where(Job.state.in_([s.value for s in ACTIVE])).order_by(Job.created_at, Job.id)
        with self._read() as session:
            return [JobRecord.model_validate(job) for job in session.scalars(query)]

    def count_by_state(self) -> dict[JobState, int]:
        """Number of jobs in each state; every state is a key."""
        counts = dict.fromkeys(JobState, 0)
        with self._read() as session:
            for state, n in session.execute(select(Job.state, func.count()).group_by(Job.state)):
                counts[JobState(state)] = n
        return counts

    # -- attempts ------------------------------------------------------------------------------

    def start_attempt(self, job_id: str) -> int:
        """Count one more attempt of the job and return its number (1, 2, ...)."""
        with self._tx() as session:
            job = self._locked_job(session, job_id)
            job.attempts += 1
            session.add(Attempt(job_id=job_id, number=job.attempts, started_at=utcnow()))
            return job.attempts

    def finish_attempt(self, job_id: str, number: int, outcome: str, reason: str | None = None) -> None:
        """Close an attempt with an outcome: succeeded, failed, cancelled, stopped or interrupted."""
        if outcome not in OUTCOMES:
            raise ValueError(f"attempt outcome {outcome!r} is not one of {', '.join(sorted(OUTCOMES))}")
        outcome = AttemptOutcome(outcome).value
        with self._tx() as session:
            attempt = self._locked_attempt(session, job_id, number)
            attempt.finished_at = utcnow()
            attempt.outcome = outcome
            attempt.reason = reason

    def set_recovery(self, job_id: str, number: int, seconds: float) -> None:
        """Record how long the attempt took to resume training after the failure before it."""
        with self._tx() as session:
            self._locked_attempt(session, job_id, number).recovery_s = float(seconds)

    @staticmethod
    def _locked_attempt(session: Session, job_id: str, number: int) -> Attempt:
        query = select(Attempt).where(Attempt.job_id == job_id, Attempt.number == number).with_for_update()
        attempt = session.scalars(query).first()
        if attempt is None:
            raise KeyError(f"{job_id} attempt {number}")
        return attempt

    def close_open_attempts(self, job_id: str, outcome: str, reason: str) -> int:
        """Finish every attempt of the job that has no outcome yet (left by a service that died)."""
        with self._tx() as session:
            rows = session.scalars(
                select(Attempt).where(Attempt.job_id == job_id, Attempt.outcome.is_(None)).with_for_update()
            ).all()
            for attempt in rows:
                attempt.finished_at, attempt.outcome, attempt.reason = utcnow(), outcome, reason
            return len(rows)

    def attempts(self, job_id: str) -> list[AttemptRecord]:
        query = select(Attempt).where(Attempt.job_id == job_id).order_by(Attempt.number, Attempt.id)
        with self._read() as session:
            return [AttemptRecord.model_validate(a) for a in session.scalars(query)]
