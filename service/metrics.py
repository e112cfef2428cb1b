"""Prometheus metrics of the service, in a registry of their own (one per service instance).

Served at `GET /metrics`: jobs by state, queue length and how long the oldest queued job has
waited, each running job's latest loss, tokens/s, MFU, step time and recovery time, restarts,
recovery times, and the API's request latency.
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from service.states import JobState


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("fourfold_jobs", "Jobs by state", ["state"], registry=r)
        self.queue_length = Gauge("fourfold_queue_length", "Jobs waiting in QUEUED", registry=r)
        self.queue_wait = Gauge(
            "fourfold_queue_oldest_wait_seconds", "Since the oldest QUEUED job was submitted (0: none)", registry=r
        )
        self.loss = Gauge("fourfold_job_loss", "Latest training loss", ["job"], registry=r)
        self.tokens_per_s = Gauge("fourfold_job_tokens_per_second", "Latest throughput", ["job"], registry=r)
        self.mfu = Gauge("fourfold_job_mfu", "Latest model FLOPs utilisation (0-1)", ["job"], registry=r)
        self.step_time = Gauge("fourfold_job_step_seconds", "Latest optimizer step time", ["job"], registry=r)
        self.step = Gauge("fourfold_job_step", "Latest optimizer step", ["job"], registry=r)
        # Mixture-of-experts models only (the engine's RouterStats): absent for dense jobs.
        self.moe = {
            "moe_aux_loss": Gauge("fourfold_job_moe_aux_loss", "Latest router load-balancing loss per MoE block",
                                  ["job"], registry=r),
            "moe_dropped_frac": Gauge("fourfold_job_moe_dropped_fraction",
                                      "Latest share of (token, expert) choices dropped by expert capacity", ["job"],
                                      registry=r),
            "moe_max_load": Gauge("fourfold_job_moe_max_load",
                                  "Latest busiest expert's tokens over the mean (1 = even), worst MoE block", ["job"],
                                  registry=r),
        }  # fmt: skip
        self.restarts = Counter("fourfold_job_restarts", "Restarts after a failure", ["job"], registry=r)
        self.recovery = Histogram(
            "fourfold_recovery_seconds",
            "Failure detected -> training resumed, per restart",
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.recovery_phase = Histogram(
            "fourfold_recovery_phase_seconds",
            "Seconds of a recovery per phase (service.recovery.PHASES: teardown, backoff, reservation, actors, "
            "imports, rendezvous, state, first_step)",
            ["phase"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300), registry=r,
        )  # fmt: skip
        self.last_recovery = Gauge(
            "fourfold_job_last_recovery_seconds", "The job's latest recovery time (failure -> training)", ["job"],
            registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "fourfold_http_request_seconds", "API request latency", ["method", "route", "status"], registry=r
        )

    def set_counts(self, counts: dict[JobState, int]) -> None:
        for state in JobState:
            self.jobs.labels(state=state.value).set(counts.get(state, 0))
        self.queue_length.set(counts.get(JobState.QUEUED, 0))

    def set_queue_wait(self, oldest_submitted: datetime | None, now: datetime | None = None) -> None:
        """`oldest_submitted`: the store's `oldest_queued_at()`."""
        if oldest_submitted is None:
            self.queue_wait.set(0)
        else:
            self.queue_wait.set(max(0.0, ((now or datetime.now(UTC)) - oldest_submitted).total_seconds()))

    def observe_step(self, job_id: str, m: dict) -> None:
        self.loss.labels(job=job_id).set(m["loss"])
        self.tokens_per_s.labels(job=job_id).set(m["tokens_per_s"])
        self.mfu.labels(job=job_id).set(m["mfu"])
        self.step_time.labels(job=job_id).set(m["step_time_s"])
        self.step.labels(job=job_id).set(m["step"])
        for key, gauge in self.moe.items():
            if m.get(key) is not None:
                gauge.labels(job=job_id).set(m[key])

    def observe_recovery(self, job_id: str, seconds: float, phases: dict[str, float] | None = None) -> None:
        self.recovery.observe(seconds)
        self.last_recovery.labels(job=job_id).set(seconds)
        for phase, s in (phases or {}).items():
            self.recovery_phase.labels(phase=phase).observe(s)

    def forget(self, job_id: str) -> None:
        """A job ended: drop its per-job series so /metrics does not grow without bound."""
        gauges = (self.loss, self.tokens_per_s, self.mfu, self.step_time, self.step, self.last_recovery)
        for gauge in (*gauges, *self.moe.values()):
            with contextlib.suppress(KeyError):
                gauge.remove(job_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)
