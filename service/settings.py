"""The service's settings, from the environment (prefix FOURFOLD_) or arguments.

    FOURFOLD_DATA_DIR=~/.fourfold                  where the SQLite store, pid file and logs live
    DATABASE_URL=postgresql://user@host/db         instead of SQLite under the data directory
    FOURFOLD_TOKENS=alice-token:alice,bob-token:bob   bearer tokens and their users
    FOURFOLD_ADMIN_TOKEN=...                        sees and cancels every job
    FOURFOLD_HOST=127.0.0.1  FOURFOLD_PORT=8000
    FOURFOLD_DATA_ROOTS=/srv/corpora,s3://team-data/text   what jobs may read (default: DATA_DIR/data)
    FOURFOLD_WORKSPACE=/srv/fourfold-ws             users' and jobs' directories (default: DATA_DIR/workspace)
    FOURFOLD_QUOTA_RANKS=64  FOURFOLD_QUOTA_QUEUED=20  FOURFOLD_QUOTA_SUBMITS_PER_MINUTE=30   per user

With no token configured the API has no authentication: every caller is the local admin, so the
server may listen on 127.0.0.1 only.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.db import POOL_SIZE, normalise_url
from service.tokens import Identity, check_user_name, hash_token
from workers.confine import Policy


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error (and any traceback or log of it) must not show a token
    # or DATABASE_URL's password.
    model_config = SettingsConfigDict(env_prefix="FOURFOLD_", extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Path.home() / ".fourfold"
    """SQLite store, pid file, logs."""
    database_url: str | None = Field(None, validation_alias=AliasChoices("DATABASE_URL", "FOURFOLD_DATABASE_URL"))
    """SQLAlchemy URL; default: SQLite in data_dir."""
    tokens: str = ""
    """Comma-separated `token:user` pairs."""
    admin_token: str | None = None
    """A token that sees and cancels every job."""
    host: str = "127.0.0.1"
    port: int = 8000
    poll_s: float = 0.5
    """How often the supervisor looks at queued and running jobs."""
    api_threads: int = Field(4, ge=1, le=POOL_SIZE)
    """Requests that wait on the database in threads at once (FOURFOLD_API_THREADS): on a few cores
    more threads only contend for the interpreter (measured: docs/performance.md); a database far
    across a network may want more. Reads of a local SQLite file run on the event loop instead."""
    data_roots: str = ""
    """Comma-separated local directories or fsspec URLs (s3://bucket/prefix) jobs may read; default:
    data_dir/data. The named corpora (`stdlib`) are always readable."""
    workspace: str | None = None
    """Where each user gets a directory and each job its own (a local directory or fsspec URL);
    default: data_dir/workspace."""
    quota_ranks: int | None = Field(None, ge=1)
    """Most ranks one user's queued and running jobs may hold together (None: no limit)."""
    quota_queued: int | None = Field(None, ge=1)
    """Most jobs one user may have waiting in QUEUED."""
    quota_submits_per_minute: int | None = Field(None, ge=1)
    """Most submissions one user may make in any 60 s."""
    max_steps: int = Field(10_000_000, ge=1)
    """Largest train.steps a submitted job may ask for."""
    max_world_size: int = Field(4096, ge=1)
    """Largest number of ranks (dp x tp x pp x cp) a submitted job may ask for."""
    spares: int = Field(0, ge=0, le=64)
    """Warm spare processes for every job whose spec does not set restart.spares (docs/fault-tolerance.md)."""
    accelerator: str | None = Field(None, max_length=64)
    """The GPU the cluster's nodes have (h100-80gb, a100-80gb, ...), for the layout planner: Ray does not
    say which. A spec's plan.accelerator overrides it; CPU nodes are measured instead."""

    @field_validator("tokens")
    @classmethod
    def _token_pairs(cls, tokens: str) -> str:
        # The messages name the entry by its place, never by any part of the token.
        for n, pair in enumerate(filter(None, (p.strip() for p in tokens.split(","))), 1):
            token, sep, user = pair.rpartition(":")
            if not sep or not token.strip() or not user.strip():
                raise ValueError(f"entry {n}: not token:user (FOURFOLD_TOKENS=token:user,token:user)")
            try:
                check_user_name(user.strip())
            except ValueError as err:
                raise ValueError(f"entry {n}: {err}") from None
        return tokens

    def storage_policy(self) -> Policy:
        """Where jobs submitted to the service may read and write (workers.confine)."""
        reserved = [str(self.data_dir)]
        url = normalise_url(self.db_url)
        if url.get_backend_name() == "sqlite" and url.database and not url.database.startswith("file:"):
            reserved.append(url.database)
        roots = [r for r in self.data_roots.split(",") if r.strip()] or [str(self.data_dir / "data")]
        return Policy(tuple(roots), self.workspace or str(self.data_dir / "workspace"), tuple(reserved))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fourfold.db'}"

    def token_users(self) -> dict[str, str]:
        """token -> user; the admin token maps to `admin`. Not for checking a token: `authenticate` is."""
        users = {}
        for pair in filter(None, (p.strip() for p in self.tokens.split(","))):
            token, _, user = pair.rpartition(":")
            users[token.strip()] = user.strip()
        if self.admin_token:
            users[self.admin_token] = "admin"
        return users

    def authenticate(self, token: str) -> Identity | None:
        """The user of an environment token (FOURFOLD_TOKENS, FOURFOLD_ADMIN_TOKEN), else None.

        Constant time: both sides are hashed, and every configured token is compared with
        `hmac.compare_digest`, without stopping at a match, so the time taken says nothing of how
        much of a token was right or which one matched."""
        presented = hash_token(token)
        candidates = [(t, Identity(u, admin=False)) for t, u in self.token_users().items() if t != self.admin_token]
        if self.admin_token:
            candidates.append((self.admin_token, Identity("admin", admin=True)))
        found = None
        for candidate, identity in candidates:
            match = hmac.compare_digest(hash_token(candidate), presented)
            found = identity if match else found
        return found

    @property
    def auth_enabled(self) -> bool:
        """Whether environment tokens are configured; tokens in the store also turn authentication on
        (the API and `fourfold up` ask `service.tokens.Tokens.any_exist` as well)."""
        return bool(self.token_users())
