"""Store tokens through the API (SQLite and PostgreSQL) and the `fourfold token` commands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text, update
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli
from api.cli.tokens import auth_on
from service.models import Token
from service.settings import Settings
from service.store import Store
from service.tokens import Tokens

SPEC = {"name": "tiny", "model": {"preset": "tiny"}, "train": {"steps": 3, "global_batch": 8, "micro_batch": 2}}
_ENV = ("FOURFOLD_TOKENS", "FOURFOLD_ADMIN_TOKEN", "FOURFOLD_DATABASE_URL", "DATABASE_URL", "FOURFOLD_DATA_DIR")


@pytest.fixture(autouse=True)
def _no_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    url = request.getfixturevalue("pg_url")
    yield url
    store = Store(url)  # one database per module: start each test without tokens or jobs
    with store.engine.begin() as conn:
        conn.execute(text("TRUNCATE tokens, jobs CASCADE"))
    store.close()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


def _client(store: Store, tmp_path: Path, **settings: str) -> TestClient:
    return TestClient(create_app(Settings(data_dir=tmp_path, **settings), store=store))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_store_tokens_revoked_and_expired_are_401_on_the_next_request(store: Store, tmp_path: Path) -> None:
    tokens = Tokens(store)
    alice, alice_rec = tokens.create("alice")
    bob, bob_rec = tokens.create("bob", expires_in=timedelta(hours=1))
    ops, _ = tokens.create("ops", admin=True)
    with _client(store, tmp_path) as client:
        made = client.post("/v1/jobs", json=SPEC, headers=_bearer(alice))
        assert made.status_code == 201 and made.json()["owner"] == "alice"
        assert client.get("/v1/jobs", headers=_bearer(bob)).json()["total"] == 0  # bob sees only his own
        assert client.get("/v1/jobs", headers=_bearer(ops)).json()["total"] == 1  # an admin sees all
        refused = client.get("/v1/jobs")
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/jobs", headers=_bearer("ff_wrong")).json()["detail"].startswith("missing or unknown")

        tokens.revoke(alice_rec.id)
        r = client.get("/v1/jobs", headers=_bearer(alice))
        assert r.status_code == 401 and r.json()["detail"].startswith("bearer token revoked")

        with store.engine.begin() as conn:
            past = datetime.now(UTC) - timedelta(seconds=1)
            conn.execute(update(Token).where(Token.id == bob_rec.id).values(expires_at=past))
        r = client.get("/v1/jobs", headers=_bearer(bob))
        assert r.status_code == 401 and r.json()["detail"].startswith("bearer token expired")
        assert client.get("/v1/jobs", headers=_bearer(ops)).status_code == 200


def test_auth_turns_on_with_the_first_store_token_and_stays_on(store: Store, tmp_path: Path) -> None:
    tokens = Tokens(store)
    with _client(store, tmp_path) as client:
        assert client.get("/v1/jobs").status_code == 200  # no token anywhere: open, caller is the local admin
        token, record = tokens.create("alice")
        assert client.get("/v1/jobs").status_code == 401  # at once, without a restart
        assert client.get("/v1/jobs", headers=_bearer(token)).status_code == 200
        tokens.revoke(record.id)
        assert client.get("/v1/jobs").status_code == 401  # revoking the last token does not open the API
        assert client.get("/v1/cluster").status_code == 401


def test_env_tokens_still_work_beside_store_tokens(store: Store, tmp_path: Path) -> None:
    stored, _ = Tokens(store).create("carol")
    with _client(store, tmp_path, tokens="a-token:alice", admin_token="root-token") as client:
        assert client.post("/v1/jobs", json=SPEC, headers=_bearer("a-token")).json()["owner"] == "alice"
        assert client.post("/v1/jobs", json=SPEC, headers=_bearer(stored)).json()["owner"] == "carol"
        assert client.get("/v1/jobs", headers=_bearer("a-token")).json()["total"] == 1
        assert client.get("/v1/jobs", headers=_bearer("root-token")).json()["total"] == 2
        assert client.get("/v1/jobs", headers=_bearer("a-toke")).status_code == 401
        assert client.get("/v1/jobs").status_code == 401


# -- fourfold token ----------------------------------------------------------------------------------------


def _run(db_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env={"DATABASE_URL": db_url})
    return result.exit_code, result.stdout, result.stderr


def test_cli_create_list_revoke(db_url: str, tmp_path: Path) -> None:
    code, out, err = _run(db_url, "token", "create", "alice", "--expires", "30d")
    assert code == 0, err
    token = out.strip()
    assert re.fullmatch(r"ff_[A-Za-z0-9_-]{43}", token)
    assert "not shown again" in err and "for alice" in err and token not in err

    code, out, err = _run(db_url, "token", "create", "ops", "--admin")
    assert code == 0 and "admin token" in err and "does not expire" in err

    code, out, _ = _run(db_url, "token", "list")
    assert code == 0 and token not in out and token[8:20] not in out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "USER", "ADMIN", "PREFIX"]
    alice_line = next(line for line in lines if " alice " in line)
    assert token[:8] + "..." in alice_line and alice_line.endswith("active")
    token_id = alice_line.split()[0]

    code, out, _ = _run(db_url, "token", "revoke", token_id)
    assert code == 0 and out.strip() == f"revoked token {token_id} (alice, {token[:8]}...)"
    _, out, _ = _run(db_url, "token", "list")
    assert next(line for line in out.splitlines() if " alice " in line).endswith("revoked")

    store = Store(db_url)
    try:
        assert Tokens(store).authenticate(token) is None
        assert auth_on(Settings(database_url=db_url)) is True
    finally:
        store.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["token", "revoke", "4242"],
            "fourfold: error: token 4242: no such token; `fourfold token list` shows the ids",
        ),
        (["token", "revoke", "ff_" + "s" * 40], "fourfold: error: token ff_sssss...: no such token"),
        (["token", "create", "../etc"], "fourfold: error: user '../etc': not a valid user name"),
        (["token", "create", "bob", "--expires", "5y"], "fourfold: error: --expires 5y: not a duration or date"),
        (["token", "create", "bob", "--expires", "2020-01-01"], "fourfold: error: --expires 2020-01-01: already in"),
    ],
    ids=["unknown-id", "unknown-token", "bad-user", "bad-expiry", "past-expiry"],
)
def test_cli_mistakes_are_one_line(db_url: str, args: list[str], message: str) -> None:
    code, out, err = _run(db_url, *args)
    assert code == 2 and out == ""
    assert err.startswith(message) and len(err.strip().splitlines()) == 1
    assert "s" * 20 not in err  # a token typed by mistake is not echoed back


def test_up_refuses_an_open_public_host(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["up", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--host 0.0.0.0: no tokens are configured (FOURFOLD_TOKENS or `fourfold token create`)" in result.stderr
    settings = Settings(data_dir=tmp_path)
    assert auth_on(settings) is False
    store = Store(settings.db_url)
    Tokens(store).revoke(Tokens(store).create("alice")[1].id)
    store.close()
    assert auth_on(settings) is True  # a revoked token keeps it on
