"""`/v1/jobs`: submit, list, inspect, cancel, and follow jobs.

Each route about one job takes it as `OwnedJob` (api/deps.py), or the stream as `StreamJob`
(api/tickets.py): a job the caller may not see is a 404, exactly as a missing one. The body of a
submission is read and checked in api/spec.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from sse_starlette.sse import EventSourceResponse

from api import state as app_state
from api.cursor import PATTERN as CURSOR
from api.cursor import decode_cursor, encode_cursor
from api.deps import Caller, CallerDep, OwnedJob, Position, SettingsDep, StoreDep, known_query, read_store
from api.errors import error_response, error_responses, unprocessable
from api.etag import json_response
from api.openapi import job_links, job_spec_body, stream_events, ticket_security
from api.schemas import JobList, JobPublic, JobSummary
from api.spec import DEFAULT_DIR, check_limits, parse_spec, plan_at_submit, read_body
from api.tickets import StreamJob, StreamTicket, book
from service.quota import Quota, QuotaExceeded
from service.settings import Settings
from service.states import TERMINAL, JobState
from service.store import AttemptRecord, EventRecord, LogRecord, MetricRecord, new_job_id
from workers.confine import Grant, StorageRefused, confine_spec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(known_query)])
_ABOUT_A_JOB = error_responses(404, 422, auth=True)  # a job route: no such job, a bad query, no token


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
    spec, priority = parse_spec(await read_body(request), request.headers.get("content-type", ""), settings.spares)
    check_limits(spec, settings)
    spec, notes = await run_in_threadpool(plan_at_submit, spec, settings, app_state.of(request.app).supervisor)
    check_limits(spec, settings)
    planned = spec
    earlier = await read_store(store, store.job_by_key, caller.user, idempotency_key)
    job_id = earlier.id if earlier is not None else new_job_id()
    spec, grant = _confined(planned, settings, caller, job_id)
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
        if job.id != job_id:  # a submission with the same key committed first: its job's paths
            spec, grant = _confined(planned, settings, caller, job.id)
        if (job.spec, job.priority) != (spec, priority):  # the same key for another job is a client bug
            raise unprocessable(
                f"Idempotency-Key: {idempotency_key!r} was used for job {job.id} with a different spec or priority; "
                "use a new key for a new job"
            )
        response.status_code = status.HTTP_200_OK  # a retried submission: the job it made before
    elif notes:
        await run_in_threadpool(store.append_logs, job.id, notes)
    return JobPublic.of(job)


def _confined(spec: dict, settings: Settings, caller: Caller, job_id: str) -> tuple[dict, Grant]:
    """The spec with its storage confined to what the caller may use for job `job_id` (its paths name
    the job), and that grant; a 422 for storage the caller may not use."""
    grant = settings.storage_policy().grant(caller.user, job_id, admin=caller.admin)
    try:
        return confine_spec(spec, grant, default_dir=spec["checkpoint"]["dir"] == DEFAULT_DIR), grant
    except StorageRefused as err:
        raise unprocessable(str(err)) from None


@router.get(
    "",
    response_model=JobList,
    operation_id="list_jobs",
    summary="List jobs, newest first",
    responses=error_responses(422, auth=True),
)
async def list_jobs(
    request: Request,
    store: StoreDep,
    caller: CallerDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Position = 0,
    after: Annotated[str | None, Query(pattern=CURSOR, description="`next` of the previous page")] = None,
) -> Response:
    """A page of jobs, newest first. Page on with `?after=` and the `next` cursor of the page before
    (an index range however deep the page); `offset` skips jobs (after the cursor, with both).
    `ETag`/`If-None-Match` answer an unchanged page with 304."""
    position = decode_cursor(after) if after is not None else None
    # One more than the page: whether a next page exists.
    jobs, total = await read_store(
        store, store.list_jobs, caller.owner_filter, state, limit + 1, offset, position, JobSummary
    )
    more, jobs = len(jobs) > limit, jobs[:limit]
    page = JobList(items=jobs, total=total, limit=limit, offset=offset, next=encode_cursor(jobs[-1]) if more else None)
    return json_response(request, page)


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    operation_id="get_job",
    summary="One job",
    responses=_ABOUT_A_JOB,
)
async def get_job(job: OwnedJob, request: Request) -> Response:
    """The job with its spec and newest metrics; `ETag`/`If-None-Match` answer an unchanged one with 304."""
    return json_response(request, JobPublic.of(job))


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    operation_id="cancel_job",
    summary="Cancel a job (a running one stops after its current step)",
    responses=error_responses(404, 409, 422, auth=True),
)
def cancel(job: OwnedJob, store: StoreDep, caller: CallerDep, request: Request) -> JobPublic:
    if job.state in TERMINAL:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} already ended ({job.state.value})")
    address = request.client.host if request.client else None
    return JobPublic.of(store.request_cancel(job.id, actor=caller.user, address=address))


@router.get(
    "/{job_id}/metrics",
    response_model=list[MetricRecord],
    operation_id="job_metrics",
    summary="A job's metrics, one per step",
    responses=_ABOUT_A_JOB,
)
def metrics(job: OwnedJob, store: StoreDep, after_step: Position = 0) -> list[MetricRecord]:
    return store.metrics(job.id, after_step=after_step)


@router.get(
    "/{job_id}/events",
    response_model=list[EventRecord],
    operation_id="job_events",
    summary="A job's state changes",
    responses=_ABOUT_A_JOB,
)
def events(job: OwnedJob, store: StoreDep, after_id: Position = 0) -> list[EventRecord]:
    return store.events(job.id, after_id=after_id)


@router.get(
    "/{job_id}/logs",
    response_model=list[LogRecord],
    operation_id="job_logs",
    summary="A job's log lines",
    responses=_ABOUT_A_JOB,
)
def logs(job: OwnedJob, store: StoreDep, after_id: Position = 0) -> list[LogRecord]:
    return store.logs(job.id, after_id=after_id)


@router.get(
    "/{job_id}/attempts",
    response_model=list[AttemptRecord],
    operation_id="job_attempts",
    summary="A job's attempts",
    responses=_ABOUT_A_JOB,
)
def attempts(job: OwnedJob, store: StoreDep) -> list[AttemptRecord]:
    """Each attempt: when it ran, how it ended and why, and how long it took to resume after a failure."""
    return store.attempts(job.id)


@router.post(
    "/{job_id}/stream-ticket",
    response_model=StreamTicket,
    operation_id="job_stream_ticket",
    summary="A one-time ticket for the job's event stream",
    responses=error_responses(404, 422, 503, auth=True),
)
def stream_ticket(job: OwnedJob, caller: CallerDep, request: Request) -> StreamTicket:
    """A ticket that opens this job's stream once within 60 s, as `?ticket=`: the browser's EventSource
    cannot send the Authorization header, and a token never goes into a URL (api/tickets.py)."""
    return book(request.app).issue(job.id, caller)


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
async def stream(followed: StreamJob, store: StoreDep, request: Request) -> EventSourceResponse:
    """Server-sent events: `metrics` (one step; after a restart, steps again as the new attempt
    trains them), `event` (a state change), `log`, then `end`."""
    job_id = followed.id

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
