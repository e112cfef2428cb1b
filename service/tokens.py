"""Bearer tokens of the API kept in the store: hashed at rest, with optional expiry, revocable.

    tokens = Tokens(store)
    token, record = tokens.create("alice", expires_at=parse_expiry("30d"))   # `token` is shown once
    tokens.authenticate(token)        # Identity(user="alice", admin=False); None once revoked or expired
    tokens.revoke(record.id)          # takes effect on the next request: nothing is cached
    tokens.list()                     # TokenRecord: id, user, prefix, times; never the token or its hash

Only the sha256 of a token is stored. A presented token is hashed and looked up by that hash, so
the database compares hashes, never the secret, and the timing of that lookup says nothing useful
about any stored token (finding a matching input would need a sha256 preimage); the matched hash is
compared once more with `hmac.compare_digest`. Rows are never deleted, only revoked: `any_exist()`
stays true once a token was made, so revoking the last one cannot turn authentication off.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, NamedTuple

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select, update

from service.models import Token, utcnow
from service.records import UTCTime

if TYPE_CHECKING:
    from service.store import Store

TOKEN_PREFIX = "ff_"
"""Every token made here starts with it, so a leaked one is recognisable (secret scanners, logs)."""
PREFIX_LEN = 8
"""How many leading characters of a token are kept in clear to name it: `ff_` and 5 random ones."""
_MAX_TOKEN_LEN = 512  # longer input is no token of ours; do not hash megabytes of it
ANY_TOKEN_RECHECK_S = 1.0  # how stale any_exist() may be while no token exists
_LAST_USED_EVERY = timedelta(minutes=1)  # write last_used_at at most this often per token

_USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def check_user_name(name: str) -> str:
    """`name` if it can name a user (and a directory of theirs): letters, digits, `.`, `_`, `-`.

    At most 64 characters, starting with a letter or digit: so no `/`, no `..`, no hidden name.
    Raises ValueError saying what is wrong.
    """
    if not isinstance(name, str) or _USER_NAME.fullmatch(name) is None:
        raise ValueError(
            f"user {name!r}: not a valid user name (1-64 characters: letters, digits, '.', '_', '-'; "
            "starting with a letter or digit)"
        )
    return name


def hash_token(token: str) -> str:
    """The sha256 hex digest of a token: what is stored and compared instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh token: `ff_` and 43 URL-safe characters (256 random bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_expiry(text: str, now: datetime | None = None) -> datetime:
    """When a token given `--expires TEXT` expires: `90m`, `12h`, `30d`, `2w` from now, or a date
    (`2026-12-31`, midnight UTC starting that day) or an ISO time (`2026-12-31T18:00`, UTC unless it
    has an offset). Raises ValueError naming the text and what is valid."""
    now = now or utcnow()
    text = text.strip()
    valid = "valid: a duration like 90m, 12h, 30d, 2w, or a date like 2026-12-31"
    if (m := _DURATION.fullmatch(text)) is not None:
        amount = int(m.group(1))
        if amount == 0:
            raise ValueError(f"--expires {text}: must be more than zero; {valid}")
        try:
            return now + timedelta(**{_UNITS[m.group(2)]: amount})
        except OverflowError:
            raise ValueError(f"--expires {text}: too far in the future") from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--expires {text}: not a duration or date; {valid}") from None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when <= now:
        raise ValueError(f"--expires {text}: already in the past (now is {now:%Y-%m-%d %H:%M} UTC)")
    return when


class Identity(NamedTuple):
    """Who a token belongs to."""

    user: str
    admin: bool


class TokenRecord(BaseModel):
    """One stored token as `list()` shows it: never the token, never its hash."""

    model_config = ConfigDict(from_attributes=True, frozen=True)

    id: int
    user: str
    admin: bool
    prefix: str
    created_at: UTCTime
    expires_at: UTCTime | None = None
    revoked_at: UTCTime | None = None
    last_used_at: UTCTime | None = None

    def status(self, now: datetime | None = None) -> str:
        """`revoked`, `expired` or `active`."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"


def auth_required(env_tokens: bool, tokens: Tokens | None) -> bool:
    """The one rule for whether the API asks for a bearer token: tokens in the environment
    (`env_tokens`, Settings.auth_enabled), or any token ever made in the store, even a revoked or
    expired one, so that revoking the last token never opens the API."""
    return env_tokens or (tokens is not None and tokens.any_exist())


class Tokens:
    """The tokens table of a `Store`, read and written in the store's own transactions."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # The store's own transactions (a writing one takes SQLite's write lock up front).
        self._tx, self._read = store._tx, store._read

    def create(
        self,
        user: str,
        admin: bool = False,
        expires_in: timedelta | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, TokenRecord]:
        """A new token for `user`: (the token, shown this once; its record). Raises ValueError for a bad
        user name or expiry."""
        check_user_name(user)
        if user == "admin" and not admin:  # FOURFOLD_ADMIN_TOKEN's user: a plain token must not own its jobs
            raise ValueError(
                "user 'admin' is the admin token's user; make it an admin token (--admin) or pick another name"
            )
        now = utcnow()
        if expires_in is not None and expires_at is not None:
            raise ValueError("expires_in, expires_at: give one, not both")
        if expires_in is not None:
            if expires_in <= timedelta(0):
                raise ValueError(f"expires_in {expires_in}: must be more than zero")
            expires_at = now + expires_in
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise ValueError(f"expires_at {expires_at}: give a timezone-aware time (UTC)")
            if expires_at <= now:
                raise ValueError(f"expires_at {expires_at:%Y-%m-%d %H:%M}: already in the past")
        token = new_token()
        row = Token(user=user, admin=admin, hash=hash_token(token), prefix=token[:PREFIX_LEN], created_at=now)
        row.expires_at = expires_at
        with self._tx() as session:
            session.add(row)
            session.flush()
            record = TokenRecord.model_validate(row)
        self.store.tokens_seen.any = True
        return token, record

    def list(self) -> list[TokenRecord]:
        """Every token ever made (revoked and expired ones too), oldest first."""
        with self._read() as session:
            return [TokenRecord.model_validate(t) for t in session.scalars(select(Token).order_by(Token.id))]

    def revoke(self, key: int | str) -> TokenRecord:
        """Revoke a token named by its id, its prefix (as `list()` shows it) or the token itself.

        A no-op on a revoked token. Raises KeyError when nothing matches, ValueError when a prefix
        names more than one token."""
        with self._tx() as session:
            if isinstance(key, int) or (key.isascii() and key.isdigit()):
                query = select(Token).where(Token.id == int(key))
            elif len(key) > PREFIX_LEN:
                query = select(Token).where(Token.hash == hash_token(key))
            else:
                query = select(Token).where(Token.prefix == key)
            rows = list(session.scalars(query.with_for_update()))
            if not rows:
                raise KeyError(key)
            if len(rows) > 1:
                ids = ", ".join(str(r.id) for r in rows)
                raise ValueError(f"token {key}: the prefix names tokens {ids}; revoke one by its id")
            row = rows[0]
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return TokenRecord.model_validate(row)

    def authenticate(self, token: str) -> Identity | None:
        """The token's user, or None when it is unknown, revoked or expired. Looked up on every call."""
        row = self._lookup(token)
        if row is None or row.status() != "active":
            return None
        now = utcnow()
        if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY:
            # At most one write a minute per token: most requests stay read-only (no SQLite write lock).
            stale = (Token.last_used_at.is_(None)) | (Token.last_used_at < now - _LAST_USED_EVERY)
            with self._tx() as session:
                session.execute(update(Token).where(Token.id == row.id, stale).values(last_used_at=now))
        return Identity(row.user, row.admin)

    def refusal(self, token: str) -> str | None:
        """Why `authenticate` refuses a token it knows (`revoked` or `expired`); None for an unknown one
        or an active one. For the error message only: the caller holds the token already."""
        row = self._lookup(token)
        if row is None or (status := row.status()) == "active":
            return None
        return status

    def any_exist(self) -> bool:
        """Whether any token was ever made, revoked and expired ones included: then the API wants one.

        Once true it stays true (rows are never deleted), so the store is asked only until then, and
        at most once a second: a token made in this process counts at once, one made by another
        process (`fourfold token create` beside a running service) within a second."""
        seen = self.store.tokens_seen
        if not seen.any and time.monotonic() - seen.checked >= ANY_TOKEN_RECHECK_S:
            seen.any = self.store.scalar(select(Token.id).limit(1)) is not None
            seen.checked = time.monotonic()
        return seen.any

    def _lookup(self, token: str) -> TokenRecord | None:
        if not token or len(token) > _MAX_TOKEN_LEN:
            return None
        digest = hash_token(token)
        with self._read() as session:
            row = session.scalars(select(Token).where(Token.hash == digest)).one_or_none()
            if row is None or not hmac.compare_digest(row.hash, digest):
                return None
            return TokenRecord.model_validate(row)
