"""The HTTP API: `create_app(settings)` builds it; `fourfold up` serves it with uvicorn.

    app = create_app(Settings(data_dir="runs/svc"), supervise=True)   # supervise: run jobs on Ray
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes under /v1 (api/routes/: jobs, audit, cluster, plan), plus /healthz and /metrics (Prometheus). With
`supervise=False` (tests of the API alone) jobs are stored and stay QUEUED.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from anyio import to_thread
from fastapi import FastAPI, Response
from fastapi.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import dashboard, errors, openapi
from api import state as app_state
from api.deps import MetricsDep, StoreDep
from api.routes import audit, cluster, jobs, plan
from api.schemas import Health
from api.tickets import TicketBook
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store


def create_app(settings: Settings | None = None, supervise: bool = False, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app_state.of(app)
        # Requests that wait on the store run in anyio's thread pool, settings.api_threads at once (fewer
        # than the store keeps connections for: a request past the pool would open and close its own).
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        state.store = store or Store(settings.db_url)
        prepare_storage(settings)
        state.supervisor = None
        if supervise:
            from service.supervisor import Supervisor
            from workers.run import connect

            connect()
            state.supervisor = Supervisor(
                state.store, state.metrics, settings.poll_s, accelerator=settings.accelerator,
                max_ranks=settings.max_world_size,
            )  # fmt: skip
            state.supervisor.start()
        yield
        if state.supervisor is not None:
            state.supervisor.stop()
        if store is None:
            state.store.close()

    app = FastAPI(title="fourfold", version="0.1.0", lifespan=lifespan)
    errors.install(app)  # every error, ours or the framework's, is {"detail": "<field>: <what is wrong>"}
    openapi.install(app, auth_on=lambda: _auth_on(app))
    state = app_state.of(app)
    state.settings, state.metrics, state.tickets, state.tokens = settings, ServiceMetrics(), TicketBook(), None
    app.include_router(jobs.router)
    app.include_router(audit.router)
    app.include_router(cluster.router)
    app.include_router(plan.router)

    app.add_middleware(RequestTimer, metrics=state.metrics)

    @app.get("/healthz", tags=["system"], response_model=Health, operation_id="healthz", summary="Liveness")
    def healthz(store: StoreDep) -> dict[str, Any]:
        return {"ok": True, "jobs": {k.value: v for k, v in store.count_by_state().items()}}

    @app.get(
        "/metrics",
        tags=["system"],
        response_class=PlainTextResponse,
        operation_id="prometheus_metrics",
        summary="Prometheus metrics",
        responses={200: {"description": "Prometheus text exposition format 0.0.4."}},
    )
    def prometheus(store: StoreDep, metrics: MetricsDep) -> Response:
        metrics.set_counts(store.count_by_state())
        metrics.set_queue_wait(store.oldest_queued_at())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    dashboard.mount(app)
    return app


class RequestTimer:
    """Each request's latency into `request_latency` by method, route and status: a plain ASGI
    middleware (Starlette's `@app.middleware("http")` runs every request through an extra task and
    memory streams, a large share of a fast request's time)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, send=send_status, receive=receive)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")  # the router sets it in the shared scope
            labels = self.metrics.request_latency.labels(scope["method"], path, str(status))
            labels.observe(time.perf_counter() - start)


def serve(app: FastAPI, host: str, port: int) -> None:
    """Serve `app` with uvicorn as `fourfold up` does: one worker, uvloop and httptools when installed,
    no access log (warnings and errors only)."""
    import uvicorn

    # Everything made so far (modules, the app, its routes and models) lives as long as the process:
    # out of the garbage collector's sight, a collection under load does not walk it (a full one took
    # tens of milliseconds, a request's p99 with it).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


def _auth_on(app: FastAPI) -> bool:
    """Whether the API wants a bearer token now (as api/deps.get_caller decides): tokens in the
    environment, or any token ever made in the store."""
    from service.tokens import Tokens, auth_required

    state = app_state.of(app)
    store = getattr(state, "store", None)  # before the lifespan starts: environment tokens only
    return auth_required(state.settings.auth_enabled, Tokens(store) if store is not None else None)


def prepare_storage(settings: Settings) -> None:
    """Create the workspace and the default data root when they are local directories."""
    policy = settings.storage_policy()
    for place in (policy.workspace, *policy.data_roots):
        if "://" not in place:
            Path(place).mkdir(parents=True, exist_ok=True)
