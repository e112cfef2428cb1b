"""Shared dependencies of the routes: the store, the caller, the supervisor's metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.metrics import ServiceMetrics
from service.settings import Settings
from service.store import Store

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


def get_caller(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[str | None, Query(include_in_schema=False)] = None,
) -> Caller:
    """The bearer token's user; `?access_token=` serves the browser's EventSource, which cannot set headers."""
    users = settings.token_users()
    if not users:  # no tokens configured: the server listens on 127.0.0.1 only, caller is local admin
        return Caller("local", admin=True)
    token = credentials.credentials if credentials is not None else access_token
    if token is None or token not in users:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or unknown bearer token (send Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Caller(users[token], admin=token == settings.admin_token)


StoreDep = Annotated[Store, Depends(get_store)]
CallerDep = Annotated[Caller, Depends(get_caller)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
