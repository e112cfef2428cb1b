"""The `fourfold` command (the console script `fourfold = "api.cli:main"`, or `python -m api.cli`).

    fourfold train --config job.yaml [--set section.key=value ...] [--nproc-per-node N] [--resume auto|PATH]
    fourfold ckpt ls runs/x/ckpt
    fourfold ckpt export runs/x/ckpt/step-00000010 --hf runs/x/hf
    fourfold plan --config job.yaml --cluster 8x8xh100-80gb [--set section.key=value ...] [--top N] [--json]
    fourfold up [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--detach];  fourfold down
    fourfold submit job.yaml;  fourfold jobs;  fourfold status ID;  fourfold logs ID --follow;  fourfold cancel ID
    fourfold token create USER [--admin] [--expires 30d];  fourfold token list;  fourfold token revoke ID

The service commands talk to FOURFOLD_URL (default http://127.0.0.1:8000) with the bearer
token FOURFOLD_TOKEN when set.

A user mistake (a missing path, an incomplete checkpoint) ends with one line on
stderr and exit code 2, never a traceback (`raise fail(...)`, api/cli/common.py).

Each module adds its commands to the one `app` as it is imported:

    common.py    the Typer app, `fail`, the service's settings, `call` (its HTTP API)
    engine.py    train, ckpt ls, ckpt export: the engine on this machine, no service
    plan.py      plan: the layout planner's ranking for a job on a cluster (or the live Ray cluster)
    service.py   up, down, submit, jobs, status, cancel, logs
    tokens.py    token create, token list, token revoke: the store's tokens, opened directly
"""

from __future__ import annotations

from api.cli import engine, plan, service, tokens  # noqa: F401  (imported for their commands, in this order)
from api.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="fourfold")
