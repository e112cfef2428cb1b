"""Alembic migrations of the job store; run through `service.db.upgrade`, never by hand with an alembic.ini."""
