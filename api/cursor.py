"""The cursor of a job list page (`next`, given back as `?after=`): the last job's creation time (in
microseconds since the epoch) and id. Clients treat it as opaque; its pattern is exact, so that every
string the OpenAPI schema allows is a position the store can start from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from api.schemas import JobSummary

PATTERN = r"^[0-9]{1,17}-[0-9a-f]{32}$"  # 17 digits of microseconds: until the year 5138
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def encode_cursor(job: JobSummary) -> str:
    micros = (job.created_at - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}-{job.id}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor that matches `PATTERN` (FastAPI checks the pattern first)."""
    micros, job_id = cursor.split("-")
    return _EPOCH + timedelta(microseconds=int(micros)), job_id
