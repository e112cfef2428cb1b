"""A lifecycle change of one job, which `Store.apply` writes in one transaction.

    store.apply(job_id, Change(end_attempt=(2, AttemptOutcome.FAILED, cause),
                               events=((EventKind.FAILURE, cause),), logs=(f"failure: {cause}",),
                               states=((JobState.RESTARTING, f"{cause}; restart 1 of 3 in 2 s"),)))

Everything a change records (the attempt's outcome, its events, the job's state changes, a new
attempt, log lines) commits together or not at all, so a service that dies at any point leaves the
store either before the change or after it, which adoption (`service.supervisor`) reads without
guessing. Parts are applied in the order of the fields below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.states import AttemptOutcome, EventKind, JobState


@dataclass(frozen=True)
class Change:
    close_open: tuple[AttemptOutcome, str] | None = None
    """Finish every attempt of the job that has no outcome yet (left by a service that died)."""
    end_attempt: tuple[int, AttemptOutcome, str | None] | None = None
    """(number, outcome, reason) of the attempt that ended."""
    recovery: tuple[int, float, dict[str, float] | None] | None = None
    """(attempt number, seconds, seconds per phase): how long that attempt took to resume training after a
    failure, and where the time went (`service.recovery.PHASES`)."""
    events: tuple[tuple[EventKind, str], ...] = ()
    """Events other than state changes, (kind, message) each."""
    states: tuple[tuple[JobState, str], ...] = ()
    """State changes in order, (new state, reason) each, each checked against the state machine."""
    spec: dict[str, Any] | None = None
    """The job's spec from now on (its auto layout fields resolved by the planner)."""
    new_attempt: bool = False
    """Count one more attempt (its number is what `Store.apply` returns)."""
    logs: tuple[str, ...] = ()
    """Lines for the job's log."""
