"""The service's settings, from the environment (prefix FOURFOLD_) or arguments.

    FOURFOLD_DATA_DIR=~/.fourfold                  where the SQLite store, pid file and logs live
    DATABASE_URL=postgresql://user@host/db         instead of SQLite under the data directory
    FOURFOLD_TOKENS=alice-token:alice,bob-token:bob   bearer tokens and their users
    FOURFOLD_ADMIN_TOKEN=...                        sees and cancels every job
    FOURFOLD_HOST=127.0.0.1  FOURFOLD_PORT=8000

With no token configured the API has no authentication: every caller is the local admin, so the
server may listen on 127.0.0.1 only.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FOURFOLD_", extra="ignore")

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

    @field_validator("tokens")
    @classmethod
    def _token_pairs(cls, tokens: str) -> str:
        for pair in filter(None, (p.strip() for p in tokens.split(","))):
            token, sep, user = pair.partition(":")
            if not sep or not token or not user:
                raise ValueError(f"{pair[:4]}...: not token:user (FOURFOLD_TOKENS=token:user,token:user)")
        return tokens

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fourfold.db'}"

    def token_users(self) -> dict[str, str]:
        """token -> user; the admin token maps to `admin`."""
        users = {}
        for pair in filter(None, (p.strip() for p in self.tokens.split(","))):
            token, _, user = pair.partition(":")
            users[token] = user
        if self.admin_token:
            users[self.admin_token] = "admin"
        return users

    @property
    def auth_enabled(self) -> bool:
        return bool(self.token_users())
