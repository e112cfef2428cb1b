"""Job spec files: YAML read as JSON reads it, `--set section.key=value` overrides, and `load_config`,
which reads a spec file, applies the overrides and validates the result (parallel/config.py).

    python -c "from parallel.spec_files import load_config; print(load_config('examples/tiny.yaml'))"
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from parallel.config import Config, ConfigError, build_config


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML's safe loader, but `1e-3` is a float as in YAML 1.2 and JSON (YAML 1.1 wants `1.0e-3`)."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str) -> Any:
    """YAML text as plain data (safe: no Python objects); `1e-3` reads as a number."""
    return yaml.load(text, Loader=_Yaml12Floats)  # noqa: S506 (a SafeLoader)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (values parsed as YAML) to a config dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None, world_size: int | None = None) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise ConfigError(f"--config {path}: cannot read ({err.strerror})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config {path}: not valid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--config {path}: expected a mapping of sections, got {type(data).__name__}")
    return build_config(apply_overrides(data, overrides or []), world_size)
