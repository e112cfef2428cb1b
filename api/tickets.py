"""Stream tickets: short-lived, single-use passes that open one job's event stream.

The browser's EventSource cannot send an Authorization header, and a bearer token in a URL ends up
in access logs, the browser's history and proxies. So the dashboard first asks, with its header,

    POST /v1/jobs/{id}/stream-ticket        ->  {"ticket": "...", "expires_in": 60}

then opens `GET /v1/jobs/{id}/stream?ticket=...`. A ticket opens that job's stream once, within
60 s, as the user who asked for it (an admin's ticket as admin); then it is gone, so one seen in a
log is already useless. Tickets live in this process's memory (`app.state.tickets`): expired ones
are dropped whenever a ticket is issued, a user holds at most `PER_USER` (a new one replaces that
user's oldest) and the process at most `MAX_OUTSTANDING`. The stream route takes its job as
`StreamJob`: the ticket's (or the header's) caller, then that job as the caller may see it (404 for
another user's, as `api.deps.OwnedJob` on every other job route).
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from pydantic import BaseModel

from api import state as app_state
from api.deps import Caller, StoreDep, find_job, get_caller
from service.store import JobRecord

TTL_S = 60
PER_USER = 16  # one per open dashboard tab and reconnect is plenty
MAX_OUTSTANDING = 4096


class StreamTicket(BaseModel):
    ticket: str
    """Pass as `?ticket=` to `GET /v1/jobs/{id}/stream`; it opens that stream once."""
    expires_in: int
    """Seconds left to use it."""


@dataclass(frozen=True)
class _Pass:
    job_id: str
    caller: Caller
    expires: float


class TicketBook:
    """The tickets issued and not yet used or expired. `clock` is monotonic seconds (tests move it)."""

    def __init__(self, ttl_s: int = TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._passes: dict[str, _Pass] = {}  # insertion order is issue order: the oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._passes)

    def issue(self, job_id: str, caller: Caller) -> StreamTicket:
        """A new ticket for `job_id`'s stream; the caller's right to see the job is checked before."""
        with self._lock:
            now = self.clock()
            for key in [k for k, p in self._passes.items() if p.expires <= now]:
                del self._passes[key]
            mine = [k for k, p in self._passes.items() if p.caller == caller]
            for key in mine[: max(0, len(mine) - PER_USER + 1)]:
                del self._passes[key]
            if len(self._passes) >= MAX_OUTSTANDING:
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE,
                    f"stream tickets: {MAX_OUTSTANDING} outstanding, the most this server holds; "
                    f"try again within {self.ttl_s} s",
                    headers={"Retry-After": str(self.ttl_s)},
                )
            ticket = secrets.token_urlsafe(32)
            self._passes[ticket] = _Pass(job_id, caller, now + self.ttl_s)
        return StreamTicket(ticket=ticket, expires_in=self.ttl_s)

    def redeem(self, ticket: str, job_id: str) -> Caller:
        """The caller the ticket was issued to; the ticket is used up, whatever the answer."""
        with self._lock:
            found = self._passes.pop(ticket, None)
            now = self.clock()
        again = f"ask POST /v1/jobs/{job_id}/stream-ticket for a new one"
        if found is None or found.expires <= now:
            raise _unauthorized(f"ticket: unknown, expired or already used (each opens one stream once); {again}")
        if found.job_id != job_id:
            raise _unauthorized(f"ticket: issued for another job's stream, not job {job_id}; {again}")
        return found.caller


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def book(app: FastAPI) -> TicketBook:
    return app_state.of(app).tickets


def _or_refusal(dependency: Callable[..., Awaitable[Caller]]) -> Callable[..., Awaitable[Caller | HTTPException]]:
    """`dependency` (the bearer header's `get_caller`, a coroutine function) with the same parameters,
    so FastAPI resolves them as for any route, but handing back its 401 instead of raising it: a stream
    opened with a ticket needs no header."""

    async def call(**kwargs: Any) -> Caller | HTTPException:
        try:
            return await dependency(**kwargs)
        except HTTPException as err:
            if err.status_code != status.HTTP_401_UNAUTHORIZED:
                raise
            return err

    call.__signature__ = inspect.signature(dependency, eval_str=True)  # type: ignore[attr-defined]
    return call


_header_caller = _or_refusal(get_caller)


def stream_caller(
    request: Request,
    job_id: str,
    by_header: Annotated[Caller | HTTPException, Depends(_header_caller)],
    ticket: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> Caller:
    """The stream's caller: the ticket's when `?ticket=` is given, else the bearer header's as on every route."""
    if ticket is not None:
        return book(request.app).redeem(ticket, job_id)
    if isinstance(by_header, HTTPException):
        raise by_header
    return by_header


StreamCallerDep = Annotated[Caller, Depends(stream_caller)]


def stream_job(job_id: str, store: StoreDep, caller: StreamCallerDep) -> JobRecord:
    """The stream's job, as its caller (by ticket or by header) may see it: 404 as on every job route."""
    return find_job(store, job_id, caller)


StreamJob = Annotated[JobRecord, Depends(stream_job)]
