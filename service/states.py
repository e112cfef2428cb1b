"""Job states of the control plane and the one table of transitions allowed between them.

Every state change of a job goes through `check_transition`, which raises `InvalidTransition`
(a `ValueError`) naming the job, both states and what would have been allowed:

    from service.states import JobState, check_transition
    check_transition("4f2a...", JobState.QUEUED, JobState.STARTING)   # fine
    check_transition("4f2a...", JobState.SUCCEEDED, JobState.RUNNING)  # raises InvalidTransition
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "QUEUED"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RESTARTING = "RESTARTING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


# The whole state machine, written down once. A terminal state has no way out.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.STARTING, JobState.CANCELLED}),
    JobState.STARTING: frozenset(
        {JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED, JobState.RESTARTING}
    ),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.RESTARTING}),
    JobState.RESTARTING: frozenset({JobState.STARTING, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

TERMINAL: frozenset[JobState] = frozenset(state for state, nxt in TRANSITIONS.items() if not nxt)

# Jobs that hold (or are acquiring) resources.
ACTIVE: frozenset[JobState] = frozenset({JobState.STARTING, JobState.RUNNING, JobState.RESTARTING})

_ORDER = list(JobState)


class InvalidTransition(ValueError):
    """A state change the state machine does not allow."""

    def __init__(self, job_id: str, current: JobState, new: JobState) -> None:
        self.job_id = job_id
        self.current = JobState(current)
        self.new = JobState(new)
        self.allowed = sorted(TRANSITIONS[self.current], key=_ORDER.index)
        allowed = ", ".join(self.allowed) if self.allowed else f"none, {self.current} is terminal"
        super().__init__(f"job {job_id}: cannot go from {self.current} to {self.new} (allowed next: {allowed})")


def check_transition(job_id: str, current: JobState, new: JobState) -> None:
    """Raise `InvalidTransition` unless `current -> new` is in `TRANSITIONS`."""
    if JobState(new) not in TRANSITIONS[JobState(current)]:
        raise InvalidTransition(job_id, current, new)
