"""Shared dependencies of the routes: the store, the caller, the supervisor's metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store
from service.tokens import Tokens, auth_required

_bearer = HTTPBearer(auto_error=False)


@dataclass(frozen=True)
class Caller:
    user: str
    admin: bool

    @property
    def owner_filter(self) -> str | None:
        """None for an admin (sees every job), else the caller's own name."""
        return None if self.admin else self.user


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


def get_tokens(request: Request) -> Tokens:
    """The store's tokens table (made once per store and kept on the app; it caches no token)."""
    store = get_store(request)
    tokens = getattr(request.app.state, "tokens", None)
    if tokens is None or tokens.store is not store:
        tokens = request.app.state.tokens = Tokens(store)
    return tokens


def get_caller(
    settings: Annotated[Settings, Depends(get_settings)],
    tokens: Annotated[Tokens, Depends(get_tokens)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The bearer token's user (never from the URL: the browser's event stream uses a ticket, api/tickets.py)."""
    token = credentials.credentials if credentials is not None else None
    # Environment tokens first (constant time, no query), then the store's, looked up on every request
    # so that a revocation counts from the next one.
    if token and ((who := settings.authenticate(token)) or (who := tokens.authenticate(token))):
        return Caller(who.user, admin=who.admin)
    # Any token in the store, even a revoked or expired one, keeps authentication on.
    if not auth_required(settings.auth_enabled, tokens):
        return Caller("local", admin=True)  # no tokens at all: `fourfold up` listens on 127.0.0.1 only
    refused = tokens.refusal(token) if token else None
    message = f"bearer token {refused}" if refused else "missing or unknown bearer token"
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        f"{message} (send Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": "Bearer"},
    )


StoreDep = Annotated[Store, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CallerDep = Annotated[Caller, Depends(get_caller)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
