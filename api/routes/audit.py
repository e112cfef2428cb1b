"""`/v1/audit`: what callers of the API did (submissions, cancels), who, and from which address; admins only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel

from api.deps import JOB_ID, CallerDep, Position, StoreDep, known_query
from api.errors import error_response, error_responses
from service.store import EventRecord

router = APIRouter(prefix="/v1/audit", tags=["audit"], dependencies=[Depends(known_query)])


class AuditPage(BaseModel):
    items: list[EventRecord]
    """Newest first."""
    total: int
    limit: int
    offset: int


@router.get("", response_model=AuditPage, operation_id="audit", summary="Who did what (admins only)",
            responses={**error_responses(422, auth=True), 403: error_response(403, auth_only=True)})  # fmt: skip
def audit(
    store: StoreDep,
    caller: CallerDep,
    actor: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
    job_id: Annotated[str | None, Query(pattern=JOB_ID.pattern)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Position = 0,
) -> AuditPage:
    """Submissions and cancels of every user, each with its actor and address (admin only)."""
    if not caller.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"audit: admins only ({caller.user} is not one)")
    items, total = store.audit(actor=actor, job_id=job_id, limit=limit, offset=offset)
    return AuditPage(items=items, total=total, limit=limit, offset=offset)
