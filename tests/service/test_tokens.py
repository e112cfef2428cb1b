"""Bearer tokens in the store (SQLite and PostgreSQL) and in the environment: hashed, expiring, revocable."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import text, update

from service.models import Token
from service.settings import Settings
from service.store import Store
from service.tokens import PREFIX_LEN, Identity, Tokens, check_user_name, parse_expiry


@pytest.fixture
def tokens(store: Store) -> Iterator[Tokens]:
    yield Tokens(store)
    with store.engine.begin() as conn:  # the PostgreSQL database is shared by the module's tests
        conn.execute(text("DELETE FROM tokens"))


def _set(tokens: Tokens, token_id: int, **values: object) -> None:
    with tokens.store.engine.begin() as conn:
        conn.execute(update(Token).where(Token.id == token_id).values(**values))


def test_kept_hashed_at_rest(tokens: Tokens) -> None:
    token, record = tokens.create("alice")
    assert token.startswith("ff_") and len(token) == 3 + 43
    assert record.prefix == token[:PREFIX_LEN] and record.user == "alice" and not record.admin
    with tokens.store.engine.connect() as conn:
        rows = [tuple(map(str, row)) for row in conn.execute(text("SELECT * FROM tokens"))]
    assert len(rows) == 1
    assert not any(token in value or token[PREFIX_LEN:] in value for value in rows[0])  # nowhere in clear
    assert hashlib.sha256(token.encode()).hexdigest() in rows[0]
    assert "hash" not in type(record).model_fields  # records never carry the hash either


def test_authenticate(tokens: Tokens) -> None:
    alice, _ = tokens.create("alice")
    root, _ = tokens.create("ops", admin=True)
    assert tokens.authenticate(alice) == Identity("alice", admin=False)
    assert tokens.authenticate(root) == Identity("ops", admin=True)
    for wrong in ("", alice[:-1], alice + "x", alice.upper(), "ff_" + "x" * 600):
        assert tokens.authenticate(wrong) is None
        assert tokens.refusal(wrong) is None  # unknown: nothing to say about it


def test_authenticate_compares_with_compare_digest(tokens: Tokens, monkeypatch: pytest.MonkeyPatch) -> None:
    token, _ = tokens.create("alice")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert tokens.authenticate(token) is not None
    assert calls == [(hashlib.sha256(token.encode()).hexdigest(),) * 2]  # hashes compared, never the token


def test_last_used_is_recorded(tokens: Tokens) -> None:
    token, record = tokens.create("alice")
    assert record.last_used_at is None
    tokens.authenticate(token)
    (first,) = tokens.list()
    assert first.last_used_at is not None and abs(first.last_used_at - datetime.now(UTC)) < timedelta(minutes=1)
    tokens.authenticate(token)  # within a minute: no new write
    assert tokens.list()[0].last_used_at == first.last_used_at


def test_expiry(tokens: Tokens) -> None:
    token, record = tokens.create("alice", expires_in=timedelta(days=1))
    assert record.expires_at is not None and record.status() == "active"
    assert tokens.authenticate(token) is not None
    _set(tokens, record.id, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert tokens.authenticate(token) is None
    assert tokens.refusal(token) == "expired"
    assert tokens.list()[0].status() == "expired"
    assert tokens.any_exist()
    with pytest.raises(ValueError, match="already in the past"):
        tokens.create("alice", expires_at=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(ValueError, match="must be more than zero"):
        tokens.create("alice", expires_in=timedelta(0))


def test_revoke_by_id_prefix_or_token(tokens: Tokens) -> None:
    assert not tokens.any_exist()
    made = [tokens.create("alice") for _ in range(3)]
    (t1, r1), (t2, r2), (t3, _) = made
    assert tokens.revoke(r1.id).revoked_at is not None
    assert tokens.revoke(str(r2.id)).status() == "revoked"
    tokens.revoke(r2.prefix)  # already revoked: a no-op
    tokens.revoke(t3)
    for token in (t1, t2, t3):
        assert tokens.authenticate(token) is None and tokens.refusal(token) == "revoked"
    assert [r.status() for r in tokens.list()] == ["revoked"] * 3
    assert tokens.any_exist()  # revoking the last token does not turn authentication off
    first = tokens.list()[0].revoked_at
    assert tokens.revoke(r1.id).revoked_at == first
    with pytest.raises(KeyError):
        tokens.revoke(99999)
    with pytest.raises(KeyError):
        tokens.revoke("ff_nope")


def test_revoke_an_ambiguous_prefix_is_refused(tokens: Tokens) -> None:
    _, a = tokens.create("alice")
    _, b = tokens.create("bob")
    _set(tokens, b.id, prefix=a.prefix)
    with pytest.raises(ValueError, match=f"names tokens {a.id}, {b.id}; revoke one by its id"):
        tokens.revoke(a.prefix)


@pytest.mark.parametrize("name", ["alice", "a", "Bob.Smith", "ci_bot-2", "x" * 64, "0day"])
def test_good_user_names(name: str) -> None:
    assert check_user_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "../etc", "-x", "_x", "a b", "é", "x" * 65, "a\n"])
def test_bad_user_names(name: str) -> None:
    with pytest.raises(ValueError, match="not a valid user name"):
        check_user_name(name)


def test_create_checks_the_user_name(tokens: Tokens) -> None:
    with pytest.raises(ValueError, match=r"user '\.\./x': not a valid user name"):
        tokens.create("../x")
    with pytest.raises(ValueError, match=r"user 'admin' is the admin token's user"):
        tokens.create("admin")  # a plain token would own the admin token's jobs
    assert not tokens.any_exist()
    _, record = tokens.create("admin", admin=True)
    assert record.admin


NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("90m", NOW + timedelta(minutes=90)),
        ("12h", NOW + timedelta(hours=12)),
        ("30d", NOW + timedelta(days=30)),
        ("2w", NOW + timedelta(weeks=2)),
        ("2026-12-31", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T18:30", datetime(2026, 12, 31, 18, 30, tzinfo=UTC)),
        ("2026-12-31T18:30+02:00", datetime(2026, 12, 31, 16, 30, tzinfo=UTC)),
    ],
)
def test_parse_expiry(given: str, expected: datetime) -> None:
    assert parse_expiry(given, now=NOW) == expected


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("0d", "--expires 0d: must be more than zero"),
        ("5y", "--expires 5y: not a duration or date; valid: a duration like 90m"),
        ("soon", "--expires soon: not a duration or date"),
        ("2020-01-01", "--expires 2020-01-01: already in the past"),
        ("99999999999d", "--expires 99999999999d: too far in the future"),
    ],
)
def test_parse_expiry_refuses(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_expiry(given, now=NOW)


# -- environment tokens ----------------------------------------------------------------------------------


def test_env_tokens_compare_every_token_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(tokens="a-token:alice, b-token:bob,c-token:carol", admin_token="root-token")
    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def counting(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for token, who in [
        ("a-token", Identity("alice", False)),
        ("c-token", Identity("carol", False)),
        ("root-token", Identity("admin", True)),
        ("nope", None),
        ("a-toke", None),
    ]:
        calls.clear()
        assert settings.authenticate(token) == who
        assert len(calls) == 4  # every configured token, whether and wherever one matches
        assert all(len(a) == len(b) == 64 for a, b in calls)  # sha256 hex on both sides, never the token
    assert settings.auth_enabled and not Settings().auth_enabled


def test_env_token_user_names_are_checked() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(tokens="secret-one:alice,secret-two:../etc")
    assert "entry 2: user '../etc': not a valid user name" in str(err.value)
    assert "secret" not in str(err.value)  # the message never shows a token
    with pytest.raises(ValidationError, match="entry 1: not token:user"):
        Settings(tokens="secret-only")
