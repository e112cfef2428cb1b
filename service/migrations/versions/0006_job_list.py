"""A page of jobs reads one table: train.steps and the newest metrics on the job row, and indexes for
newest-first pages (everyone's, one owner's).

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_LATEST = ("last_attempt", "last_step", "last_loss", "last_tokens_per_s", "last_mfu")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:  # batch: SQLite cannot ALTER most things in place
        batch.add_column(sa.Column("steps", sa.Integer(), nullable=False, server_default="0"))
        for name in _LATEST:
            kind = sa.Integer() if name in ("last_attempt", "last_step") else sa.Float()
            batch.add_column(sa.Column(name, kind, nullable=True))
        batch.create_index("ix_jobs_created_at_id", ["created_at", "id"])
        batch.create_index("ix_jobs_owner_created_at_id", ["owner", "created_at", "id"])
    _backfill()


def _backfill() -> None:
    """train.steps from each spec, the newest metrics from the metrics table (jobs stored before 0006)."""
    conn = op.get_bind()
    jobs = sa.table("jobs", sa.column("id"), sa.column("spec", sa.JSON()), sa.column("steps"),
                    *(sa.column(n) for n in _LATEST))  # fmt: skip
    metrics = sa.table("metrics", sa.column("job_id"), sa.column("step"), sa.column("attempt"),
                       sa.column("loss"), sa.column("tokens_per_s"), sa.column("mfu"))  # fmt: skip
    for job_id, spec in conn.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        steps = int(((spec or {}).get("train") or {}).get("steps") or 0)
        newest = conn.execute(
            sa.select(metrics.c.attempt, metrics.c.step, metrics.c.loss, metrics.c.tokens_per_s, metrics.c.mfu)
            .where(metrics.c.job_id == job_id)
            .order_by(metrics.c.attempt.desc(), metrics.c.step.desc())
            .limit(1)
        ).first()
        values = dict(zip(_LATEST, newest, strict=True)) if newest is not None else {}
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(steps=steps, **values))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_owner_created_at_id")
        batch.drop_index("ix_jobs_created_at_id")
        for name in ("steps", *_LATEST):
            batch.drop_column(name)
