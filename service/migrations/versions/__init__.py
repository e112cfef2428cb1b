"""Alembic revisions of the job store, one file each, written by hand (they never import `service.models`)."""
