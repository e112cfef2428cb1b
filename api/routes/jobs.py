"""`/v1/jobs`: submit, list, inspect, cancel, and follow jobs."""

from __future__ import annotations

import asyncio
import functools
import json
import re
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api.deps import CallerDep, SettingsDep, StoreDep
from api.errors import error_response, error_responses
from api.openapi import job_links, job_spec_body, stream_events, ticket_security
from api.schemas import JobList, JobPublic, JobSummary
from api.tickets import StreamCallerDep, StreamTicket, book
from parallel.config import ConfigError, build_config, read_yaml
from service.quota import Quota, QuotaExceeded, world_size
from service.settings import Settings
from service.states import TERMINAL, JobState
from service.store import AttemptRecord, EventRecord, JobRecord, LogRecord, MetricRecord, new_job_id
from workers.confine import StorageRefused, confine_spec

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
        valid = ", ".join(sorted(allowed)) or "none"
        raise _unprocessable(f"query: unknown parameter {', '.join(unknown)}; valid: {valid}")
    repeated = sorted(k for k in set(request.query_params) if len(request.query_params.getlist(k)) > 1)
    if repeated:
        raise _unprocessable(f"query: {', '.join(repeated)} given more than once")


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route reads, its dependencies' included (the stream's `ticket`)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(known_query)])
_ABOUT_A_JOB = error_responses(404, 422, auth=True)  # a job route: no such job, a bad query, no token


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


def _too_large(size: int | str) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body: {size} bytes; a job spec is under 1 MiB")


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it passes MAX_BODY: a declared Content-Length
    over it is refused before anything is read, and a longer stream is cut off."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large(f"over {MAX_BODY}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_spec(raw: bytes, content_type: str) -> tuple[dict[str, Any], int]:
    """The body as a validated engine spec (normalised, defaults filled) and its priority. A spec
    that leaves checkpoint.dir out gets `checkpoint.dir: DEFAULT_DIR` (the job's own directory, once
    confined); one that sets it to null has no checkpoints."""
    if len(raw) > MAX_BODY:
        raise _too_large(len(raw))
    if not raw.strip():
        raise _unprocessable("body: empty; send a job spec as JSON, or as YAML with Content-Type: application/yaml")
    is_yaml = content_type.split(";")[0].strip() in YAML_TYPES
    try:
        data = read_yaml(raw.decode()) if is_yaml else json.loads(raw, parse_constant=_no_constant)
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
    section = data.get("checkpoint")
    default_dir = not (isinstance(section, dict) and "dir" in section)
    try:
        cfg = build_config(data, strict=True)  # the types its schema (/openapi.json) says
    except ConfigError as err:
        raise _unprocessable(str(err)) from None
    spec = cfg.model_dump(mode="json", by_alias=True)
    if default_dir:
        spec["checkpoint"]["dir"] = DEFAULT_DIR
    return spec, priority


DEFAULT_DIR = "."  # checkpoint.dir left out: the job's own directory (relative paths start there)


def check_limits(spec: dict[str, Any], settings: Settings) -> None:
    """The operator's bounds on a spec's size (422 naming the field)."""
    steps = spec["train"]["steps"]
    if steps > settings.max_steps:
        raise _unprocessable(f"train.steps={steps}: at most {settings.max_steps} on this service")
    if (ranks := world_size(spec)) > settings.max_world_size:
        p = spec["parallel"]
        raise _unprocessable(
            f"parallel: dp*tp*pp*cp = {p['dp']}*{p['tp']}*{p['pp']}*{p['cp']} = {ranks} ranks; "
            f"at most {settings.max_world_size} on this service"
        )


def _get(store: Any, job_id: str, caller: Any) -> JobRecord:
    job = store.get_job(job_id, owner=caller.owner_filter) if JOB_ID.match(job_id) else None
    if job is None:  # another user's job looks exactly like a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobPublic,
    operation_id="submit_job",
    summary="Submit a job (JSON, or YAML with Content-Type: application/yaml)",
    responses={
        201: {"description": "The job, stored QUEUED.", "links": job_links()},
        200: {
            "model": JobPublic,
            "description": "A retry (the same Idempotency-Key): the job it made before.",
            "links": job_links(),
        },
        **error_responses(413, 422, 429, auth=True),
    },
    openapi_extra=job_spec_body(),
)
async def submit(
    request: Request,
    response: Response,
    store: StoreDep,
    caller: CallerDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> JobPublic:
    spec, priority = parse_spec(await read_body(request), request.headers.get("content-type", ""))
    check_limits(spec, settings)
    earlier = await run_in_threadpool(store.job_by_key, caller.user, idempotency_key)
    job_id = earlier.id if earlier is not None else new_job_id()
    grant = settings.storage_policy().grant(caller.user, job_id, admin=caller.admin)
    try:
        spec = confine_spec(spec, grant, default_dir=spec["checkpoint"]["dir"] == DEFAULT_DIR)
    except StorageRefused as err:
        raise _unprocessable(str(err)) from None
    quota = Quota(settings.quota_ranks, settings.quota_queued, settings.quota_submits_per_minute)
    address = request.client.host if request.client else None
    try:
        job, created = await run_in_threadpool(
            functools.partial(store.create_job, spec, caller.user, spec["name"], priority, idempotency_key,
                              job_id=job_id, storage=grant.to_dict(), quota=quota, address=address)
        )  # fmt: skip
    except QuotaExceeded as err:
        retry = {"Retry-After": str(err.retry_after)}
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"{err.message} ({err.limit})", headers=retry) from None
    if not created:
        if (job.spec, job.priority) != (spec, priority):  # the same key for another job is a client bug
            raise _unprocessable(
                f"Idempotency-Key: {idempotency_key!r} was used for job {job.id} with a different spec or priority; "
                "use a new key for a new job"
            )
        response.status_code = status.HTTP_200_OK  # a retried submission: the job it made before
    return JobPublic.of(job)


@router.get(
    "",
    response_model=JobList,
    operation_id="list_jobs",
    summary="List jobs, newest first",
    responses=error_responses(422, auth=True),
)
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


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    operation_id="get_job",
    summary="One job",
    responses=_ABOUT_A_JOB,
)
def get_job(job_id: str, store: StoreDep, caller: CallerDep) -> JobPublic:
    job = _get(store, job_id, caller)
    return JobPublic.of(job, store.latest_metrics([job_id]).get(job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    operation_id="cancel_job",
    summary="Cancel a job (a running one stops after its current step)",
    responses=error_responses(404, 409, 422, auth=True),
)
def cancel(job_id: str, store: StoreDep, caller: CallerDep, request: Request) -> JobPublic:
    job = _get(store, job_id, caller)
    if job.state in TERMINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} already ended ({job.state.value})")
    address = request.client.host if request.client else None
    return JobPublic.of(store.request_cancel(job_id, actor=caller.user, address=address))


@router.get(
    "/{job_id}/metrics",
    response_model=list[MetricRecord],
    operation_id="job_metrics",
    summary="A job's metrics, one per step",
    responses=_ABOUT_A_JOB,
)
def metrics(job_id: str, store: StoreDep, caller: CallerDep, after_step: Position = 0) -> list[MetricRecord]:
    _get(store, job_id, caller)
    return store.metrics(job_id, after_step=after_step)


@router.get(
    "/{job_id}/events",
    response_model=list[EventRecord],
    operation_id="job_events",
    summary="A job's state changes",
    responses=_ABOUT_A_JOB,
)
def events(job_id: str, store: StoreDep, caller: CallerDep, after_id: Position = 0) -> list[EventRecord]:
    _get(store, job_id, caller)
    return store.events(job_id, after_id=after_id)


@router.get(
    "/{job_id}/logs",
    response_model=list[LogRecord],
    operation_id="job_logs",
    summary="A job's log lines",
    responses=_ABOUT_A_JOB,
)
def logs(job_id: str, store: StoreDep, caller: CallerDep, after_id: Position = 0) -> list[LogRecord]:
    _get(store, job_id, caller)
    return store.logs(job_id, after_id=after_id)


@router.get(
    "/{job_id}/attempts",
    response_model=list[AttemptRecord],
    operation_id="job_attempts",
    summary="A job's attempts",
    responses=_ABOUT_A_JOB,
)
def attempts(job_id: str, store: StoreDep, caller: CallerDep) -> list[AttemptRecord]:
    """Each attempt: when it ran, how it ended and why, and how long it took to resume after a failure."""
    _get(store, job_id, caller)
    return store.attempts(job_id)


@router.post(
    "/{job_id}/stream-ticket",
    response_model=StreamTicket,
    operation_id="job_stream_ticket",
    summary="A one-time ticket for the job's event stream",
    responses=error_responses(404, 422, 503, auth=True),
)
def stream_ticket(job_id: str, store: StoreDep, caller: CallerDep, request: Request) -> StreamTicket:
    """A ticket that opens this job's stream once within 60 s, as `?ticket=`: the browser's EventSource
    cannot send the Authorization header, and a token never goes into a URL (api/tickets.py)."""
    _get(store, job_id, caller)
    return book(request.app).issue(job_id, caller)


@router.get(
    "/{job_id}/stream",
    response_class=EventSourceResponse,
    operation_id="job_stream",
    summary="Follow a job: server-sent events until it ends",
    openapi_extra=ticket_security(),  # a ticket instead of the bearer header (api/tickets.py)
    responses={
        200: {"description": "`metrics`, `event` and `log` events, then `end`.", "content": stream_events()},
        401: error_response(401, "An invalid ticket (unknown, expired, used, or another job's), or no valid token."),
        **error_responses(404, 422),
    },
)
async def stream(job_id: str, store: StoreDep, caller: StreamCallerDep, request: Request) -> EventSourceResponse:
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
