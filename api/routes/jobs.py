"""`/v1/jobs`: submit, list, inspect, cancel, and follow jobs."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.deps import CallerDep, StoreDep
from api.schemas import JobList, JobPublic, JobSummary
from parallel.config import ConfigError, build_config
from service.states import TERMINAL, JobState
from service.store import AttemptRecord, EventRecord, JobRecord, LogRecord, MetricRecord

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def parse_spec(raw: bytes, content_type: str) -> tuple[dict[str, Any], int]:
    """The body as a validated engine spec (normalised, defaults filled) and its priority."""
    try:
        if content_type.split(";")[0].strip() in YAML_TYPES:
            data = yaml.safe_load(raw.decode() or "{}")
        else:
            data = json.loads(raw or b"{}")
    except (ValueError, yaml.YAMLError) as err:
        raise _unprocessable(f"body: not valid JSON or YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise _unprocessable("body: a job spec must be a mapping of sections (model, parallel, train, ...)")
    priority = data.pop("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise _unprocessable(f"priority: must be an integer from -1000 to 1000 (got {priority!r})")
    try:
        cfg = build_config(data)
    except ConfigError as err:
        raise _unprocessable(str(err)) from None
    return cfg.model_dump(mode="json", by_alias=True), priority


def _get(store: Any, job_id: str, caller: Any) -> JobRecord:
    job = store.get_job(job_id, owner=caller.owner_filter)
    if job is None:  # another user's job looks exactly like a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
async def submit(
    request: Request,
    response: Response,
    store: StoreDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobPublic:
    spec, priority = parse_spec(await request.body(), request.headers.get("content-type", ""))
    job, created = await run_in_threadpool(store.create_job, spec, caller.user, spec["name"], priority, idempotency_key)
    if not created:
        response.status_code = status.HTTP_200_OK  # a retried submission: the job it made before
    return JobPublic.of(job)


@router.get("", response_model=JobList)
def list_jobs(
    store: StoreDep,
    caller: CallerDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobList:
    jobs, total = store.list_jobs(owner=caller.owner_filter, state=state, limit=limit, offset=offset)
    latest = store.latest_metrics([j.id for j in jobs])
    return JobList(items=[JobSummary.of(j, latest.get(j.id)) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, store: StoreDep, caller: CallerDep) -> JobPublic:
    job = _get(store, job_id, caller)
    return JobPublic.of(job, store.latest_metrics([job_id]).get(job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel(job_id: str, store: StoreDep, caller: CallerDep) -> JobPublic:
    job = _get(store, job_id, caller)
    if job.state in TERMINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already ended ({job.state.value})")
    return JobPublic.of(store.request_cancel(job_id))


@router.get("/{job_id}/metrics", response_model=list[MetricRecord])
def metrics(
    job_id: str, store: StoreDep, caller: CallerDep, after_step: Annotated[int, Query(ge=0)] = 0
) -> list[MetricRecord]:
    _get(store, job_id, caller)
    return store.metrics(job_id, after_step=after_step)


@router.get("/{job_id}/events", response_model=list[EventRecord])
def events(
    job_id: str, store: StoreDep, caller: CallerDep, after_id: Annotated[int, Query(ge=0)] = 0
) -> list[EventRecord]:
    _get(store, job_id, caller)
    return store.events(job_id, after_id=after_id)


@router.get("/{job_id}/logs", response_model=list[LogRecord])
def logs(job_id: str, store: StoreDep, caller: CallerDep, after_id: Annotated[int, Query(ge=0)] = 0) -> list[LogRecord]:
    _get(store, job_id, caller)
    return store.logs(job_id, after_id=after_id)


@router.get("/{job_id}/attempts", response_model=list[AttemptRecord])
def attempts(job_id: str, store: StoreDep, caller: CallerDep) -> list[AttemptRecord]:
    """Each attempt: when it ran, how it ended and why, and how long it took to resume after a failure."""
    _get(store, job_id, caller)
    return store.attempts(job_id)


@router.get("/{job_id}/stream")
async def stream(job_id: str, store: StoreDep, caller: CallerDep, request: Request) -> EventSourceResponse:
    """Server-sent events: `metrics` (one step), `event` (a state change), `log`, then `end`."""
    await run_in_threadpool(_get, store, job_id, caller)

    async def produce():  # noqa: ANN202
        step = event_id = log_id = 0
        while not await request.is_disconnected():
            job = await run_in_threadpool(store.get_job, job_id)
            for m in await run_in_threadpool(store.metrics, job_id, step):
                step = m.step
                yield {"event": "metrics", "data": m.model_dump_json()}
            for e in await run_in_threadpool(store.events, job_id, event_id):
                event_id = e.id
                yield {"event": "event", "data": e.model_dump_json()}
            for line in await run_in_threadpool(store.logs, job_id, log_id):
                log_id = line.id
                yield {"event": "log", "data": line.model_dump_json()}
            if job is None or job.state in TERMINAL:
                yield {"event": "end", "data": json.dumps({"state": job.state.value if job else None})}
                return
            await asyncio.sleep(0.5)

    return EventSourceResponse(produce(), ping=15)
