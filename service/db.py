"""Engine, schema upgrades and sessions of the job store.

    engine = make_engine("sqlite:///var/fourfold/jobs.db")   # or postgresql://user@host/db
    upgrade(engine)                                          # alembic upgrade head, no alembic.ini
    Session = session_factory(engine)

SQLite gets WAL, foreign keys and a 5 s busy timeout on every connection. A transaction on
`writer(engine)` starts with BEGIN IMMEDIATE so that a read-then-write (a state transition) holds
the write lock from its first read, the SQLite stand-in for PostgreSQL's SELECT ... FOR UPDATE;
read-only transactions start with a plain BEGIN, so readers run side by side under WAL instead
of queueing for the write lock; `single_reads(engine)` reads one statement without a transaction
around it. PostgreSQL URLs are rewritten to the psycopg 3 driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

MIGRATIONS = Path(__file__).resolve().parent / "migrations"

# Any constant: serialises concurrent `upgrade` calls on one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x0F0F_F01D


def normalise_url(url: str) -> URL:
    """Parse `url`; `postgres://` and `postgresql://` become `postgresql+psycopg://`."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook below emit BEGIN itself instead of pysqlite's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=5000"):
            cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    options = conn.get_execution_options()
    if options.get("fourfold_single"):
        return  # one statement: SQLite's own implicit transaction around it is enough
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("fourfold_write") else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine (and pool) whose transactions take SQLite's write lock up front."""
    return engine.execution_options(fourfold_write=True)


POOL_SIZE = 16
"""Connections kept open: more than the API runs requests in threads at once (Settings.api_threads),
so that a busy API does not open and close one per request; the supervisor's threads use the rest
and the overflow."""
_POOL = {"pool_size": POOL_SIZE, "max_overflow": 16}


def single_reads(engine: Engine) -> Engine:
    """The same engine (and pool) for reads of one statement: no BEGIN and COMMIT around it (on
    PostgreSQL autocommit, on SQLite the statement's implicit transaction), two round trips fewer
    for the reads every API call makes."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(fourfold_single=True)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def make_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, set up as described in the module docstring."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, **_POOL)
    database = parsed.database or ""
    memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
    if memory:
        # One shared connection, or every pooled connection would see its own empty database.
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(_POOL)
        if not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def alembic_config(engine: Engine) -> Config:
    """The Alembic `Config` of the job store, built in code (there is no alembic.ini)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return config


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest migration (alembic upgrade head); a no-op when it is there."""
    config = alembic_config(engine)
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
        config.attributes["connection"] = conn
        command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on `engine` whose objects stay readable after commit (expire_on_commit=False)."""
    return sessionmaker(engine, expire_on_commit=False)
