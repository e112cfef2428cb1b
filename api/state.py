"""What the app keeps on `app.state`, typed: every route and dependency reads it through `of(app)`.

    state = of(request.app)
    state.store.get_job(job_id)

Starlette's `app.state` takes any attribute and types none; this Protocol names the ones fourfold
sets (`api.app.create_app` and its lifespan), so a typo or a wrong type is a checker's error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, cast

from fastapi import FastAPI

if TYPE_CHECKING:
    from api.tickets import TicketBook
    from service.metrics import ServiceMetrics
    from service.settings import Settings
    from service.store import Store
    from service.supervisor import Supervisor
    from service.tokens import Tokens


class AppState(Protocol):
    settings: Settings
    metrics: ServiceMetrics
    tickets: TicketBook  # the event streams' one-time tickets
    store: Store  # from the lifespan's start
    supervisor: Supervisor | None  # None for the API alone (jobs are stored, none runs)
    tokens: Tokens | None  # the store's tokens table, made on first use


def of(app: FastAPI) -> AppState:
    return cast("AppState", app.state)
