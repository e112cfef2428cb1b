"""The API's one error model, the handlers that make every error take it, and the OpenAPI
`responses` that document it.

Every 4xx or 5xx the app sends is `{"detail": "<field>: <what is wrong; what is valid>"}` (`ErrorBody`):
an `HTTPException` of a route, Starlette's own 404 (no such path) and 405 (no such method on it),
FastAPI's request validation (a list of errors, joined into one line here), and anything unforeseen
(a 500 that names no internals; the traceback goes to the log).

    install(app)                                   # in create_app
    @router.get("/{job_id}", responses=error_responses(404, 422, auth=True))
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("fourfold.api")

AUTH_ONLY = "x-fourfold-auth-only"
"""Marks a documented 401 that only a server with tokens sends: api/openapi.py drops it (and the
operation's `security`) from the schema of a server without any, and removes the mark."""


FASTAPI_UNPARSABLE = "There was an error parsing the body"
"""FastAPI's 400 for a JSON body it cannot decode: a 422 here, as every other bad body is."""


class ErrorBody(BaseModel):
    """Every error response: one line naming the field (`body`, `query.limit`, `parallel.tp`, a header,
    `path`, `method`, ...), what is wrong with it, and what would be valid."""

    model_config = ConfigDict(extra="forbid")

    detail: str
    """`<field>: <what is wrong; what is valid>`."""


_DESCRIPTIONS = {
    401: "No bearer token, or one this server does not know (or a revoked or expired one).",
    403: "The token's user may not do this.",
    404: "No such job, or one the caller may not see (another user's job looks the same).",
    409: "The job has already ended.",
    413: "The body is over the size limit.",
    422: "A parameter or the body is invalid; `detail` names the field and what is valid.",
    429: "A quota of the caller is used up; try again after `Retry-After` seconds.",
    503: "The server cannot take this now; try again after `Retry-After` seconds.",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}},
}


def error_response(code: int, description: str | None = None, auth_only: bool = False) -> dict[str, Any]:
    """One documented error status: `ErrorBody` as JSON, with the headers that status carries."""
    out: dict[str, Any] = {"model": ErrorBody, "description": description or _DESCRIPTIONS[code]}
    if code in _HEADERS:
        out["headers"] = _HEADERS[code]
    if auth_only:
        out[AUTH_ONLY] = True
    return out


def error_responses(*codes: int, auth: bool = False) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status in `codes`, plus 401 when `auth` (the route takes the
    caller's bearer token, so a server with tokens answers 401 without a valid one)."""
    out: dict[int | str, dict[str, Any]] = {code: error_response(code) for code in codes}
    if auth:
        out[401] = error_response(401, auth_only=True)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def unprocessable(message: str) -> HTTPException:
    """A 422 naming the field: `unprocessable("train.steps=9: at most 5 on this service")`."""
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def _body(code: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(ErrorBody(detail=detail).model_dump(), status_code=code, headers=headers)


def _detail_text(detail: Any) -> str:
    return detail if isinstance(detail, str) else json.dumps(detail, default=str)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """A route's HTTPException, and Starlette's own 404/405 (detail: the bare status phrase) said in full."""
    code, headers = exc.status_code, dict(exc.headers or {})
    if code < 200 or code in (204, 304):  # a status without a body
        return Response(status_code=code, headers=headers)
    detail = _detail_text(exc.detail)
    if code == 400 and detail == FASTAPI_UNPARSABLE:  # a JSON body route's body that is not even text
        return _body(422, "body: not valid JSON (it does not decode as UTF-8 text); send a JSON object")
    if detail == HTTPStatus(code).phrase:  # raised without a message: Starlette's routing, StaticFiles
        path = request.url.path
        if code == 404:
            detail = f"path: no route {path}; /openapi.json lists the routes"
        elif code == 405:
            allowed = _allowed_methods(request, headers.get("Allow", ""))
            headers["Allow"] = allowed
            detail = f"method: {request.method} is not allowed on {path}; allowed: {allowed}"
        else:
            detail = f"request: {detail.lower()}"
    return _body(code, detail, headers)


def _allowed_methods(request: Request, given: str) -> str:
    """Every method this path takes. Starlette's `Allow` (`given`) names only the first route that
    matched the path, and FastAPI makes one route per method (GET and POST /v1/jobs are two), so the
    documented operations on the path are added."""
    methods = {m.strip().upper() for m in given.split(",") if m.strip()}
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in item if m.upper() in _METHODS}
    return ", ".join(sorted(methods))


_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}


def validation_detail(errors: list[dict[str, Any]]) -> str:
    """FastAPI's list of validation errors as one line: `query.limit: Input should be ... (got 0)`."""
    parts = []
    for err in errors:
        loc = ".".join(str(x) for x in err.get("loc", ())) or "request"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        value = err.get("input")
        got = ""
        if isinstance(value, str | int | float | bool) and err.get("type") != "missing":
            text = repr(value)
            got = f" (got {text if len(text) <= 80 else text[:77] + '...'})"
        parts.append(f"{loc}: {msg}{got}")
    return "; ".join(parts) or "request: invalid"


async def validation_error(request: Request, exc: RequestValidationError) -> Response:
    return _body(422, validation_detail(list(exc.errors())))


async def server_error(request: Request, exc: Exception) -> Response:
    """The last resort: still the error model, naming no internals (the traceback is in the log)."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _body(500, f"server: internal error ({type(exc).__name__}); the service log has the details")


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, server_error)
