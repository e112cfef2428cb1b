"""What every `fourfold` command shares: the Typer `app` the commands are added to, `fail` (the one
way a command reports a user mistake), the service's settings, and `call` (its HTTP API).

    @app.command()
    def cancel(job_id: str) -> None:
        j = call("POST", f"/v1/jobs/{job_id}/cancel")   # a 404 or 409: one line on stderr, exit code 2
        typer.echo(f"{j['id']}  {j['state']}")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import typer

if TYPE_CHECKING:
    from service.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="fourfold: distributed LLM training.")


def fail(message: str) -> typer.Exit:
    """Print `fourfold: error: <message>` on stderr and hand back the exit (code 2) for the caller
    to raise: `raise fail(...) from None` ends a command without a traceback."""
    typer.echo(f"fourfold: error: {message}", err=True)
    return typer.Exit(2)


def settings_or_fail(host: str | None = None, port: int | None = None, data_dir: Path | None = None) -> Settings:
    """The service's settings from the environment and the options given (None: not given), or one
    line naming the bad field."""
    from pydantic import ValidationError

    from service.settings import Settings

    given = {"host": host, "port": port, "data_dir": data_dir}
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise fail(f"settings: {'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None


def service_url() -> str:
    return os.environ.get("FOURFOLD_URL", "http://127.0.0.1:8000").rstrip("/")


def call(method: str, path: str, **kw: Any) -> Any:
    """One request to the service's API (FOURFOLD_URL, bearer FOURFOLD_TOKEN when set) and its JSON
    answer; an error status, or no answer at all, is a `fail` with the server's own `detail`."""
    token = os.environ.get("FOURFOLD_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with httpx.Client(base_url=service_url(), headers=headers, timeout=30) as client:
            r = client.request(method, path, **kw)
    except httpx.HTTPError as err:
        raise fail(f"cannot reach the service at {service_url()} ({err}); start it with `fourfold up`") from None
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail", r.text)
        except ValueError:
            detail = r.text
        if isinstance(detail, list):  # FastAPI's validation errors: say field and reason, not JSON
            detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        raise fail(f"{r.status_code}: {detail if isinstance(detail, str) else json.dumps(detail)}")
    return r.json()
