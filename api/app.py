"""The HTTP API: `create_app(settings)` builds it; `fourfold up` serves it with uvicorn.

    app = create_app(Settings(data_dir="runs/svc"), supervise=True)   # supervise: run jobs on Ray
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes under /v1 (jobs, cluster), plus /healthz and /metrics (Prometheus). With
`supervise=False` (tests of the API alone) jobs are stored and stay QUEUED.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from api import dashboard
from api.deps import CallerDep, MetricsDep, StoreDep
from api.routes import jobs
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store


def create_app(settings: Settings | None = None, supervise: bool = False, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.store = store or Store(settings.db_url)
        app.state.supervisor = None
        if supervise:
            from service.supervisor import Supervisor
            from workers.run import connect

            connect()
            app.state.supervisor = Supervisor(app.state.store, app.state.metrics, settings.poll_s)
            app.state.supervisor.start()
        yield
        if app.state.supervisor is not None:
            app.state.supervisor.stop()
        if store is None:
            app.state.store.close()

    app = FastAPI(title="fourfold", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = ServiceMetrics()
    app.include_router(jobs.router)

    @app.middleware("http")
    async def time_requests(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        app.state.metrics.request_latency.labels(request.method, path, str(response.status_code)).observe(
            time.perf_counter() - start
        )
        return response

    @app.get("/healthz", tags=["system"])
    def healthz(store: StoreDep) -> dict[str, Any]:
        return {"ok": True, "jobs": {k.value: v for k, v in store.count_by_state().items()}}

    @app.get("/metrics", tags=["system"])
    def prometheus(store: StoreDep, metrics: MetricsDep) -> Response:
        metrics.set_counts(store.count_by_state())
        metrics.set_queue_wait(store.oldest_queued_at())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/cluster", tags=["system"])
    def cluster(request: Request, caller: CallerDep) -> dict[str, Any]:
        sup = request.app.state.supervisor
        if sup is None:
            return {"connected": False, "nodes": []}
        free, total = sup.free_resources()
        nodes = [
            {"id": node, "total": _slots(res), "free": _slots(free.get(node, {}))}
            for node, res in sorted(total.items())
        ]
        return {"connected": True, "nodes": nodes, "running_jobs": sorted(sup.running)}

    dashboard.mount(app)
    return app


def _slots(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")}
