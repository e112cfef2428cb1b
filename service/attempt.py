"""One attempt of a job: its phase, and one small function per phase that picks the next one.

An attempt goes RESERVING -> STARTING -> TRAINING -> FINISHED, with two ways to stop early:
STOPPING (a cancel: ranks stop after the current step) and RESIZING (stopping at the next
checkpoint to restart at a larger dp); `service.states.PHASES` lists every change allowed. Each
tick the supervisor first applies what was asked (`requested`: a cancel, room to grow), then
observes the ranks (`Seen`) and calls the function of the attempt's phase, which returns the next
phase and, when the attempt is over, how it ended (`End`). The functions only decide; the
supervisor carries the decisions out (Ray calls, one store transaction per change).

The seams the supervisor runs through are Protocols here: a worker group (`workers.group.WorkerGroup`,
or a test's fake) and the two cluster functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from parallel.config import Config
from service.states import AttemptOutcome, AttemptPhase
from workers.group import Status
from workers.placement import Bundle, Plan


class Group(Protocol):
    """The ranks of one attempt on the cluster (workers.group.WorkerGroup)."""

    cfg: Config
    bundles: list[Bundle]
    reserved_at: float

    @property
    def launched(self) -> bool: ...
    def reserve(self, plan: Plan | None = None) -> None: ...
    def is_ready(self) -> bool: ...
    def not_ready(self) -> str: ...
    def launch(self, spec: dict[str, Any] | None = None, storage: dict[str, Any] | None = None) -> None: ...
    def poll(self) -> Status: ...
    def hang(self) -> str | None: ...
    def request_stop(self, at_checkpoint: bool = False) -> None: ...
    def wait(self, timeout_s: float) -> Status: ...
    def teardown(self) -> None: ...


GroupFactory = Callable[..., Group]
"""group_factory(cfg, job_id=...) -> a Group."""
ClusterResources = Callable[[], dict[str, dict[str, float]]]
"""Alive nodes' total resources by node id (workers.group.node_resources)."""
RemoveLeftovers = Callable[[list[str]], int]
"""Remove what these jobs left on the cluster; returns how many things it removed."""


@dataclass
class Attempt:
    group: Group
    number: int
    spec: dict[str, Any]
    failures: int = 0  # failures of this job so far
    phase: AttemptPhase = AttemptPhase.RESERVING
    since: float = 0.0  # monotonic time the phase began
    grow_to: int | None = None  # RESIZING: the dp it restarts at
    recover_from: float | None = None  # monotonic time a failure was detected, until training resumes
    cause: str = ""  # of that failure
    marks: dict[str, float] = field(default_factory=dict)  # a recovery's moments so far (service.recovery.MARKS)
    how: str = ""  # how that recovery brought the state back, for its event
    last_step: int = 0


@dataclass(frozen=True)
class End:
    """How an attempt ended: its outcome, why, and for a failure whether a restart could help."""

    outcome: AttemptOutcome
    reason: str
    permanent: bool = False
    suspects: tuple[str, ...] = ()  # nodes whose ranks stopped answering


@dataclass(frozen=True)
class Seen:
    """What the supervisor observed of a launched attempt this tick."""

    status: Status
    hang: str | None = None
    past_grace: bool = False  # stopping for longer than a cancel may take
    last_step: int = 0  # the newest step the attempt reported


# A rank that failed with one of these fails the same way on every restart: the job ends at once.
PERMANENT_ERRORS = ("StorageRefused:",)


def _ended(seen: Seen) -> End | None:
    """The end every launched phase shares: the ranks finished, or failed, or hang."""
    status = seen.status
    if status.state == "succeeded":
        return End(AttemptOutcome.SUCCEEDED, f"finished {seen.last_step} steps")
    if status.state == "failed":
        cause = status.error or "a rank failed"
        permanent = any(f"raised: {kind}" in cause for kind in PERMANENT_ERRORS)
        return End(AttemptOutcome.FAILED, cause, permanent, status.unreachable_nodes)
    if seen.hang:
        return End(AttemptOutcome.FAILED, seen.hang)
    return None


Next = tuple[AttemptPhase, End | None]


def reserving(cancel: bool, ready: bool, waited_too_long: str | None) -> Next:
    """Waiting for the placement group: a cancel ends it, a ready group starts the ranks."""
    if cancel:
        return AttemptPhase.FINISHED, End(AttemptOutcome.CANCELLED, "cancelled while waiting for room")
    if ready:
        return AttemptPhase.STARTING, None
    if waited_too_long:
        return AttemptPhase.FINISHED, End(AttemptOutcome.FAILED, waited_too_long)
    return AttemptPhase.RESERVING, None


def requested(phase: AttemptPhase, cancel: bool, grow_to: int | None) -> AttemptPhase:
    """Before the ranks are looked at: a cancel stops a launched attempt (a resize too); room for a
    larger dp stops a training one at its next checkpoint."""
    if cancel and phase in (AttemptPhase.STARTING, AttemptPhase.TRAINING, AttemptPhase.RESIZING):
        return AttemptPhase.STOPPING
    if grow_to is not None and phase is AttemptPhase.TRAINING:
        return AttemptPhase.RESIZING
    return phase


def starting(seen: Seen, trains: bool) -> Next:
    """Ranks launched: training once every rank trains (or a step arrived)."""
    if (end := _ended(seen)) is not None:
        return AttemptPhase.FINISHED, end
    return (AttemptPhase.TRAINING if trains else AttemptPhase.STARTING), None


def training(seen: Seen) -> Next:
    if (end := _ended(seen)) is not None:
        return AttemptPhase.FINISHED, end
    return AttemptPhase.TRAINING, None


def resizing(seen: Seen, grow_to: int) -> Next:
    """Stopping at the next checkpoint; stopped, it restarts at `grow_to`."""
    if seen.status.state == "stopped":
        return AttemptPhase.FINISHED, End(AttemptOutcome.STOPPED, f"stopped to grow to dp={grow_to}")
    if (end := _ended(seen)) is not None:
        return AttemptPhase.FINISHED, end
    return AttemptPhase.RESIZING, None


def stopping(seen: Seen) -> Next:
    """A cancel: the ranks stop after their current step; killed past the grace period."""
    if seen.status.state == "stopped":
        return AttemptPhase.FINISHED, End(AttemptOutcome.CANCELLED, f"cancelled; stopped after step {seen.last_step}")
    if (end := _ended(seen)) is not None:
        return AttemptPhase.FINISHED, end
    if seen.past_grace:
        killed = "cancelled; ranks did not stop in time and were killed"
        return AttemptPhase.FINISHED, End(AttemptOutcome.CANCELLED, killed)
    return AttemptPhase.STOPPING, None


# The texts several places write, in one place.
def elastic_note(run_dp: int, spec_dp: int) -> str:
    return f" at dp={run_dp} (elastic; the spec asks dp={spec_dp})" if run_dp != spec_dp else ""


TRAINING_REASON = "every rank joined; training"
