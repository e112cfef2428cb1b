"""Per-user quotas, checked by `Store.create_job` inside the transaction that stores the job.

    quota = Quota(ranks=64, queued=20, per_minute=30)     # None: no limit of that kind
    store.create_job(spec, "ada", "tiny", quota=quota)    # QuotaExceeded: nothing stored

ranks: the ranks (dp x tp x pp x cp) of the user's queued and active jobs together, this one included;
queued: the user's jobs waiting in QUEUED; per_minute: the user's submissions in the last 60 s.
Two submissions of one user at once cannot both slip under a limit: on SQLite the writing
transaction holds the write lock from its start, on PostgreSQL a per-user advisory lock is taken
first.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from service.models import Job
from service.states import ACTIVE, JobState

WINDOW_S = 60.0
_LOCK_SPACE = 0x0F0F_0000  # advisory lock keys: this plus a hash of the user name


class QuotaExceeded(Exception):
    """A submission over one of the user's limits: `limit` names it, `retry_after` says when to try again."""

    def __init__(self, limit: str, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.limit, self.message, self.retry_after = limit, message, max(1, int(retry_after))


def world_size(spec: dict[str, Any]) -> int:
    """The ranks a spec runs: dp x tp x pp x cp, or for a layout left to the planner, plan.ranks."""
    plan = spec.get("plan") or {}
    if plan.get("auto") and plan.get("ranks"):
        return int(plan["ranks"])
    p = spec.get("parallel", {})
    return int(p.get("dp", 1)) * int(p.get("tp", 1)) * int(p.get("pp", 1)) * int(p.get("cp", 1))


@dataclass(frozen=True)
class Quota:
    ranks: int | None = None
    queued: int | None = None
    per_minute: int | None = None

    def check(self, session: Session, owner: str, spec: dict[str, Any], now: datetime) -> None:
        """Raise QuotaExceeded when storing `spec` for `owner` now would pass one of the limits."""
        if self.ranks is None and self.queued is None and self.per_minute is None:
            return
        if session.get_bind().dialect.name == "postgresql":
            key = _LOCK_SPACE + zlib.crc32(owner.encode()) % 0xFFFF
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        mine = select(Job).where(Job.owner == owner)
        if self.per_minute is not None:
            since = now - timedelta(seconds=WINDOW_S)
            times = session.scalars(
                select(Job.created_at).where(Job.owner == owner, Job.created_at > since).order_by(Job.created_at)
            ).all()
            if len(times) >= self.per_minute:
                wait = WINDOW_S - (now - times[len(times) - self.per_minute]).total_seconds()
                raise QuotaExceeded(
                    "submissions_per_minute",
                    f"quota: {owner} submitted {len(times)} jobs in the last minute; the limit is {self.per_minute}",
                    math.ceil(wait),
                )
        if self.queued is not None:
            waiting = session.scalar(
                select(func.count()).select_from(Job).where(Job.owner == owner, Job.state == JobState.QUEUED.value)
            )
            if (waiting or 0) >= self.queued:
                raise QuotaExceeded(
                    "queued_jobs", f"quota: {owner} has {waiting} queued jobs; the limit is {self.queued}", 30
                )
        if self.ranks is not None:
            states = [JobState.QUEUED.value, *(s.value for s in ACTIVE)]
            held = sum(world_size(job.spec) for job in session.scalars(mine.where(Job.state.in_(states))))
            want = world_size(spec)
            if held + want > self.ranks:
                raise QuotaExceeded(
                    "ranks",
                    f"quota: {owner}'s queued and running jobs hold {held} ranks and this one needs {want}; "
                    f"the limit is {self.ranks}",
                    60,
                )
