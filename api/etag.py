"""JSON responses that carry an `ETag`, and the `304 Not Modified` for a client that already has them.

    return json_response(request, JobList(...))

The tag is a hash of the body, so it changes exactly when the representation does (a state change, a
new step's metrics, a new job on a list page); a client that sends it back in `If-None-Match` gets an
empty 304 instead of the same page again. `Cache-Control: no-cache`: caches may keep a copy but must
ask first. The response is serialised by pydantic in one call, not through FastAPI's generic
encoder (which walks the model in Python first).
"""

from __future__ import annotations

import hashlib

from fastapi import Request, Response
from pydantic import BaseModel


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=16).hexdigest() + '"'


def _matches(header: str | None, tag: str) -> bool:
    """RFC 9110 If-None-Match: `*`, or a list of tags compared weakly (a `W/` prefix does not count)."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    return any(part.strip().removeprefix("W/") == tag for part in header.split(","))


def json_response(request: Request, model: BaseModel, status_code: int = 200) -> Response:
    body = model.model_dump_json().encode()
    headers = {"ETag": etag_of(body), "Cache-Control": "no-cache"}
    if (
        status_code == 200
        and request.method in ("GET", "HEAD")
        and _matches(request.headers.get("if-none-match"), headers["ETag"])
    ):
        return Response(status_code=304, headers=headers)
    return Response(body, status_code, headers=headers, media_type="application/json")
