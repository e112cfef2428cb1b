"""`fourfold train` and `fourfold ckpt ls/export`: the engine and its checkpoints on this machine,
without the service.

    fourfold train --config job.yaml --set train.steps=20
    fourfold ckpt ls runs/x/ckpt
    fourfold ckpt export runs/x/ckpt/step-00000010 --hf runs/x/hf
"""

from __future__ import annotations

import datetime
from typing import Annotated

import typer

from api.cli.common import app, fail

ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect and convert checkpoints.")
app.add_typer(ckpt_app, name="ckpt")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def train(ctx: typer.Context) -> None:
    """Train with the engine; the options are those of `python -m parallel.train --help`."""
    from parallel.train import exit_with, main

    exit_with(main(list(ctx.args)))


@ckpt_app.command("ls")
def ckpt_ls(path: Annotated[str, typer.Argument(help="checkpoint.dir: a local path or fsspec URL")]) -> None:
    """List the checkpoints under PATH: step, time, size, layout, complete or not."""
    from parallel.checkpoint import list_checkpoints

    found = list_checkpoints(path)
    if not found:
        raise fail(f"{path}: no checkpoints there (looked for step-N directories)")
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
    from parallel.config import ConfigError
    from parallel.hf import export_hf

    try:
        path = pick(path)
        weights, cfg = load_full_weights(path)
    except CheckpointError as err:
        raise fail(str(err)) from None
    try:
        out = export_hf(weights, cfg.model, hf)
    except ConfigError as err:
        raise fail(f"{path}: {err}") from None
    except OSError as err:
        raise fail(f"--hf {hf}: cannot write there ({err.strerror or err})") from None
    n = sum(w.numel() for w in weights.values())
    typer.echo(f"exported {path} ({n:,} parameters) to {out}")


def _size(n: float) -> str:
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
