"""The layout planner over HTTP (service/planning.py, docs/planner.md).

`POST /v1/plan`: the ranked layouts for a job spec on a named cluster or on the live one, the same
document as `fourfold plan --json`. `GET /v1/jobs/{id}/prediction`: what the planner predicts for a
job's own layout on the live cluster, next to what its steps measured.
"""

from __future__ import annotations

import statistics
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from api import state as app_state
from api.deps import CallerDep, OwnedJob, SettingsDep, StoreDep, known_query
from api.errors import error_responses, unprocessable
from api.openapi import JOB_SPEC_FIELD
from parallel.config import Config, ConfigError, build_config
from parallel.planner.timing import DEFAULT_MARGIN
from service.planning import PlanInputError, live_cluster, parse_cluster, plan, predicted_run

router = APIRouter(tags=["planner"], dependencies=[Depends(known_query)])

MAX_DEVICES = 1024
"""The largest cluster a request may plan for: the search takes about 15 s at 1,024 devices for a 70B model."""


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: dict[str, Any] = Field(default_factory=dict, json_schema_extra={JOB_SPEC_FIELD: True})
    """The job spec to plan (as `POST /v1/jobs` takes it; its layout fields are what the planner varies,
    those a spec leaves `auto` when it fixes the others)."""
    cluster: str | None = Field(None, min_length=1, max_length=100)
    """NODESxPER_NODExACCELERATOR (`8x8xh100-80gb`), PER_NODExACCELERATOR (`4xcpu`) or ACCELERATOR; null
    plans on the live Ray cluster (GPUs: the spec's plan.accelerator, else the service's
    FOURFOLD_ACCELERATOR)."""
    top: int = Field(10, ge=1, le=50)
    """How many layouts to rank."""
    margin: float = Field(DEFAULT_MARGIN, ge=0, lt=1)
    """Share of each device's memory held back."""
    efficiency: float | None = Field(None, gt=0, le=1)
    """Share of the dense peak the matmuls reach (default 0.55; 0.6 of the measured peak on CPU)."""


class PlanReport(BaseModel):
    """`fourfold plan --json`'s document: docs/planner.md says what each part holds."""

    model_config = ConfigDict(extra="allow")

    job: dict[str, Any]
    cluster: dict[str, Any]
    efficiency: float
    margin: float
    notes: list[str]
    fits: bool
    """Whether any layout fits in memory (if not, the candidates are the nearest misses)."""
    candidates: list[dict[str, Any]]
    """Best first: rank, layout, reaches_target, reasons, prediction."""
    min_accelerators: dict[str, Any]


class JobPrediction(BaseModel):
    predicted: dict[str, Any] | None
    """The planner's `Prediction` for the job's layout on the live cluster (null when it cannot say)."""
    measured: dict[str, float | None]
    """From the job's stored steps: the largest peak_mem_bytes, the median tokens_per_s and step_time_s
    (the first step, which warms up, left out when there are more), how many steps."""
    note: str | None = None
    """Why there is no prediction."""


@router.post(
    "/v1/plan",
    response_model=PlanReport,
    operation_id="plan",
    summary="Rank the layouts for a job spec on a cluster: memory, step time, tokens/s, MFU",
    responses=error_responses(422, auth=True),
)
async def plan_route(body: PlanRequest, request: Request, caller: CallerDep, settings: SettingsDep) -> dict[str, Any]:
    spec = {k: v for k, v in body.spec.items() if k != "priority"}
    try:
        cfg = build_config(spec, strict=True)
    except ConfigError as err:
        raise unprocessable(f"spec.{err}") from None
    sup = app_state.of(request.app).supervisor
    if body.cluster is None and sup is None:
        raise unprocessable("cluster: this API runs without a Ray cluster; name one, e.g. 8x8xh100-80gb")
    total = sup.free_resources()[1] if sup is not None and body.cluster is None else None
    return await run_in_threadpool(_plan, cfg, body, total, settings.accelerator)


def _plan(cfg: Config, body: PlanRequest, total: dict[str, dict[str, float]] | None, default: str | None) -> dict:
    try:
        notes: list[str] = []
        if body.cluster is not None:
            cluster = parse_cluster(body.cluster)
        else:
            assert total is not None  # the route refused a live plan without a cluster
            cluster, notes, _ = live_cluster(cfg, total, default)
        if cluster.world > MAX_DEVICES:
            raise PlanInputError("cluster", body.cluster, f"{cluster.world} devices; this service plans at most "
                                                          f"{MAX_DEVICES} (`fourfold plan` has no limit)")  # fmt: skip
        return plan(cfg, cluster, body.top, body.margin, body.efficiency, notes)[0]
    except PlanInputError as err:
        raise unprocessable(str(err)) from None


@router.get(
    "/v1/jobs/{job_id}/prediction",
    response_model=JobPrediction,
    operation_id="job_prediction",
    summary="The planner's prediction for a job's layout, next to what its steps measured",
    responses=error_responses(404, 422, auth=True),
)
def job_prediction(job: OwnedJob, request: Request, store: StoreDep, settings: SettingsDep) -> JobPrediction:
    steps = store.metrics(job.id)
    timed = steps[1:] if len(steps) > 1 else steps
    peaks = [m.peak_mem_bytes for m in steps if m.peak_mem_bytes is not None]
    measured = {
        "peak_mem_bytes": float(max(peaks)) if peaks else None,
        "tokens_per_s": _median([m.tokens_per_s for m in timed]),
        "step_time_s": _median([m.step_time_s for m in timed]),
        "steps": float(len(steps)),
    }
    sup = app_state.of(request.app).supervisor
    if sup is None:
        return JobPrediction(predicted=None, measured=measured, note="this API runs without a Ray cluster")
    try:
        cfg = build_config(job.spec)
        if cfg.plan.auto:
            note = f"the planner chooses {', '.join(cfg.plan.auto)} when the job is admitted"
            return JobPrediction(predicted=None, measured=measured, note=note)
        predicted = predicted_run(cfg, sup.free_resources()[1], settings.accelerator)
    except (PlanInputError, ConfigError) as err:
        return JobPrediction(predicted=None, measured=measured, note=str(err))
    return JobPrediction(predicted=predicted, measured=measured)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
