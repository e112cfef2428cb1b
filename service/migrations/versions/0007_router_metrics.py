"""Metrics rows keep the mixture-of-experts router's statistics of each step (null for dense models).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ROUTER = ("moe_aux_loss", "moe_dropped_frac", "moe_max_load")


def upgrade() -> None:
    with op.batch_alter_table("metrics") as batch:  # batch: SQLite cannot ALTER most things in place
        for name in ROUTER:
            batch.add_column(sa.Column(name, sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("metrics") as batch:
        for name in ROUTER:
            batch.drop_column(name)
