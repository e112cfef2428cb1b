"""Shared dependencies of the routes: the store, the caller, the job the caller asks about, the
supervisor's metrics, and the refusal of query parameters a route does not take.

    @router.get("/{job_id}")
    def get_job(job: OwnedJob) -> JobPublic: ...      # 404 unless the caller may see it
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api import state as app_state
from api.errors import unprocessable
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import JobRecord, Store
from service.tokens import Tokens, auth_required

_bearer = HTTPBearer(auto_error=False)
T = TypeVar("T")
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_INT = 2**31 - 1  # what every integer column holds


@dataclass(frozen=True)
class Caller:
    user: str
    admin: bool

    @property
    def owner_filter(self) -> str | None:
        """None for an admin (sees every job), else the caller's own name."""
        return None if self.admin else self.user


# Dependencies that do no I/O are `async def`: FastAPI runs a plain `def` one in its thread pool, a hop
# that costs more than the dependency itself. Those that query the store make one hop for it.


async def get_store(request: Request) -> Store:
    return app_state.of(request.app).store


async def get_settings(request: Request) -> Settings:
    return app_state.of(request.app).settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return app_state.of(request.app).metrics


async def get_tokens(request: Request) -> Tokens:
    """The store's tokens table (made once per store and kept on the app; it caches no token)."""
    state = app_state.of(request.app)
    tokens = getattr(state, "tokens", None)
    if tokens is None or tokens.store is not state.store:
        tokens = state.tokens = Tokens(state.store)
    return tokens


async def get_caller(
    settings: Annotated[Settings, Depends(get_settings)],
    tokens: Annotated[Tokens, Depends(get_tokens)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The bearer token's user (never from the URL: the browser's event stream uses a ticket, api/tickets.py)."""
    token = credentials.credentials if credentials is not None else None
    # Environment tokens first (constant time, no query: on the event loop), then the store's, looked
    # up on every request so that a revocation counts from the next one.
    if token and (who := settings.authenticate(token)):
        return Caller(who.user, admin=who.admin)
    if token:  # a store token's lookup may write (last_used_at): in a thread
        return await run_in_threadpool(_caller_from_store, settings, tokens, token)
    return await read_store(tokens.store, _caller_from_store, settings, tokens, token)


def _caller_from_store(settings: Settings, tokens: Tokens, token: str | None) -> Caller:
    if token and (who := tokens.authenticate(token)):
        return Caller(who.user, admin=who.admin)
    # Any token in the store, even a revoked or expired one, keeps authentication on.
    if not auth_required(settings.auth_enabled, tokens):
        return Caller("local", admin=True)  # no tokens at all: `fourfold up` listens on 127.0.0.1 only
    refused = tokens.refusal(token) if token else None
    message = f"bearer token {refused}" if refused else "missing or unknown bearer token"
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        f"{message} (send Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def read_store(store: Store, read: Callable[..., T], *args: Any) -> T:
    """`read(*args)`, a read of the store: on the event loop when the store is a local SQLite file (a
    read there takes microseconds, less than the hop to a thread and back), in a thread when the
    database is across a network (PostgreSQL), where a query waits on a round trip."""
    if store.local:
        return read(*args)
    return await run_in_threadpool(read, *args)


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[Caller, Depends(get_caller)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
Position = Annotated[int, Query(ge=0, le=MAX_INT)]
"""An offset, a step or an id to read after."""


def find_job(store: Store, job_id: str, caller: Caller) -> JobRecord:
    """The job, if `caller` may see it (its owner, or an admin); else 404."""
    job = store.get_job(job_id, owner=caller.owner_filter) if JOB_ID.match(job_id) else None
    if job is None:  # another user's job looks exactly like a missing one
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")
    return job


async def owned_job(
    job_id: str,
    store: StoreDep,
    settings: Annotated[Settings, Depends(get_settings)],
    tokens: Annotated[Tokens, Depends(get_tokens)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> JobRecord:
    """The path's job, as the bearer token's caller may see it (the stream's: api/tickets.StreamJob).
    The caller is found as `get_caller` finds it, in the same hop to a thread as the job's query."""
    token = credentials.credentials if credentials is not None else None
    if token and (who := settings.authenticate(token)):
        return await read_store(store, find_job, store, job_id, Caller(who.user, admin=who.admin))

    def caller_then_job() -> JobRecord:
        return find_job(store, job_id, _caller_from_store(settings, tokens, token))

    return await (run_in_threadpool(caller_then_job) if token else read_store(store, caller_then_job))


OwnedJob = Annotated[JobRecord, Depends(owned_job)]


async def known_query(request: Request) -> None:
    """Refuse query parameters the route does not take, and repeated ones: `?status=RUNNING` for
    `?state=RUNNING` must not silently list everything."""
    route = request.scope.get("route")
    allowed = _query_names(route.dependant) if route is not None else set()
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise unprocessable(f"query: unknown parameter {', '.join(unknown)}; valid: {valid}")
    repeated = sorted(k for k in set(request.query_params) if len(request.query_params.getlist(k)) > 1)
    if repeated:
        raise unprocessable(f"query: {', '.join(repeated)} given more than once")


def _query_names(dependant: Any) -> set[str]:
    """The query parameters a route reads, its dependencies' included (the stream's `ticket`)."""
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
