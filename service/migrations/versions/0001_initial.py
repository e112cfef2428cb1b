"""Initial job store schema: jobs, attempts, events, metrics, checkpoints, log_lines.

Written by hand and independent of `service.models` (a migration must keep describing the schema as
it was when it was written). Times are `DateTime(timezone=True)`; on SQLite they hold naive UTC.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_FLOAT_METRICS = ("loss", "grad_norm", "lr", "tokens_per_s", "tflops", "mfu", "step_time_s")


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True)


def _job_id() -> sa.Column:
    return sa.Column("job_id", sa.String(32), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("owner", sa.String(100), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        _time("created_at"),
        _time("updated_at"),
        _time("started_at", nullable=True),
        _time("finished_at", nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
    )
    op.create_index("ix_jobs_owner", "jobs", ["owner"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_state_priority_created_at", "jobs", ["state", "priority", "created_at"])

    op.create_table(
        "attempts",
        _id(),
        _job_id(),
        sa.Column("number", sa.Integer(), nullable=False),
        _time("started_at"),
        _time("finished_at", nullable=True),
        sa.Column("outcome", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_attempts_job_id", "attempts", ["job_id"])

    op.create_table(
        "events",
        _id(),
        _job_id(),
        _time("time"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
    )
    op.create_index("ix_events_job_id", "events", ["job_id"])

    op.create_table(
        "metrics",
        _id(),
        _job_id(),
        sa.Column("step", sa.Integer(), nullable=False),
        _time("time"),
        *(sa.Column(name, sa.Float(), nullable=True) for name in _FLOAT_METRICS),
        sa.Column("peak_mem_bytes", sa.BigInteger(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.UniqueConstraint("job_id", "step", "attempt", name="uq_metrics_job_id_step_attempt"),
    )
    op.create_index("ix_metrics_job_id_step", "metrics", ["job_id", "step"])

    op.create_table(
        "checkpoints",
        _id(),
        _job_id(),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        _time("time"),
    )
    op.create_index("ix_checkpoints_job_id", "checkpoints", ["job_id"])

    op.create_table(
        "log_lines",
        _id(),
        _job_id(),
        _time("time"),
        sa.Column("line", sa.Text(), nullable=False),
    )
    op.create_index("ix_log_lines_job_id", "log_lines", ["job_id"])


def downgrade() -> None:
    for table in ("log_lines", "checkpoints", "metrics", "events", "attempts", "jobs"):
        op.drop_table(table)
