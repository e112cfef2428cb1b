"""Runs jobs: admits queued ones onto the Ray cluster, watches them, records what happens.

    sup = Supervisor(store, metrics)      # Ray must be connected (workers.run.connect())
    sup.start()                           # adopts jobs a previous process left, then ticks every poll_s
    ...
    sup.stop()                            # ranks stop at a step boundary (checkpointed); jobs resume later

Each tick, for every job it runs: launch its ranks once its placement group is ready (or
fail the attempt when it never is), store new step metrics and a log line per step, move
STARTING to RUNNING once every rank trains, carry out a requested cancel (ranks stop at a
step boundary, saving a checkpoint when configured), grow an elastic job back to its full
dp at its next checkpoint when room returns, and detect failures: a rank that raised, a
worker process that died, a hang (`workers.health`: silent ranks, or no progress for
restart.hang_timeout_s). A failed attempt is torn down completely, then the job restarts
(RESTARTING -> STARTING -> RUNNING) from its newest complete checkpoint after an exponential
backoff, at the largest dp that fits (down to parallel.dp_min), until restart.max_failures.
The time from detection to the new attempt's first step is its recovery time (stored with
the attempt, exported, shown on the job page). Then queued jobs are admitted
(`service.scheduler.admit`) onto the slots running jobs do not hold.

Active jobs the supervisor does not hold (left by a service process that died, whose
workers Ray removes with it) are adopted: whatever of theirs is left on the cluster is
removed first, so nothing runs twice, then they restart from their checkpoints.

Nothing here knows about HTTP, and Ray only through `workers` (tests pass fakes).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parallel.checkpoint import list_checkpoints
from parallel.config import Config, build_config
from service.metrics import ServiceMetrics
from service.recovery import backoff_s, fit, resume_spec
from service.scheduler import admit
from service.states import JobState
from service.store import Store
from workers.group import WorkerGroup, node_resources, remove_leftovers
from workers.placement import Plan

log = logging.getLogger("fourfold.supervisor")
CANCEL_GRACE_S = 60.0  # a cancelled job's ranks get this long to stop at a step boundary
SHUTDOWN_GRACE_S = 30.0  # at service stop, ranks get this long to stop (and checkpoint) before they are killed
READY_TIMEOUT_S = 60.0  # a placement group not ready by then fails the attempt
# A rank that failed with one of these fails the same way on every restart: the job ends at once.
PERMANENT_ERRORS = ("StorageRefused:",)
NODE_VERDICT_S = 30.0  # how long a restart waits for Ray to declare dead a node whose ranks stopped answering


@dataclass
class Running:
    group: Any  # a WorkerGroup
    attempt: int
    spec: dict[str, Any]
    failures: int = 0  # failures of this job so far
    recover_from: float | None = None  # monotonic time a failure was detected, until training resumes
    cause: str = ""
    stopping_since: float | None = None
    growing_to: int | None = None  # stopping at the next checkpoint to restart at this larger dp
    last_step: int = 0
    saw_training: bool = False


@dataclass
class Pending:
    """A job waiting for its restart."""

    due: float  # monotonic
    failures: int
    cause: str
    detected: float | None  # monotonic time of the failure; None for a restart that is not one (growing)
    waiting_logged: bool = False
    suspects: tuple[str, ...] = ()  # nodes whose ranks stopped answering: not planned on until Ray's verdict
    verdict_logged: bool = False


class Supervisor:
    def __init__(
        self,
        store: Store,
        metrics: ServiceMetrics | None = None,
        poll_s: float = 0.5,
        group_factory: Callable[..., Any] = WorkerGroup,
        resources: Callable[[], dict[str, dict[str, float]]] = node_resources,
        leftovers: Callable[[list[str]], int] = remove_leftovers,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ) -> None:
        """group_factory, resources and leftovers reach Ray through `workers`; tests pass fakes."""
        self.store, self.metrics, self.poll_s = store, metrics or ServiceMetrics(), poll_s
        self.ready_timeout_s = ready_timeout_s
        self.group_factory, self.resources, self.leftovers = group_factory, resources, leftovers
        self.running: dict[str, Running] = {}
        self.restarting: dict[str, Pending] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._adopt("the service restarted while this job ran; its workers went with the old process")
        self._thread = threading.Thread(target=self._loop, name="fourfold-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising. Running jobs stop at a step boundary (saving a checkpoint when
        configured) and wait in RESTARTING: the next service to start resumes them."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for run in self.running.values():
                if run.group.launched:
                    run.group.request_stop()
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for job_id, run in list(self.running.items()):
                if run.group.launched:
                    status = run.group.wait(max(deadline - time.monotonic(), 0.1))
                    self._store_metrics(job_id, run, status.metrics)
                self.running.pop(job_id)
                self._teardown(job_id, run)
                self.store.finish_attempt(job_id, run.attempt, "interrupted", "the service stopped")
                reason = "the service stopped; the job resumes from its newest checkpoint when the service starts"
                self.store.transition(job_id, JobState.RESTARTING, reason)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # keep supervising; the cause goes to the log
                log.exception("supervisor tick failed")
            self._stop.wait(self.poll_s)

    def tick(self) -> None:
        with self._lock:
            for job_id in list(self.running):
                try:
                    self._watch(job_id, self.running[job_id])
                except Exception as err:  # e.g. a Ray call on a lost node: fail this job, not the loop
                    log.exception("watching job %s failed", job_id)
                    if job_id in self.running:
                        self._failed(job_id, self.running[job_id], f"lost contact with the job's workers: {err}")
            self._adopt("the supervisor lost track of this job")
            self._restart_due()
            self._admit()
            self.metrics.set_counts(self.store.count_by_state())
            self.metrics.set_queue_wait(self.store.oldest_queued_at())

    def _adopt(self, cause: str) -> None:
        """Take on active jobs that no part of this supervisor holds: remove what of theirs is
        left on the cluster, close their open attempts, and schedule their restart now."""
        orphans = [j for j in self.store.active() if j.id not in self.running and j.id not in self.restarting]
        if not orphans:
            return
        found = self.leftovers([j.id for j in orphans])
        now = time.monotonic()
        for job in orphans:
            self.store.close_open_attempts(job.id, "interrupted", cause)
            failures = sum(a.outcome == "failed" for a in self.store.attempts(job.id))
            note = f"; removed {found} leftover actor(s) and placement group(s) first" if found else ""
            if job.state != JobState.RESTARTING:
                self.store.transition(job.id, JobState.RESTARTING, f"{cause}; restarting from the newest checkpoint")
            self.store.append_logs(job.id, [f"adopted: {cause}{note}"])
            self.restarting[job.id] = Pending(now, failures, cause, now)

    # -- running jobs --------------------------------------------------------------
    def _watch(self, job_id: str, run: Running) -> None:
        job = self.store.get_job(job_id)
        group = run.group
        if not group.launched:  # waiting for the placement group
            if job is not None and job.cancel_requested:
                self._end(job_id, JobState.CANCELLED, "cancelled while waiting for room", "cancelled")
            elif group.is_ready():
                try:
                    group.launch(run.spec, job.storage if job is not None else None)
                except Exception as err:  # an actor that never started, a bundle on the wrong node
                    self._failed(job_id, run, f"could not start the ranks: {err}")
                    return
                self.store.append_logs(
                    job_id, [f"attempt {run.attempt}: {group.cfg.parallel.world_size} ranks started"]
                )
            elif time.monotonic() - group.reserved_at > self.ready_timeout_s:
                self._failed(job_id, run, f"placement group never became ready: {group.not_ready()}")
            return
        if job is not None and job.cancel_requested and (run.stopping_since is None or run.growing_to is not None):
            run.stopping_since, run.growing_to = time.monotonic(), None
            group.request_stop()
            self.store.append_logs(job_id, ["cancel requested: ranks stop after the current step"])
        elif job is not None and run.stopping_since is None and run.saw_training:
            self._maybe_grow(job, run)
        status = group.poll()
        self._store_metrics(job_id, run, status.metrics, job)
        if (status.metrics or status.training) and not run.saw_training:
            run.saw_training = True
            self.store.transition(job_id, JobState.RUNNING, "every rank joined; training")
        if status.state == "succeeded":
            self._end(job_id, JobState.SUCCEEDED, f"finished {run.last_step} steps", "succeeded")
        elif status.state == "stopped" and run.growing_to is not None:
            self.running.pop(job_id)
            self._teardown(job_id, run)
            self.store.finish_attempt(job_id, run.attempt, "stopped", f"stopped to grow to dp={run.growing_to}")
            reason = f"room for dp={run.growing_to} again: checkpointed at step {run.last_step}, growing back"
            self.store.transition(job_id, JobState.RESTARTING, reason)
            self.restarting[job_id] = Pending(time.monotonic(), run.failures, "growing back", None)
        elif status.state == "stopped":
            self._end(job_id, JobState.CANCELLED, f"cancelled; stopped after step {run.last_step}", "cancelled")
        elif status.state == "failed":
            cause = status.error or "a rank failed"
            permanent = any(f"raised: {kind}" in cause for kind in PERMANENT_ERRORS)  # the same on every try
            self._failed(job_id, run, cause, suspects=status.unreachable_nodes, permanent=permanent)
        elif hang := group.hang():
            self._failed(job_id, run, hang)
        elif run.stopping_since is not None and run.growing_to is None and self._past_grace(run):
            self._end(job_id, JobState.CANCELLED, "cancelled; ranks did not stop in time and were killed", "cancelled")

    @staticmethod
    def _past_grace(run: Running) -> bool:
        return run.stopping_since is not None and time.monotonic() - run.stopping_since > CANCEL_GRACE_S

    def _store_metrics(self, job_id: str, run: Running, metrics: list[dict[str, Any]], job: Any = None) -> None:
        if not metrics:
            return
        self.store.add_metrics(job_id, metrics, run.attempt)
        self.store.append_logs(job_id, [_progress(m, job) for m in metrics])
        self.metrics.observe_step(job_id, metrics[-1])
        run.last_step = metrics[-1]["step"]
        if run.recover_from is not None:
            seconds = time.monotonic() - run.recover_from
            run.recover_from = None
            self.metrics.observe_recovery(job_id, seconds)
            self.store.set_recovery(job_id, run.attempt, seconds)
            message = f"training resumed {seconds:.1f} s after the failure was detected ({run.cause})"
            self.store.add_event(job_id, "recovery", message)

    def _end(self, job_id: str, state: JobState, reason: str, outcome: str) -> None:
        run = self.running.pop(job_id)
        self._teardown(job_id, run)
        self.store.finish_attempt(job_id, run.attempt, outcome, reason)
        job = self.store.get_job(job_id)
        if state == JobState.SUCCEEDED and job is not None and job.state == JobState.STARTING:
            self.store.transition(job_id, JobState.RUNNING, "every rank joined; training")  # too short to see
        self.store.transition(job_id, state, reason)
        self.store.append_logs(job_id, [f"{state.value}: {reason}"])
        self.metrics.forget(job_id)

    def _teardown(self, job_id: str, run: Running) -> None:
        """Remove the attempt's actors and placement group (waiting until Ray has), and record
        the checkpoints it left; a failure here is logged, never leaves the job untracked."""
        try:
            run.group.teardown()
        except Exception:
            log.exception("tearing down job %s failed", job_id)
        try:
            self._record_checkpoints(job_id, run.group.cfg)
        except Exception:
            log.exception("listing the checkpoints of job %s failed", job_id)

    def _maybe_grow(self, job: Any, run: Running) -> None:
        """A job running below its spec's dp (it shrank when a node went) grows back once the
        cluster, counting the slots it holds now, fits a larger dp: it stops right after its next
        scheduled checkpoint and restarts from it at the larger dp."""
        want = job.spec["parallel"]["dp"]
        if run.group.cfg.parallel.dp >= want or not run.group.cfg.checkpoint.dir:
            return
        free, _ = self.free_resources()
        for node, bundle in run.group.bundles:  # the slots this job would give back
            for key, amount in bundle.items():
                free.setdefault(node, {})[key] = free.get(node, {}).get(key, 0) + amount
        fitted = fit(build_config(job.spec), free)
        if fitted is None or fitted[0].parallel.dp <= run.group.cfg.parallel.dp:
            return
        run.growing_to = fitted[0].parallel.dp
        run.stopping_since = time.monotonic()
        run.group.request_stop(at_checkpoint=True)
        self.store.append_logs(job.id, [f"room for dp={run.growing_to}: stopping at the next checkpoint to grow back"])

    def _failed(
        self, job_id: str, run: Running, cause: str, suspects: tuple[str, ...] = (), permanent: bool = False
    ) -> None:
        """Tear the attempt down completely, then restart after a backoff, or end FAILED past
        max_failures (or at once when the cause is `permanent`)."""
        self.running.pop(job_id, None)
        self._teardown(job_id, run)
        self.store.finish_attempt(job_id, run.attempt, "failed", cause)
        self.store.add_event(job_id, "failure", cause)
        self.store.append_logs(job_id, [f"failure: {cause}"])
        failures, restart = run.failures + 1, run.group.cfg.restart
        if failures > restart.max_failures or permanent:
            reason = f"{cause} (failed {failures} times; restart.max_failures={restart.max_failures})"
            reason = cause if permanent else reason
            self.store.transition(job_id, JobState.FAILED, reason)
            self.metrics.forget(job_id)
            return
        delay = backoff_s(restart, failures)
        note = f"restart {failures} of {restart.max_failures} in {delay:.0f} s"
        self.store.transition(job_id, JobState.RESTARTING, f"{cause}; {note}")
        self.metrics.restarts.labels(job=job_id).inc()
        now = time.monotonic()
        self.restarting[job_id] = Pending(now + delay, failures, cause, now, suspects=suspects)

    def _restart_due(self) -> None:
        for job_id, pending in list(self.restarting.items()):
            job = self.store.get_job(job_id)
            if job is None or job.cancel_requested:  # a cancel does not wait out the backoff
                self.restarting.pop(job_id)
                if job is not None:
                    self.store.transition(job_id, JobState.CANCELLED, "cancelled while waiting to restart")
                continue
            if time.monotonic() < pending.due:
                continue
            if self._awaits_verdict(job_id, pending):
                continue
            cfg = build_config(job.spec)
            fitted = fit(cfg, self.free_resources()[0])
            if fitted is None:  # no room yet (a node is gone and dp_min does not allow fewer ranks)
                if not pending.waiting_logged:
                    pending.waiting_logged = True
                    self.store.append_logs(job_id, ["restart waits for room on the cluster"])
                continue
            run_cfg, plan = fitted
            elastic = f" at dp={run_cfg.parallel.dp} (elastic; the spec asks dp={cfg.parallel.dp})"
            note = elastic if run_cfg.parallel.dp != cfg.parallel.dp else ""
            self._backfill_metrics(job_id, cfg.checkpoint.dir, job.attempts)
            self.store.transition(job_id, JobState.STARTING, f"restarting from the newest checkpoint{note}")
            self.restarting.pop(job_id)
            run = self._start_attempt(job_id, run_cfg, plan, resume_spec(run_cfg), pending.failures)
            run.recover_from, run.cause = pending.detected, pending.cause

    def _awaits_verdict(self, job_id: str, pending: Pending) -> bool:
        """Whether the restart waits for Ray to declare a node dead whose ranks stopped answering:
        Ray lists a lost node alive until its health checks have failed for a while (9-11 s seen),
        and a plan made before then puts a rank there, whose bundle never becomes ready. Waits at
        most NODE_VERDICT_S after the failure; a node still alive then is taken as healthy."""
        if not pending.suspects or pending.detected is None:
            return False
        if time.monotonic() - pending.detected > NODE_VERDICT_S:
            return False
        alive = [n for n in pending.suspects if n in self.resources()]
        if alive and not pending.verdict_logged:
            pending.verdict_logged = True
            names = ", ".join(n[:12] for n in alive)
            self.store.append_logs(
                job_id, [f"restart waits for Ray's verdict on node {names} (its ranks stopped answering)"]
            )
        return bool(alive)

    def _start_attempt(self, job_id: str, cfg: Config, plan: Plan, spec: dict[str, Any], failures: int) -> Running:
        """Reserve the attempt's placement group (without waiting for it) and track the job."""
        attempt = self.store.start_attempt(job_id)
        run = Running(self.group_factory(cfg, job_id=job_id), attempt, spec, failures)
        self.running[job_id] = run
        try:
            run.group.reserve(plan)
        except Exception as err:  # counts as a failure of this attempt
            self._failed(job_id, run, f"could not reserve the placement group: {err}")
        return run

    def _backfill_metrics(self, job_id: str, ckpt_dir: str | None, attempt: int) -> None:
        """Steps the old attempt trained and checkpointed but whose metrics never reached the store
        (the service died first) are in the checkpoints' meta.json, each holding the steps since the
        one before; the restart resumes after the newest. Every checkpoint retention kept is read."""
        if not ckpt_dir or attempt < 1:
            return
        for c in list_checkpoints(ckpt_dir):
            if c.complete:
                self.store.add_metrics(job_id, c.meta.get("metrics", []), attempt)

    def _record_checkpoints(self, job_id: str, cfg: Config) -> None:
        if cfg.checkpoint.dir:
            done = [(c.step, c.path) for c in list_checkpoints(cfg.checkpoint.dir) if c.complete]
            self.store.sync_checkpoints(job_id, done)

    # -- admission -----------------------------------------------------------------
    def free_resources(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """(free, total) resources per alive node, free = total minus what our jobs reserved."""
        with self._lock:
            total = self.resources()
            free = {node: dict(res) for node, res in total.items()}
            for run in self.running.values():
                for node, bundle in run.group.bundles:
                    for key, amount in bundle.items():
                        if node in free:
                            free[node][key] = free[node].get(key, 0) - amount
            return free, total

    def _admit(self) -> None:
        queued = self.store.queued()
        if not queued:
            return
        free, total = self.free_resources()
        for d in admit(queued, free, total):
            job = next(j for j in queued if j.id == d.job_id)
            if d.action == "refuse":
                self.store.transition(job.id, JobState.STARTING, "checking placement")
                self.store.transition(job.id, JobState.FAILED, f"cannot be placed on this cluster: {d.reason}")
                continue
            spec_dp = job.spec["parallel"]["dp"]
            note = (
                f" at dp={d.cfg.parallel.dp} (elastic; the spec asks dp={spec_dp})"
                if d.cfg.parallel.dp != spec_dp
                else ""
            )
            self.store.transition(job.id, JobState.STARTING, f"placed on {len(d.plan.nodes())} node(s){note}")
            spec = job.spec if not note else d.cfg.model_dump(mode="json", by_alias=True)
            self._start_attempt(job.id, d.cfg, d.plan, spec, failures=0)


def _progress(m: dict, job: object) -> str:
    steps = getattr(job, "spec", {}).get("train", {}).get("steps", "?")
    return (
        f"step {m['step']}/{steps} | loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s | "
        f"mfu {m['mfu']:.1%} | {m['step_time_s'] * 1e3:.0f} ms"
    )
