"""The `fourfold` command.

    fourfold train --config job.yaml [--set section.key=value ...] [--nproc-per-node N] [--resume auto|PATH]
    fourfold ckpt ls runs/x/ckpt
    fourfold ckpt export runs/x/ckpt/step-00000010 --hf runs/x/hf
    fourfold up [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--detach];  fourfold down
    fourfold submit job.yaml;  fourfold jobs;  fourfold status ID;  fourfold logs ID --follow;  fourfold cancel ID
    fourfold token create USER [--admin] [--expires 30d];  fourfold token list;  fourfold token revoke ID

The service commands talk to FOURFOLD_URL (default http://127.0.0.1:8000) with the bearer
token FOURFOLD_TOKEN when set.

A user mistake (a missing path, an incomplete checkpoint) ends with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import datetime
import sys
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="fourfold: distributed LLM training.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and convert checkpoints.")
app.add_typer(ckpt_app, name="ckpt")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"fourfold: error: {message}", err=True)
    return typer.Exit(2)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train with the engine; the options are those of `python -m parallel.train --help`."""
    from parallel.train import exit_with, main

    exit_with(main(list(ctx.args)))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _layout(meta: dict) -> str:
    lay = meta.get("layout")
    if not lay:
        return "-"
    return " ".join(f"{axis}{lay[axis]}" for axis in ("dp", "tp", "pp", "cp", "zero"))


@ckpt_app.command("ls")
def ckpt_ls(path: Annotated[str, typer.Argument(help="checkpoint.dir: a local path or fsspec URL")]) -> None:
    """List the checkpoints under PATH: step, time, size, layout, complete or not."""
    from parallel.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    if not found:
        raise _fail(f"{path}: no checkpoints there (looked for step-N directories)")
    typer.echo(f"{'STEP':>8}  {'TIME (UTC)':<19}  {'SIZE':>10}  {'LAYOUT':<24}  STATUS")
    for c in found:
        when = c.meta.get("time")
        stamp = datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if when else "-"
        status = "complete" if c.complete else "incomplete"
        typer.echo(f"{c.step:>8}  {stamp:<19}  {_size(c.size_bytes):>10}  {_layout(c.meta):<24}  {status}")


@ckpt_app.command("export")
def ckpt_export(
    path: Annotated[str, typer.Argument(help="a checkpoint (step-N directory), or checkpoint.dir for its newest")],
    hf: Annotated[str, typer.Option("--hf", help="write a Hugging Face Llama directory here")],
) -> None:
    """Export a checkpoint's weights as a Hugging Face Llama directory (config.json + safetensors)."""
    from parallel.checkpoint import CheckpointError, load_full_weights, pick
    from parallel.hf import export_hf

    try:
        path = pick(path)
        weights, cfg = load_full_weights(path)
    except CheckpointError as err:
        raise _fail(str(err)) from None
    try:
        out = export_hf(weights, cfg.model, hf)
    except OSError as err:
        raise _fail(f"--hf {hf}: cannot write there ({err.strerror or err})") from None
    n = sum(w.numel() for w in weights.values())
    typer.echo(f"exported {path} ({n:,} parameters) to {out}")


from api import cli_service  # noqa: E402  (registers up, down, submit, jobs, status, logs, cancel)

cli_service.register(app, _fail)

from api import cli_tokens  # noqa: E402  (registers token create, list, revoke)

cli_tokens.register(app, _fail)


def main() -> None:
    app(prog_name="fourfold")


if __name__ == "__main__":
    sys.exit(main())
