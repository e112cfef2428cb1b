"""Runs jobs: admits queued ones onto the Ray cluster, watches them, records what happens.

    sup = Supervisor(store, metrics)      # Ray must be connected (workers.run.connect())
    sup.start()                           # a thread that calls tick() every settings.poll_s
    ...
    sup.stop()                            # stops the thread and tears every running group down

Each tick: for every running job, store its new step metrics and a log line per step,
move STARTING to RUNNING once the ranks train, carry out a requested cancel (ranks stop
at a step boundary, saving a checkpoint when configured), detect failures (a rank that
raised, a worker process that died, ranks silent for restart.hang_timeout_s) and record
how it ended. A failed job is restarted (RESTARTING -> STARTING -> RUNNING) from its
newest complete checkpoint after an exponential backoff, at the largest dp that fits
(down to parallel.dp_min), until restart.max_failures; the time from detection to the
first step of the new attempt is its recovery time. Then queued jobs are admitted
(`service.scheduler.admit`) onto the slots that running jobs do not hold. A service that
starts finds jobs a previous process left active: their workers went with that process
(Ray removes a dead driver's actors and placement groups), so they restart from their
checkpoints. Nothing here knows about HTTP.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray

from parallel.checkpoint import latest_complete, list_checkpoints, read_meta
from parallel.config import ConfigError, build_config
from service.metrics import ServiceMetrics
from service.recovery import backoff_s, fit, resume_spec
from service.scheduler import admit
from service.states import JobState
from service.store import Store
from workers.group import WorkerGroup

log = logging.getLogger("fourfold.supervisor")
CANCEL_GRACE_S = 60.0  # a cancelled job's ranks get this long to stop at a step boundary


@dataclass
class Running:
    group: WorkerGroup
    attempt: int
    failures: int = 0  # failures of this job so far
    recover_from: float | None = None  # monotonic time a failure was detected, until training resumes
    cause: str = ""
    stopping_since: float | None = None
    growing_to: int | None = None  # stopping to restart at this larger dp (elastic grow-back)
    last_step: int = 0
    saw_training: bool = False
    since: float = field(default_factory=time.monotonic)


@dataclass
class Pending:
    """A failed job waiting for its restart."""

    due: float  # monotonic
    failures: int
    cause: str
    detected: float  # monotonic
    waiting_logged: bool = False


class Supervisor:
    def __init__(self, store: Store, metrics: ServiceMetrics | None = None, poll_s: float = 0.5) -> None:
        self.store, self.metrics, self.poll_s = store, metrics or ServiceMetrics(), poll_s
        self.running: dict[str, Running] = {}
        self.restarting: dict[str, Pending] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        for job in self.store.active():  # left by a service process that stopped while they ran
            cause = "the service restarted while this job ran; its workers went with the old process"
            if job.state != JobState.RESTARTING:
                self.store.transition(job.id, JobState.RESTARTING, f"{cause}; restarting from the newest checkpoint")
            now = time.monotonic()
            self.restarting[job.id] = Pending(now, max(job.attempts - 1, 0), cause, now)
        self._thread = threading.Thread(target=self._loop, name="fourfold-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            for job_id, run in list(self.running.items()):
                run.group.teardown()
                self._end(job_id, JobState.FAILED, "the service stopped while this job ran", "failed")

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
            self._restart_due()
            self._admit()
            self.metrics.set_counts(self.store.count_by_state())

    # -- running jobs --------------------------------------------------------------
    def _watch(self, job_id: str, run: Running) -> None:
        job = self.store.get_job(job_id)
        if job is not None and job.cancel_requested and run.stopping_since is None:
            run.stopping_since = time.monotonic()
            for actor in run.group.actors:
                actor.request_stop.remote()
            self.store.append_logs(job_id, ["cancel requested: ranks stop after the current step"])
        elif job is not None and run.stopping_since is None and run.saw_training:
            self._maybe_grow(job, run)
        status = run.group.poll()
        if status.metrics:
            self.store.add_metrics(job_id, status.metrics, run.attempt)
            self.store.append_logs(job_id, [_progress(m, job) for m in status.metrics])
            self.metrics.observe_step(job_id, status.metrics[-1])
            run.last_step = status.metrics[-1]["step"]
            if run.recover_from is not None:
                seconds = time.monotonic() - run.recover_from
                run.recover_from = None
                self.metrics.recovery.observe(seconds)
                self.store.add_event(
                    job_id, "recovery", f"training resumed {seconds:.1f} s after the failure was detected ({run.cause})"
                )
        training = status.metrics or any(hb["phase"] == "train" for hb in status.heartbeats.values())
        if training and not run.saw_training:
            run.saw_training = True
            self.store.transition(job_id, JobState.RUNNING, "every rank joined; training")
        if status.state == "succeeded":
            self._end(job_id, JobState.SUCCEEDED, f"finished {run.last_step} steps", "succeeded")
        elif status.state == "stopped" and run.growing_to is not None:
            self.running.pop(job_id)
            run.group.teardown()
            self._record_checkpoints(job_id, run)
            self.store.finish_attempt(job_id, run.attempt, "stopped", f"stopped to grow to dp={run.growing_to}")
            reason = f"room for dp={run.growing_to} again: checkpointed at step {run.last_step}, growing back"
            self.store.transition(job_id, JobState.RESTARTING, reason)
            now = time.monotonic()
            self.restarting[job_id] = Pending(now, run.failures, "growing back", now)
        elif status.state == "stopped":
            self._end(job_id, JobState.CANCELLED, f"cancelled; stopped after step {run.last_step}", "cancelled")
        elif status.state == "failed":
            self._failed(job_id, run, status.error or "a rank failed")
        elif silent := run.group.silent_ranks(run.group.cfg.restart.hang_timeout_s):
            who = ", ".join(f"rank {r} (last phase {phase}, step {step})" for r, phase, step, _ in silent)
            self._failed(job_id, run, f"hang: no heartbeat for {silent[0][3]:.0f} s from {who}")
        elif run.stopping_since is not None and time.monotonic() - run.stopping_since > CANCEL_GRACE_S:
            if run.growing_to is not None:
                self._failed(job_id, run, "ranks did not stop at a step boundary to grow back")
                return
            self._end(job_id, JobState.CANCELLED, "cancelled; ranks did not stop in time and were killed", "cancelled")

    def _end(self, job_id: str, state: JobState, reason: str, outcome: str) -> None:
        run = self.running.pop(job_id)
        run.group.teardown()
        self._record_checkpoints(job_id, run)
        self.store.finish_attempt(job_id, run.attempt, outcome, reason)
        job = self.store.get_job(job_id)
        if job is not None and job.state == JobState.STARTING and state != JobState.FAILED:
            self.store.transition(job_id, JobState.RUNNING, "every rank joined; training")
        self.store.transition(job_id, state, reason)
        self.store.append_logs(job_id, [f"{state.value}: {reason}"])
        self.metrics.forget(job_id)

    def _maybe_grow(self, job: Any, run: Running) -> None:
        """A job running below its spec's dp (it shrank when a node went) grows back once the cluster,
        counting the slots it holds now, fits a larger dp: it stops at the next step boundary, which
        saves a checkpoint, and restarts from it at the larger dp."""
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
        for actor in run.group.actors:
            actor.request_stop.remote()
        self.store.append_logs(job.id, [f"room for dp={run.growing_to}: stopping after this step to grow back"])

    def _failed(self, job_id: str, run: Running, cause: str) -> None:
        """Tear the attempt down completely, then restart after a backoff, or end FAILED past max_failures."""
        self.running.pop(job_id)
        run.group.teardown()
        self._record_checkpoints(job_id, run)
        self.store.finish_attempt(job_id, run.attempt, "failed", cause)
        self.store.add_event(job_id, "failure", cause)
        self.store.append_logs(job_id, [f"failure: {cause}"])
        failures, restart = run.failures + 1, run.group.cfg.restart
        if failures > restart.max_failures:
            reason = f"{cause} (failed {failures} times; restart.max_failures={restart.max_failures})"
            self.store.transition(job_id, JobState.FAILED, reason)
            self.metrics.forget(job_id)
            return
        delay = backoff_s(restart, failures)
        self.store.transition(
            job_id, JobState.RESTARTING, f"{cause}; restart {failures} of {restart.max_failures} in {delay:.0f} s"
        )
        self.metrics.restarts.labels(job=job_id).inc()
        now = time.monotonic()
        self.restarting[job_id] = Pending(now + delay, failures, cause, now)

    def _restart_due(self) -> None:
        for job_id, pending in list(self.restarting.items()):
            if time.monotonic() < pending.due:
                continue
            job = self.store.get_job(job_id)
            if job is None or job.cancel_requested:
                self.restarting.pop(job_id)
                if job is not None:
                    self.store.transition(job_id, JobState.CANCELLED, "cancelled while waiting to restart")
                continue
            cfg = build_config(job.spec)
            fitted = fit(cfg, self.free_resources()[0])
            if fitted is None:  # no room yet (a node is gone and dp_min does not allow fewer ranks)
                if not pending.waiting_logged:
                    pending.waiting_logged = True
                    self.store.append_logs(job_id, ["restart waits for room on the cluster"])
                continue
            self.restarting.pop(job_id)
            self._backfill_metrics(job_id, cfg.checkpoint.dir, job.attempts)
            run_cfg, plan = fitted
            elastic = f" at dp={run_cfg.parallel.dp} (elastic; the spec asks dp={cfg.parallel.dp})"
            note = elastic if run_cfg.parallel.dp != cfg.parallel.dp else ""
            self.store.transition(job_id, JobState.STARTING, f"restarting from the newest checkpoint{note}")
            attempt = self.store.start_attempt(job_id)
            group = WorkerGroup(run_cfg, job_id=job_id, ready_timeout_s=30)
            run = Running(group, attempt, pending.failures, pending.detected, pending.cause)
            try:
                group.start(spec=resume_spec(run_cfg), plan=plan)
            except Exception as err:  # counts as another failure
                self.running[job_id] = run
                self._failed(job_id, run, f"could not restart: {err}")
                continue
            self.running[job_id] = run
            self.store.append_logs(job_id, [f"attempt {attempt}: {run_cfg.parallel.world_size} ranks started{note}"])

    def _backfill_metrics(self, job_id: str, ckpt_dir: str | None, attempt: int) -> None:
        """Steps the old attempt trained and checkpointed but whose metrics never reached the store
        (the service died first) are in the checkpoint's meta.json; the restart resumes after them."""
        path = latest_complete(ckpt_dir) if ckpt_dir else None
        if path is not None and attempt > 0:
            self.store.add_metrics(job_id, read_meta(path).get("metrics", []), attempt)

    def _record_checkpoints(self, job_id: str, run: Running) -> None:
        ckpt_dir = run.group.cfg.checkpoint.dir
        if not ckpt_dir:
            return
        self.store.sync_checkpoints(job_id, [(c.step, c.path) for c in list_checkpoints(ckpt_dir) if c.complete])

    # -- admission -----------------------------------------------------------------
    def free_resources(self) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
        """(free, total) resources per alive node, free = total minus what our jobs reserved."""
        total = {n["NodeID"]: dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")}
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
            self.store.transition(job.id, JobState.STARTING, f"placed on {len(d.plan.nodes())} node(s)")
            attempt = self.store.start_attempt(job.id)
            group = WorkerGroup(d.cfg, job_id=job.id, ready_timeout_s=30)
            try:
                group.start(spec=job.spec, plan=d.plan)
            except ConfigError as err:  # the room went away between planning and reserving
                group.teardown()
                self.store.finish_attempt(job.id, attempt, "failed", str(err))
                self.store.transition(job.id, JobState.QUEUED, f"waiting for room: {err}")
                return
            except Exception as err:
                group.teardown()
                self.store.finish_attempt(job.id, attempt, "failed", str(err))
                self.store.transition(job.id, JobState.FAILED, f"could not start: {err}")
                continue
            self.running[job.id] = Running(group, attempt)
            self.store.append_logs(job.id, [f"attempt {attempt}: {d.cfg.parallel.world_size} ranks started"])


def _progress(m: dict, job: object) -> str:
    steps = getattr(job, "spec", {}).get("train", {}).get("steps", "?")
    return (
        f"step {m['step']}/{steps} | loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s | "
        f"mfu {m['mfu']:.1%} | {m['step_time_s'] * 1e3:.0f} ms"
    )
