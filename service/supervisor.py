"""Runs jobs: admits queued ones onto the Ray cluster, watches them, records what happens.

    sup = Supervisor(store, metrics)      # Ray must be connected (workers.run.connect())
    sup.start()                           # adopts jobs a previous process left, then ticks every poll_s
    ...
    sup.stop()                            # ranks stop at a step boundary (checkpointed); jobs resume later

Each running job has one attempt in a phase (`service.attempt`): RESERVING its placement group,
STARTING its ranks, TRAINING, STOPPING for a cancel, RESIZING to grow back, FINISHED. Every tick
the supervisor observes each attempt, asks its phase's function what comes next, and carries that
out: launch the ranks, store step metrics and log lines, move the job to RUNNING once every rank
trains, ask the ranks to stop, and end the attempt. A failed attempt (a rank that raised, a worker
process that died, a hang, a placement that never came) is torn down completely, then the job
restarts (RESTARTING -> STARTING -> RUNNING) from its newest complete checkpoint after an
exponential backoff, at the largest dp that fits (down to parallel.dp_min), until
restart.max_failures. The time from detection to the new attempt's first step is its recovery
time. Then queued jobs are admitted (`service.scheduler.admit`) onto what running jobs leave free
(`service.resources`).

Every lifecycle change (an attempt ended with its outcome, event, log line and state change; an
attempt started; a job adopted) is one store transaction (`service.changes.Change`), so a service
that dies anywhere leaves each job before or after a change. Active jobs no part of this supervisor
holds (left by a service that died) are adopted: whatever of theirs is left on the cluster is
removed first, so nothing runs twice, then they restart from their checkpoints.

Restarts and in-place recoveries are carried out by the base class `service.restarts.Restarts`.
Nothing here knows about HTTP, and Ray only through the Protocols of `service.attempt` (tests pass fakes).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from parallel.checkpoint import list_checkpoints
from parallel.config import Config, build_config
from service import attempt as phases
from service.attempt import TRAINING_REASON, Attempt, ClusterResources, End, GroupFactory, RemoveLeftovers, Seen
from service.changes import Change
from service.metrics import ServiceMetrics
from service.planning import plan_queue
from service.recovery import fit, phases_of, rank_marks, start_phases
from service.resources import Resources, free_of, give_back
from service.restarts import Pending, Restarts
from service.scheduler import admit
from service.states import AttemptOutcome, AttemptPhase, EventKind, InvalidTransition, JobState, check_phase
from service.store import JobRecord, Store
from workers.group import WorkerGroup, node_resources, remove_leftovers
from workers.placement import Plan

log = logging.getLogger("fourfold.supervisor")
CANCEL_GRACE_S = 60.0  # a cancelled job's ranks get this long to stop at a step boundary
SHUTDOWN_GRACE_S = 30.0  # at service stop, ranks get this long to stop (and checkpoint) before they are killed
READY_TIMEOUT_S = 60.0  # a placement group not ready by then fails the attempt
_ENDS = {AttemptOutcome.SUCCEEDED: JobState.SUCCEEDED, AttemptOutcome.CANCELLED: JobState.CANCELLED}


class Supervisor(Restarts):
    def __init__(
        self,
        store: Store,
        metrics: ServiceMetrics | None = None,
        poll_s: float = 0.5,
        group_factory: GroupFactory = WorkerGroup,
        resources: ClusterResources = node_resources,
        leftovers: RemoveLeftovers = remove_leftovers,
        ready_timeout_s: float = READY_TIMEOUT_S,
        accelerator: str | None = None,
        max_ranks: int | None = None,
    ) -> None:
        """group_factory, resources and leftovers reach Ray through `workers`; tests pass fakes.
        accelerator (the GPUs' type) and max_ranks bound what `parallel: auto` plans for."""
        self.store, self.metrics, self.poll_s = store, metrics or ServiceMetrics(), poll_s
        self.accelerator, self.max_ranks = accelerator, max_ranks
        self.ready_timeout_s = ready_timeout_s
        self.group_factory, self.resources, self.leftovers = group_factory, resources, leftovers
        self.running: dict[str, Attempt] = {}
        self.restarting: dict[str, Pending] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # -- lifecycle of the supervisor ---------------------------------------------------
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
            for att in self.running.values():
                if att.group.launched:
                    att.group.request_stop()
            deadline = time.monotonic() + SHUTDOWN_GRACE_S
            for job_id, att in list(self.running.items()):
                if att.group.launched:
                    status = att.group.wait(max(deadline - time.monotonic(), 0.1))
                    self._store_metrics(job_id, att, status.metrics)
                self.running.pop(job_id)
                self._teardown(job_id, att)
                reason = "the service stopped; the job resumes from its newest checkpoint when the service starts"
                change = Change(
                    end_attempt=(att.number, AttemptOutcome.INTERRUPTED, "the service stopped"),
                    states=((JobState.RESTARTING, reason),),
                )
                self.store.apply(job_id, change)

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
                        cause = f"lost contact with the job's workers: {err}"
                        self._finish(job_id, self.running[job_id], End(AttemptOutcome.FAILED, cause))
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
            note = f"; removed {found} leftover actor(s) and placement group(s) first" if found else ""
            restart = f"{cause}; restarting from the newest checkpoint"
            states = ((JobState.RESTARTING, restart),) if job.state != JobState.RESTARTING else ()
            change = Change(
                close_open=(AttemptOutcome.INTERRUPTED, cause), states=states, logs=(f"adopted: {cause}{note}",)
            )
            self.store.apply(job.id, change)
            failures = sum(a.outcome == AttemptOutcome.FAILED for a in self.store.attempts(job.id))
            self.restarting[job.id] = Pending(now, failures, cause, now)

    # -- one attempt: observe, decide by phase, carry out ----------------------------------
    def _watch(self, job_id: str, att: Attempt) -> None:
        job = self.store.get_job(job_id)
        cancel = job is not None and job.cancel_requested
        if att.phase is AttemptPhase.RESERVING:
            self._reserving(job_id, job, att, cancel)
            return
        grow_to = None
        if att.phase is AttemptPhase.TRAINING and not cancel and job is not None:
            grow_to = self._room_to_grow(job, att)
        asked = phases.requested(att.phase, cancel, grow_to)
        if asked is AttemptPhase.STOPPING and att.phase is not AttemptPhase.STOPPING:
            self._enter(job_id, att, asked)
            att.group.request_stop()
            self.store.append_logs(job_id, ["cancel requested: ranks stop after the current step"])
        elif asked is AttemptPhase.RESIZING and att.phase is not AttemptPhase.RESIZING:
            self._enter(job_id, att, asked)
            att.grow_to = grow_to
            att.group.request_stop(at_checkpoint=True)
            self.store.append_logs(job_id, [f"room for dp={grow_to}: stopping at the next checkpoint to grow back"])
        status = att.group.poll()
        self._store_metrics(job_id, att, status.metrics, job, status.marks)
        if status.recovered is not None:
            self._recovered_in_place(job_id, att, status.recovered)
            return
        trains = bool(status.metrics or status.training)
        if trains and job is not None and job.state == JobState.STARTING:
            self.store.transition(job_id, JobState.RUNNING, TRAINING_REASON)
        hang = att.group.hang() if status.state == "running" else None
        past_grace = time.monotonic() - att.since > CANCEL_GRACE_S
        seen = Seen(status, hang=hang, past_grace=past_grace, last_step=att.last_step)
        if att.phase is AttemptPhase.STARTING:
            phase, end = phases.starting(seen, trains)
        elif att.phase is AttemptPhase.TRAINING:
            phase, end = phases.training(seen)
        elif att.phase is AttemptPhase.RESIZING:
            phase, end = phases.resizing(seen, att.grow_to or 0)
        else:
            phase, end = phases.stopping(seen)
        if end is not None:
            self._finish(job_id, att, end)
        else:
            self._enter(job_id, att, phase)

    def _reserving(self, job_id: str, job: JobRecord | None, att: Attempt, cancel: bool) -> None:
        group = att.group
        ready = not cancel and group.is_ready()
        late = None
        if not ready and time.monotonic() - group.reserved_at > self.ready_timeout_s:
            late = f"placement group never became ready: {group.not_ready()}"
        phase, end = phases.reserving(cancel, ready, late)
        if end is not None:
            self._finish(job_id, att, end)
            return
        if phase is AttemptPhase.STARTING:
            att.marks["reserved"] = time.time()
            try:
                group.launch(att.spec, job.storage if job is not None else None)
            except Exception as err:  # an actor that never started, a bundle on the wrong node
                self._finish(job_id, att, End(AttemptOutcome.FAILED, f"could not start the ranks: {err}"))
                return
            att.marks["launched"] = time.time()
            self.store.append_logs(job_id, [f"attempt {att.number}: {group.cfg.parallel.world_size} ranks started"])
            self._enter(job_id, att, phase)

    def _enter(self, job_id: str, att: Attempt, phase: AttemptPhase) -> None:
        if phase is att.phase:
            return
        check_phase(job_id, att.phase, phase)
        att.phase, att.since = phase, time.monotonic()

    def _room_to_grow(self, job: JobRecord, att: Attempt) -> int | None:
        """A job running below its spec's dp (it shrank when a node went) grows back once the
        cluster, counting the slots it holds now, fits a larger dp: the dp to grow to, or None."""
        if att.group.cfg.parallel.dp >= job.spec["parallel"]["dp"] or not att.group.cfg.checkpoint.dir:
            return None
        free = give_back(self.free_resources()[0], att.group.bundles)
        fitted = fit(build_config(job.spec), free)
        if fitted is None or fitted[0].parallel.dp <= att.group.cfg.parallel.dp:
            return None
        return fitted[0].parallel.dp

    def _store_metrics(
        self, job_id: str, att: Attempt, metrics: list[dict[str, Any]], job: Any = None,
        ranks: dict[int, dict[str, float]] | None = None,
    ) -> None:  # fmt: skip
        if not metrics:
            return
        self.store.add_metrics(job_id, metrics, att.number)
        self.store.append_logs(job_id, [_progress(m, job) for m in metrics])
        self.metrics.observe_step(job_id, metrics[-1])
        first, att.last_step = att.last_step == 0, metrics[-1]["step"]
        if first and att.number == 1 and job is not None and "reserved" in att.marks:
            split = start_phases(job.created_at.timestamp(), {**att.marks, **rank_marks(ranks or {}),
                                                             "first_step": time.time()})  # fmt: skip
            message = f"first step {sum(split.values()):.1f} s after submission: " + ", ".join(
                f"{k.replace('_', ' ')} {v:.2f} s" for k, v in split.items()
            )
            self.store.add_event(job_id, EventKind.START, message)
        if att.recover_from is not None:
            seconds = time.monotonic() - att.recover_from
            att.recover_from = None
            split = None
            if "detected" in att.marks:  # where the seconds went
                split = phases_of({**att.marks, **rank_marks(ranks or {}), "first_step": time.time()})
            self.metrics.observe_recovery(job_id, seconds, split)
            message = f"training resumed {seconds:.1f} s after the failure was detected ({att.cause}){att.how}"
            if split:
                message += ": " + ", ".join(f"{k.replace('_', ' ')} {v:.2f} s" for k, v in split.items())
            change = Change(recovery=(att.number, seconds, split), events=((EventKind.RECOVERY, message),))
            self.store.apply(job_id, change)

    def _finish(self, job_id: str, att: Attempt, end: End) -> None:
        """Carry out an attempt's end: tear it down, then one store change, then what comes next
        (a restart scheduled, or the job done)."""
        self.running.pop(job_id, None)
        att.phase = AttemptPhase.FINISHED
        detected = time.time()
        self._teardown(job_id, att)
        if end.outcome is AttemptOutcome.FAILED:
            self._failed(job_id, att, end, {"detected": detected, "torn_down": time.time()})
            return
        if end.outcome is AttemptOutcome.STOPPED:  # resized: restart at once at the larger dp
            reason = f"room for dp={att.grow_to} again: checkpointed at step {att.last_step}, growing back"
            change = Change(end_attempt=(att.number, end.outcome, end.reason), states=((JobState.RESTARTING, reason),))
            self.store.apply(job_id, change)
            self.restarting[job_id] = Pending(time.monotonic(), att.failures, "growing back", None)
            return
        state = _ENDS[end.outcome]
        job = self.store.get_job(job_id)
        states = [(state, end.reason)]
        if state is JobState.SUCCEEDED and job is not None and job.state == JobState.STARTING:
            states.insert(0, (JobState.RUNNING, TRAINING_REASON))  # too short to see
        ended = (att.number, end.outcome, end.reason)
        change = Change(end_attempt=ended, states=tuple(states), logs=(f"{state.value}: {end.reason}",))
        self.store.apply(job_id, change)
        self.metrics.forget(job_id)

    def _teardown(self, job_id: str, att: Attempt) -> None:
        """Remove the attempt's actors and placement group (waiting until Ray has), and record
        the checkpoints it left; a failure here is logged, never leaves the job untracked."""
        try:
            att.group.teardown()
        except Exception:
            log.exception("tearing down job %s failed", job_id)
        try:
            self._record_checkpoints(job_id, att.group.cfg)
        except Exception:
            log.exception("listing the checkpoints of job %s failed", job_id)

    def _start_attempt(
        self, job_id: str, reason: str, cfg: Config, plan: Plan, spec: dict[str, Any], failures: int
    ) -> Attempt:
        """Move the job to STARTING with a new attempt (one change), reserve its placement group
        (without waiting for it) and track it."""
        number = self.store.apply(job_id, Change(states=((JobState.STARTING, reason),), new_attempt=True))
        att = Attempt(self.group_factory(cfg, job_id=job_id), number or 0, spec, failures, since=time.monotonic())
        self.running[job_id] = att
        try:
            att.group.reserve(plan)
        except Exception as err:  # counts as a failure of this attempt
            self._finish(job_id, att, End(AttemptOutcome.FAILED, f"could not reserve the placement group: {err}"))
        return att

    def _record_checkpoints(self, job_id: str, cfg: Config) -> None:
        if cfg.checkpoint.dir:
            done = [(c.step, c.path) for c in list_checkpoints(cfg.checkpoint.dir) if c.complete]
            self.store.sync_checkpoints(job_id, done)

    # -- admission -----------------------------------------------------------------------
    def free_resources(self) -> tuple[Resources, Resources]:
        """(free, total) resources per alive node, free = total minus what our jobs reserved."""
        with self._lock:
            total = self.resources()
            return free_of(total, [att.group.bundles for att in self.running.values()]), total

    def _admit(self) -> None:
        queued = self.store.queued()
        if not queued:
            return
        free, total = self.free_resources()
        if total:  # each spec's auto layout fields chosen on the live cluster (or the job failed, saying why)
            queued = plan_queue(queued, total, self._apply_queued, self.accelerator, self.max_ranks)
        for d in admit(queued, free, total):
            job = next(j for j in queued if j.id == d.job_id)
            try:
                if d.action == "refuse":
                    states = ((JobState.STARTING, "checking placement"),
                              (JobState.FAILED, f"cannot be placed on this cluster: {d.reason}"))  # fmt: skip
                    self.store.apply(job.id, Change(states=states))
                    continue
                assert d.cfg is not None and d.plan is not None
                note = phases.elastic_note(d.cfg.parallel.dp, job.spec["parallel"]["dp"])
                spec = job.spec if not note else d.cfg.model_dump(mode="json", by_alias=True)
                placed = f"placed on {len(d.plan.nodes())} node(s){note}" + (f"; {d.plan.note}" if d.plan.note else "")
                self._start_attempt(job.id, placed, d.cfg, d.plan, spec, 0)
            except InvalidTransition:  # cancelled since the queue was read: its change wrote nothing; skip it
                log.info("job %s left the queue while it was being admitted", job.id)

    def _apply_queued(self, job_id: str, change: Change) -> None:
        try:
            self.store.apply(job_id, change)
        except InvalidTransition:  # cancelled since the queue was read
            log.info("job %s left the queue while it was being planned", job_id)


def _progress(m: dict, job: object) -> str:
    steps = getattr(job, "spec", {}).get("train", {}).get("steps", "?")
    return (
        f"step {m['step']}/{steps} | loss {m['loss']:.4f} | {m['tokens_per_s']:,.0f} tok/s | "
        f"mfu {m['mfu']:.1%} | {m['step_time_s'] * 1e3:.0f} ms"
    )
