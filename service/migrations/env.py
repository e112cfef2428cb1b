"""Alembic environment of the job store.

There is no alembic.ini: `service.db.upgrade` builds the `Config` in code and passes its open
connection in `config.attributes["connection"]`, which is used as is. Without one, a connection is
made from the `sqlalchemy.url` option (or, offline, SQL is printed for that URL).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
