"""The service dies between any two of its store writes, and the job still ends exactly once, right.

Fault injection at the store's seams: for each scenario the supervisor runs against the real store
(in-memory SQLite) through a wrapper that raises `Crash` (the process dying) just before its n-th
write, for n = 1, 2, ... until a run finishes without reaching the crash. After each crash a new
supervisor on the same store adopts what it finds and runs the job to its end. Every lifecycle
change being one transaction (service.changes) is what makes this hold: the store is always before
or after a change, never half way.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from parallel.config import build_config
from service.states import TERMINAL, AttemptOutcome, JobState
from service.store import Store
from service.supervisor import Supervisor
from workers.group import Status

WRITES = frozenset(
    {"apply", "transition", "add_metrics", "append_logs", "add_event", "sync_checkpoints", "set_recovery",
     "start_attempt", "finish_attempt", "close_open_attempts"}
)  # fmt: skip


class Crash(BaseException):
    """The service process dies here (a BaseException: nothing in the supervisor catches it)."""


class CrashingStore:
    """The real store, except that the service dies just before its `crash_at`-th write."""

    def __init__(self, store: Store, crash_at: int) -> None:
        self._store, self._crash_at, self.writes = store, crash_at, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in WRITES:
            return attr

        def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes == self._crash_at:
                raise Crash(name)
            return attr(*args, **kwargs)

        return write


def _metric(step: int) -> dict[str, float]:
    return {"step": step, "loss": 5.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 100.0, "tflops": 0.1,
            "mfu": 0.2, "step_time_s": 0.1, "peak_mem_bytes": 1}  # fmt: skip


class ScriptedGroup:
    """A worker group whose attempt plays the next behaviour of `script`: `succeed` (trains a step,
    then finishes), `fail` (trains a step, then a rank raises) or `hold` (trains until asked to stop)."""

    script: Iterator[str] = iter(())

    def __init__(self, cfg: Any, job_id: str) -> None:
        self.cfg, self.bundles, self.reserved_at = cfg, [], time.monotonic()
        self.launched, self.stopped, self.polls = False, False, 0
        self.behaviour = next(ScriptedGroup.script)

    def reserve(self, plan: Any) -> None:
        self.bundles = [(n, {"CPU": float(len(plan.on_node(n)))}) for n in plan.nodes()]

    def is_ready(self) -> bool:
        return True

    def not_ready(self) -> str:
        return "never"

    def launch(self, spec: dict, storage: dict | None = None) -> None:
        self.launched = True

    def poll(self) -> Status:
        self.polls += 1
        if self.polls == 1:
            return Status("running", [_metric(1)], training=True)
        if self.behaviour == "hold":
            return Status("stopped" if self.stopped else "running", training=True)
        if self.behaviour == "fail":
            return Status("failed", error="rank 1 (node node-a) raised: RuntimeError: boom")
        return Status("succeeded", [_metric(2)], training=True)

    def hang(self) -> str | None:
        return None

    def request_stop(self, at_checkpoint: bool = False) -> None:
        self.stopped = True

    def wait(self, timeout_s: float) -> Status:
        return Status("stopped")

    def teardown(self) -> None:
        self.bundles = []


def _supervisor(store: Any) -> Supervisor:
    return Supervisor(
        store, group_factory=ScriptedGroup, resources=lambda: {"node-a": {"CPU": 4.0}}, leftovers=lambda ids: 0
    )


SCENARIOS = {
    # name: (script of attempts, cancel after the first attempt launched, max_failures, expected end)
    "succeeds": (["succeed"] * 20, False, 2, JobState.SUCCEEDED),
    "fails-once-then-succeeds": (["fail"] + ["succeed"] * 20, False, 2, JobState.SUCCEEDED),
    "always-fails": (["fail"] * 20, False, 1, JobState.FAILED),
    "cancelled-while-running": (["hold"] * 20, True, 2, JobState.CANCELLED),
}


def _run(sup: Supervisor, store: Store, job_id: str, cancel: bool, ticks: int = 40) -> None:
    for i in range(ticks):
        sup.tick()
        if cancel and i == 1:
            store.request_cancel(job_id)  # the API's write, not the service's
        if store.get_job(job_id).state in TERMINAL:
            return


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_crash_between_any_two_writes_ends_the_job_once_with_the_right_outcome(name: str) -> None:
    script, cancel, max_failures, expected = SCENARIOS[name]
    spec = {"name": name, "parallel": {"dp": 2}, "train": {"steps": 2, "global_batch": 4, "micro_batch": 2},
            "restart": {"max_failures": max_failures, "backoff_s": 0}}  # fmt: skip
    crashed_at = []
    for crash_at in range(1, 200):
        store = Store("sqlite://")
        job, _ = store.create_job(build_config(spec).model_dump(mode="json", by_alias=True), "ada", name)
        ScriptedGroup.script = iter(script)
        try:
            _run(_supervisor(CrashingStore(store, crash_at)), store, job.id, cancel)
        except Crash:
            crashed_at.append(crash_at)
            _run(_supervisor(store), store, job.id, cancel and not store.get_job(job.id).cancel_requested)
        else:
            break  # this run made fewer writes than crash_at: every seam has been tried
        finally:
            final = store.get_job(job.id)
            ends = [e for e in store.events(job.id) if e.to_state in TERMINAL]
            attempts = store.attempts(job.id)
            store.close()
        where = f"{name}, crash before write {crash_at}"
        assert final.state == expected, f"{where}: {final.state} ({final.failure_reason})"
        assert len(ends) == 1, f"{where}: ended {len(ends)} times"
        assert all(a.outcome is not None for a in attempts), f"{where}: an attempt left open"
        failed = sum(a.outcome == AttemptOutcome.FAILED for a in attempts)
        if name == "always-fails":
            assert failed == max_failures + 1, where
        elif name == "fails-once-then-succeeds":
            assert failed <= 1, where
    assert len(crashed_at) >= 5, crashed_at  # the scenario has that many seams, each one tried
