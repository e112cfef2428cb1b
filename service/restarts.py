"""The supervisor's restarts: a failed attempt's restart after its backoff (on what the cluster has
now, resuming from the newest checkpoint), or its end past restart.max_failures, and the in-place
recoveries the worker group carried out (`workers.inplace`), recorded like restarts.

`Restarts` is a part of `service.supervisor.Supervisor` (its base class), kept apart so each file
reads in one sitting; it uses the supervisor's store, metrics, `restarting` table and attempt helpers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from parallel.checkpoint import list_checkpoints
from parallel.config import build_config
from service import attempt as phases
from service.attempt import Attempt, End
from service.changes import Change
from service.recovery import backoff_s, fit, resume_spec
from service.states import AttemptOutcome, AttemptPhase, EventKind, JobState

NODE_VERDICT_S = 30.0  # how long a restart waits for Ray to declare dead a node whose ranks stopped answering


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
    marks: dict[str, float] | None = None  # the recovery's moments so far (wall clock): detected, torn_down


class Restarts:
    """Restart handling of the Supervisor (see the module docstring)."""

    store: Any
    metrics: Any
    restarting: dict[str, Pending]

    def _recovered_in_place(self, job_id: str, att: Attempt, rec: dict[str, Any]) -> None:
        """The group brought a dead rank back without restarting the others (`workers.inplace`): one
        change (the attempt failed, a new one starts in the same processes), counted like a restart."""
        cause, restart = rec["cause"], att.group.cfg.restart
        if att.failures + 1 > restart.max_failures:
            self._finish(job_id, att, End(AttemptOutcome.FAILED, cause))
            return
        if rec["path"] == "peer":
            how = f"from live replicas at step {rec['step']}, no step before the failure redone"
        elif rec["path"] == "snapshot":
            how = f"from the in-memory snapshots of step {rec['step']} (no live replica holds every share)"
        else:
            how = f"from the newest checkpoint, because {rec['reason']}"
        ranks = ", ".join(map(str, rec["ranks"]))
        by = f"{rec['spares_used']} warm spare(s)" if rec["spares_used"] else "new process(es)"
        note = f"recovering in place: rank(s) {ranks} replaced by {by}, the other ranks' processes kept; state {how}"
        change = Change(
            end_attempt=(att.number, AttemptOutcome.FAILED, cause), events=((EventKind.FAILURE, cause),),
            logs=(f"failure: {cause}", note), new_attempt=True,
            states=((JobState.RESTARTING, f"{cause}; {note}"), (JobState.STARTING, "recovering in place")),
        )  # fmt: skip
        number = self.store.apply(job_id, change)
        self.metrics.restarts.labels(job=job_id).inc()
        att.number, att.failures, att.cause = number or att.number, att.failures + 1, cause
        att.how = f"; in place, {how}"
        att.recover_from = time.monotonic() - (time.time() - rec["marks"]["detected"])
        att.marks = dict(rec["marks"])
        self._enter(job_id, att, AttemptPhase.STARTING)

    def _failed(self, job_id: str, att: Attempt, end: End, marks: dict[str, float] | None = None) -> None:
        """Restart after a backoff, or end FAILED past max_failures (at once for a permanent cause)."""
        cause = end.reason
        failures, restart = att.failures + 1, att.group.cfg.restart
        over = failures > restart.max_failures or end.permanent
        if over:
            counted = f"{cause} (failed {failures} times; restart.max_failures={restart.max_failures})"
            state = (JobState.FAILED, cause if end.permanent else counted)
            delay = 0.0
        else:
            delay = backoff_s(restart, failures)
            state = (JobState.RESTARTING, f"{cause}; restart {failures} of {restart.max_failures} in {delay:.0f} s")
        change = Change(
            end_attempt=(att.number, AttemptOutcome.FAILED, cause), events=((EventKind.FAILURE, cause),),
            logs=(f"failure: {cause}",), states=(state,),
        )  # fmt: skip
        self.store.apply(job_id, change)
        if over:
            self.metrics.forget(job_id)
            return
        self.metrics.restarts.labels(job=job_id).inc()
        now = time.monotonic()
        self.restarting[job_id] = Pending(now + delay, failures, cause, now, suspects=end.suspects, marks=marks)

    # -- restarts ----------------------------------------------------------------------
    def _restart_due(self) -> None:
        for job_id, pending in list(self.restarting.items()):
            job = self.store.get_job(job_id)
            if job is None or job.cancel_requested:  # a cancel does not wait out the backoff
                self.restarting.pop(job_id)
                if job is not None:
                    self.store.transition(job_id, JobState.CANCELLED, "cancelled while waiting to restart")
                continue
            if time.monotonic() < pending.due or self._awaits_verdict(job_id, pending):
                continue
            cfg = build_config(job.spec)
            fitted = fit(cfg, self.free_resources()[0])
            if fitted is None:  # no room yet (a node is gone and dp_min does not allow fewer ranks)
                if not pending.waiting_logged:
                    pending.waiting_logged = True
                    self.store.append_logs(job_id, ["restart waits for room on the cluster"])
                continue
            run_cfg, plan = fitted
            self._backfill_metrics(job_id, cfg.checkpoint.dir, job.attempts)
            self.restarting.pop(job_id)
            reason = f"restarting from the newest checkpoint{phases.elastic_note(run_cfg.parallel.dp, cfg.parallel.dp)}"
            begun = time.time()
            att = self._start_attempt(job_id, reason, run_cfg, plan, resume_spec(run_cfg), pending.failures)
            att.recover_from, att.cause = pending.detected, pending.cause
            if pending.marks is not None:
                att.marks = {**pending.marks, "restart": begun}

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

    def _backfill_metrics(self, job_id: str, ckpt_dir: str | None, attempt: int) -> None:
        """Steps the old attempt trained and checkpointed but whose metrics never reached the store
        (the service died first) are in the checkpoints' meta.json, each holding the steps since the
        one before; the restart resumes after the newest. Every checkpoint retention kept is read."""
        if not ckpt_dir or attempt < 1:
            return
        stored = {m.step for m in self.store.metrics(job_id)}  # a step some attempt stored keeps its attempt
        for c in list_checkpoints(ckpt_dir):
            if c.complete:
                missing = [m for m in c.meta.get("metrics", []) if m.get("step") not in stored]
                self.store.add_metrics(job_id, missing, attempt)
