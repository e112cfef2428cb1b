"""`/v1/jobs`: submit, list, inspect, cancel, and follow jobs."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.deps import CallerDep, StoreDep
from api.schemas import JobList, JobPublic, JobSummary
from parallel.config import ConfigError, build_config
from service.states import TERMINAL, JobState
from service.store import AttemptRecord, EventRecord, JobRecord, LogRecord, MetricRecord

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MAX_BODY = 1 << 20  # a job spec is a few hundred bytes; a megabyte is a mistake
MAX_INT = 2**31 - 1  # what every integer column holds
Position = Annotated[int, Query(ge=0, le=MAX_INT)]
JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def known_query(request: Request) -> None:
    """Refuse query parameters the route does not take, and repeated ones: `?status=RUNNING` for
    `?state=RUNNING` must not silently list everything."""
    route = request.scope.get("route")
    allowed = _query_names(route.dependant) if route is not None else set()
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed - {"access_token"})) or "none"
        raise _unprocessable(f"query: unknown parameter {', '.join(unknown)}; valid: {valid}")
    repeated = sorted(k for k in set(request.query_params) if len(request.query_params.getlist(k)) > 1)
    if repeated:
        raise _unprocessable(f"query: {', '.join(repeated)} given more than once")


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route reads, its dependencies' included (the token's `access_token`)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(known_query)])


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a job spec can hold")


def _nul_at(data: Any, path: str = "") -> str | None:
    """The field holding a NUL character (no database stores one in text), or None."""
    if isinstance(data, str):
        return path or "body" if "\x00" in data else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(key, str) and "\x00" in key:
            return f"{path}.{key}".strip(".")
        if (found := _nul_at(value, f"{path}.{key}".strip("."))) is not None:
            return found
    return None


def parse_spec(raw: bytes, content_type: str) -> tuple[dict[str, Any], int]:
    """The body as a validated engine spec (normalised, defaults filled) and its priority."""
    if len(raw) > MAX_BODY:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body: {len(raw)} bytes; a job spec is under 1 MiB")
    if not raw.strip():
        raise _unprocessable("body: empty; send a job spec as JSON, or as YAML with Content-Type: application/yaml")
    is_yaml = content_type.split(";")[0].strip() in YAML_TYPES
    try:
        data = yaml.safe_load(raw.decode()) if is_yaml else json.loads(raw, parse_constant=_no_constant)
    except (ValueError, yaml.YAMLError) as err:
        hint = "" if is_yaml else "; for YAML send Content-Type: application/yaml"
        raise _unprocessable(
            f"body: not valid {'YAML' if is_yaml else 'JSON'} ({str(err).splitlines()[0]}){hint}"
        ) from None
    except RecursionError:
        raise _unprocessable("body: nested too deeply to be a job spec") from None
    if not isinstance(data, dict):
        raise _unprocessable("body: a job spec must be a mapping of sections (model, parallel, train, ...)")
    if (where := _nul_at(data)) is not None:
        raise _unprocessable(f"{where}: contains a NUL character")
    priority = data.pop("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise _unprocessable(f"priority: must be an integer from -1000 to 1000 (got {priority!r})")
    try:
        cfg = build_config(data)
    except ConfigError as err:
        raise _unprocessable(str(err)) from None
    return cfg.model_dump(mode="json", by_alias=True), priority


def _get(store: Any, job_id: str, caller: Any) -> JobRecord:
    job = store.get_job(job_id, owner=caller.owner_filter) if JOB_ID.match(job_id) else None
    if job is None:  # another user's job looks exactly like a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic)
async def submit(
    request: Request,
    response: Response,
    store: StoreDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> JobPublic:
    spec, priority = parse_spec(await request.body(), request.headers.get("content-type", ""))
    job, created = await run_in_threadpool(store.create_job, spec, caller.user, spec["name"], priority, idempotency_key)
    if not created:
        if (job.spec, job.priority) != (spec, priority):  # the same key for another job is a client bug
            raise _unprocessable(
                f"Idempotency-Key: {idempotency_key!r} was used for job {job.id} with a different spec or priority; "
                "use a new key for a new job"
            )
        response.status_code = status.HTTP_200_OK  # a retried submission: the job it made before
    return JobPublic.of(job)


@router.get("", response_model=JobList)
def list_jobs(
    store: StoreDep,
    caller: CallerDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Position = 0,
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
def metrics(job_id: str, store: StoreDep, caller: CallerDep, after_step: Position = 0) -> list[MetricRecord]:
    _get(store, job_id, caller)
    return store.metrics(job_id, after_step=after_step)


@router.get("/{job_id}/events", response_model=list[EventRecord])
def events(job_id: str, store: StoreDep, caller: CallerDep, after_id: Position = 0) -> list[EventRecord]:
    _get(store, job_id, caller)
    return store.events(job_id, after_id=after_id)


@router.get("/{job_id}/logs", response_model=list[LogRecord])
def logs(job_id: str, store: StoreDep, caller: CallerDep, after_id: Position = 0) -> list[LogRecord]:
    _get(store, job_id, caller)
    return store.logs(job_id, after_id=after_id)


@router.get("/{job_id}/attempts", response_model=list[AttemptRecord])
def attempts(job_id: str, store: StoreDep, caller: CallerDep) -> list[AttemptRecord]:
    """Each attempt: when it ran, how it ended and why, and how long it took to resume after a failure."""
    _get(store, job_id, caller)
    return store.attempts(job_id)


@router.get("/{job_id}/stream")
async def stream(job_id: str, store: StoreDep, caller: CallerDep, request: Request) -> EventSourceResponse:
    """Server-sent events: `metrics` (one step; after a restart, steps again as the new attempt
    trains them), `event` (a state change), `log`, then `end`."""
    await run_in_threadpool(_get, store, job_id, caller)

    async def produce():  # noqa: ANN202
        step = event_id = log_id = attempts = 0
        while not await request.is_disconnected():
            job = await run_in_threadpool(store.get_job, job_id)
            if job is not None and job.attempts != attempts:
                # A new attempt trains steps again from its checkpoint: send every step again, each
                # as its newest attempt logged it (clients replace a step they had).
                step, attempts = 0, job.attempts
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
