"""The job store's history of each job: step metrics, events (and the audit trail), checkpoints, logs.

`JobHistory` is the part of `service.store.Store` that appends to and reads these tables; `Store`
inherits it and gives it its transactions (`_tx`, `_read`) and `_require_job`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.models import CheckpointRecord, Event, Job, LogLine, Metric, utcnow
from service.records import CheckpointRecordOut, EventRecord, LogRecord, MetricRecord

_FLOAT_METRICS = ("loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "step_time_s",
                  "moe_aux_loss", "moe_dropped_frac", "moe_max_load")  # fmt: skip


class JobHistory:
    """Metrics, events, checkpoints and logs of jobs (a base of `service.store.Store`)."""

    _tx: Any  # Store's: () -> context manager of a writing Session
    _read: Any  # Store's: () -> context manager of a read-only Session

    @staticmethod
    def _require_job(session: Session, job_id: str) -> None:
        if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
            raise KeyError(job_id)

    def add_metrics(self, job_id: str, rows: list[dict[str, Any]], attempt: int) -> None:
        """Store the engine's per-step metric dicts; unknown keys are ignored, a repeated (step, attempt) too."""
        if not rows:
            return
        now = utcnow()
        values = [_metric_values(job_id, row, attempt, now) for row in rows]
        newest = max(values, key=lambda v: v["step"])
        with self._tx() as session:
            last = session.execute(select(Job.last_attempt, Job.last_step).where(Job.id == job_id)).first()
            if last is None:
                raise KeyError(job_id)
            insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
            stmt = insert(Metric).on_conflict_do_nothing(index_elements=["job_id", "step", "attempt"])
            session.execute(stmt, values)
            if (attempt, newest["step"]) >= (last.last_attempt or 0, last.last_step or 0):
                # The job row keeps the newest metrics (newest attempt, highest step) for list pages.
                latest = {f"last_{k}": newest[k] for k in ("step", "loss", "tokens_per_s", "mfu")}
                session.execute(update(Job).where(Job.id == job_id).values(last_attempt=int(attempt), **latest))

    def metrics(self, job_id: str, after_step: int = 0, limit: int = 10000) -> list[MetricRecord]:
        """Metrics of steps after `after_step`, by step; a step logged by several attempts gives the newest."""
        newest = (
            select(Metric.step, func.max(Metric.attempt).label("attempt"))
            .where(Metric.job_id == job_id, Metric.step > after_step)
            .group_by(Metric.step)
            .subquery()
        )
        query = (
            select(Metric)
            .join(newest, and_(Metric.step == newest.c.step, Metric.attempt == newest.c.attempt))
            .where(Metric.job_id == job_id)
            .order_by(Metric.step, Metric.attempt)
            .limit(limit)
        )
        with self._read() as session:
            return [MetricRecord.model_validate(m) for m in session.scalars(query)]

    def add_event(self, job_id: str, kind: str, message: str) -> EventRecord:
        with self._tx() as session:
            self._require_job(session, job_id)
            event = Event(job_id=job_id, time=utcnow(), kind=kind, message=message)
            session.add(event)
            session.flush()
            return EventRecord.model_validate(event)

    def audit(
        self, actor: str | None = None, job_id: str | None = None, limit: int = 100, offset: int = 0
    ) -> tuple[list[EventRecord], int]:
        """Events a caller of the API caused (submissions, cancels), newest first, and their number."""
        where = [Event.actor.is_not(None)]
        if actor is not None:
            where.append(Event.actor == actor)
        if job_id is not None:
            where.append(Event.job_id == job_id)
        with self._read() as session:
            total = session.scalar(select(func.count()).select_from(Event).where(*where)) or 0
            query = select(Event).where(*where).order_by(Event.id.desc()).limit(limit).offset(offset)
            return [EventRecord.model_validate(e) for e in session.scalars(query)], total

    def events(self, job_id: str, after_id: int = 0) -> list[EventRecord]:
        query = select(Event).where(Event.job_id == job_id, Event.id > after_id).order_by(Event.id)
        with self._read() as session:
            return [EventRecord.model_validate(e) for e in session.scalars(query)]

    def add_checkpoint(self, job_id: str, step: int, path: str) -> CheckpointRecordOut:
        with self._tx() as session:
            self._require_job(session, job_id)
            ckpt = CheckpointRecord(job_id=job_id, step=step, path=path, time=utcnow())
            session.add(ckpt)
            session.flush()
            return CheckpointRecordOut.model_validate(ckpt)

    def sync_checkpoints(self, job_id: str, present: list[tuple[int, str]]) -> None:
        """Make the job's checkpoint records those on storage now, (step, path) each: new ones are
        added, and those retention deleted are forgotten (after their files went)."""
        with self._tx() as session:
            self._require_job(session, job_id)
            rows = session.scalars(select(CheckpointRecord).where(CheckpointRecord.job_id == job_id)).all()
            known = {(r.step, r.path): r for r in rows}
            for key, row in known.items():
                if key not in present:
                    session.delete(row)
            now = utcnow()
            session.add_all(
                CheckpointRecord(job_id=job_id, step=step, path=path, time=now)
                for step, path in present
                if (step, path) not in known
            )

    def checkpoints(self, job_id: str) -> list[CheckpointRecordOut]:
        query = select(CheckpointRecord).where(CheckpointRecord.job_id == job_id)
        with self._read() as session:
            rows = session.scalars(query.order_by(CheckpointRecord.step, CheckpointRecord.id))
            return [CheckpointRecordOut.model_validate(c) for c in rows]

    def append_logs(self, job_id: str, lines: list[str]) -> None:
        if not lines:
            return
        now = utcnow()
        with self._tx() as session:
            self._require_job(session, job_id)
            session.add_all(LogLine(job_id=job_id, time=now, line=line) for line in lines)

    def logs(self, job_id: str, after_id: int = 0, limit: int = 1000) -> list[LogRecord]:
        query = select(LogLine).where(LogLine.job_id == job_id, LogLine.id > after_id).order_by(LogLine.id)
        with self._read() as session:
            return [LogRecord.model_validate(line) for line in session.scalars(query.limit(limit))]


def _metric_values(job_id: str, row: dict[str, Any], attempt: int, now: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"job_id": job_id, "step": int(row["step"]), "attempt": int(attempt), "time": now}
    for key in _FLOAT_METRICS:
        value = row.get(key)
        values[key] = None if value is None else float(value)
    mem = row.get("peak_mem_bytes")
    values["peak_mem_bytes"] = None if mem is None else int(mem)
    return values
