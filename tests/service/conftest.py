"""Fixtures of the job store tests: `url` and `store`, each test once on SQLite and once on PostgreSQL.

SQLite: a file under tmp_path. PostgreSQL: the local server at postgresql://postgres@127.0.0.1:5432/test
(trust auth); each test module gets a database of its own (the `pg_url` fixture of tests/conftest.py),
emptied between tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from service.store import Store


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db/jobs.db"
        return
    base = request.getfixturevalue("pg_url")
    yield base
    # One database per module: empty it between tests (the schema stays, and upgrade is a no-op).
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs CASCADE")


@pytest.fixture
def store(url: str) -> Iterator[Store]:
    s = Store(url)
    yield s
    s.close()
