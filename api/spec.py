"""Reading a job spec out of a request: the body (at most `MAX_BODY`), JSON or YAML, checked by the
engine's own config and by the operator's limits. Every refusal is a 413 or a 422 naming the field.

    raw = await read_body(request)
    spec, priority = parse_spec(raw, request.headers.get("content-type", ""))
    check_limits(spec, settings)
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import yaml
from fastapi import HTTPException, Request, status

from api.errors import unprocessable
from parallel.config import ConfigError, build_config
from parallel.spec_files import read_yaml
from service.planning import PlanInputError, at_submit
from service.quota import world_size
from service.settings import Settings

if TYPE_CHECKING:
    from service.supervisor import Supervisor

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")
MAX_BODY = 1 << 20  # a job spec is a few hundred bytes; a megabyte is a mistake
DEFAULT_DIR = "."  # checkpoint.dir left out: the job's own directory (relative paths start there)


async def read_body(request: Request) -> bytes:
    """The request body, refused (413) as soon as it passes MAX_BODY: a declared Content-Length
    over it is refused before anything is read, and a longer stream is cut off."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise _too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise _too_large(f"over {MAX_BODY}")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_spec(raw: bytes, content_type: str, spares: int = 0) -> tuple[dict[str, Any], int]:
    """The body as a validated engine spec (normalised, defaults filled) and its priority. A spec
    that leaves checkpoint.dir out gets `checkpoint.dir: DEFAULT_DIR` (the job's own directory, once
    confined); one that sets it to null has no checkpoints. One that leaves restart.spares out gets
    `spares` (the service's FOURFOLD_SPARES)."""
    if len(raw) > MAX_BODY:
        raise _too_large(len(raw))
    if not raw.strip():
        raise unprocessable("body: empty; send a job spec as JSON, or as YAML with Content-Type: application/yaml")
    is_yaml = content_type.split(";")[0].strip() in YAML_TYPES
    try:
        data = read_yaml(raw.decode()) if is_yaml else json.loads(raw, parse_constant=_no_constant)
    except (ValueError, yaml.YAMLError) as err:
        hint = "" if is_yaml else "; for YAML send Content-Type: application/yaml"
        raise unprocessable(
            f"body: not valid {'YAML' if is_yaml else 'JSON'} ({str(err).splitlines()[0]}){hint}"
        ) from None
    except RecursionError:
        raise unprocessable("body: nested too deeply to be a job spec") from None
    if not isinstance(data, dict):
        raise unprocessable("body: a job spec must be a mapping of sections (model, parallel, train, ...)")
    if (where := _nul_at(data)) is not None:
        raise unprocessable(f"{where}: contains a NUL character")
    priority = data.pop("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or not -1000 <= priority <= 1000:
        raise unprocessable(f"priority: must be an integer from -1000 to 1000 (got {priority!r})")
    section, restart = data.get("checkpoint"), data.get("restart")
    default_dir = not (isinstance(section, dict) and "dir" in section)
    default_spares = not (isinstance(restart, dict) and "spares" in restart)
    try:
        cfg = build_config(data, strict=True)  # the types its schema (/openapi.json) says
    except ConfigError as err:
        raise unprocessable(str(err)) from None
    spec = cfg.model_dump(mode="json", by_alias=True)
    if default_dir:
        spec["checkpoint"]["dir"] = DEFAULT_DIR
    if default_spares:
        spec["restart"]["spares"] = spares
    return spec, priority


def check_limits(spec: dict[str, Any], settings: Settings) -> None:
    """The operator's bounds on a spec's size (422 naming the field)."""
    steps = spec["train"]["steps"]
    if steps > settings.max_steps:
        raise unprocessable(f"train.steps={steps}: at most {settings.max_steps} on this service")
    if (ranks := world_size(spec)) > settings.max_world_size and spec.get("plan", {}).get("auto"):
        raise unprocessable(f"plan.ranks={ranks}: at most {settings.max_world_size} on this service")
    if ranks > settings.max_world_size:
        p = spec["parallel"]
        raise unprocessable(
            f"parallel: dp*tp*pp*cp = {p['dp']}*{p['tp']}*{p['pp']}*{p['cp']} = {ranks} ranks; "
            f"at most {settings.max_world_size} on this service"
        )


def plan_at_submit(spec: dict[str, Any], settings: Settings, supervisor: Supervisor | None) -> tuple[dict, list[str]]:
    """`service.planning.at_submit` on the live cluster: plan.ranks filled for an auto layout, a layout
    predicted not to fit refused (422 with the memory breakdown). Returns the spec and notes for the log."""
    total = supervisor.free_resources()[1] if supervisor is not None else None
    try:
        cfg, notes = at_submit(build_config(spec), total, settings.accelerator, settings.max_world_size)
    except PlanInputError as err:
        raise unprocessable(str(err)) from None
    return cfg.model_dump(mode="json", by_alias=True), notes


def _too_large(size: int | str) -> HTTPException:
    return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body: {size} bytes; a job spec is under 1 MiB")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number a job spec can hold")


def _nul_at(data: Any, path: str = "") -> str | None:
    """The field holding a NUL character (no database stores one in text), or None."""
    if isinstance(data, str):
        return path or "body" if "\x00" in data else None
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        if isinstance(key, str) and "\x00" in key:
            return f"{path}.{key}".strip(".")
        if (found := _nul_at(value, f"{path}.{key}".strip("."))) is not None:
            return found
    return None
