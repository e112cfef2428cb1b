"""Job states and attempt phases of the control plane, each with the one table of changes allowed.

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


class AttemptPhase(StrEnum):
    """Where one attempt of a job is; `service.attempt` decides the next phase from what it sees."""

    RESERVING = "reserving"  # its placement group is asked for, not ready yet
    STARTING = "starting"  # ranks launched, not all of them training yet
    TRAINING = "training"
    RESIZING = "resizing"  # stopping at its next checkpoint, to restart at a larger dp
    STOPPING = "stopping"  # a cancel: ranks stop after the current step (checkpointing first)
    FINISHED = "finished"  # ended one way or another (its AttemptOutcome says which)


PHASES: dict[AttemptPhase, frozenset[AttemptPhase]] = {
    AttemptPhase.RESERVING: frozenset({AttemptPhase.STARTING, AttemptPhase.FINISHED}),
    AttemptPhase.STARTING: frozenset({AttemptPhase.TRAINING, AttemptPhase.STOPPING, AttemptPhase.FINISHED}),
    # TRAINING -> STARTING: an in-place recovery (workers.inplace) starts a rank again in the same group
    AttemptPhase.TRAINING: frozenset(
        {AttemptPhase.STARTING, AttemptPhase.RESIZING, AttemptPhase.STOPPING, AttemptPhase.FINISHED}
    ),
    AttemptPhase.RESIZING: frozenset({AttemptPhase.STOPPING, AttemptPhase.FINISHED}),  # a cancel overrides
    AttemptPhase.STOPPING: frozenset({AttemptPhase.FINISHED}),
    AttemptPhase.FINISHED: frozenset(),
}


def check_phase(job_id: str, current: AttemptPhase, new: AttemptPhase) -> None:
    """Raise ValueError unless `current -> new` is in `PHASES` (staying in a phase is no change)."""
    if new != current and new not in PHASES[current]:
        allowed = ", ".join(sorted(PHASES[current])) or "none"
        raise ValueError(f"job {job_id}: an attempt cannot go from {current} to {new} (allowed next: {allowed})")


class AttemptOutcome(StrEnum):
    """How an attempt ended. interrupted: the service stopped (or died) while it ran, which is not one
    of the job's failures."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    STOPPED = "stopped"  # stopped to restart at another dp
    INTERRUPTED = "interrupted"


class EventKind(StrEnum):
    STATE = "state"  # a job state change
    CANCEL = "cancel"  # a caller asked to cancel
    FAILURE = "failure"  # an attempt failed (its cause)
    RECOVERY = "recovery"  # training resumed after a failure (how long it took)
    START = "start"  # the first step after submission (how long it took, and where the seconds went)
    PLAN = "plan"  # the planner chose the layout of a spec's auto fields (which, and why)
