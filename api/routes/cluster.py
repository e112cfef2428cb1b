"""`/v1/cluster`: the Ray cluster's nodes, and what the service's running jobs leave free on them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api import state as app_state
from api.deps import CallerDep
from api.errors import error_responses
from api.schemas import Cluster

router = APIRouter(tags=["system"])


@router.get(
    "/v1/cluster",
    response_model=Cluster,
    operation_id="cluster",
    summary="The Ray cluster's nodes and what the service's jobs leave free on them",
    responses=error_responses(auth=True),
)
def cluster(request: Request, caller: CallerDep) -> dict[str, Any]:
    sup = app_state.of(request.app).supervisor
    if sup is None:  # the API alone (`create_app(supervise=False)`): jobs are stored, none runs
        return {"connected": False, "nodes": []}
    free, total = sup.free_resources()
    nodes = [
        {"id": node, "total": _slots(res), "free": _slots(free.get(node, {}))} for node, res in sorted(total.items())
    ]
    return {"connected": True, "nodes": nodes, "running_jobs": sorted(sup.running)}


def _slots(res: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory")}
