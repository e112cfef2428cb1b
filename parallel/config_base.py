"""What every config section shares: the error a user mistake becomes, and the pydantic base class
(unknown keys refused, assignments validated, field docstrings kept for docs/configuration.md)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user mistake in the config: one line, naming the field and what is valid."""


class Section(BaseModel):
    # allow_inf_nan: a YAML `.inf` or a JSON `Infinity` is never a valid setting.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, use_attribute_docstrings=True, allow_inf_nan=False
    )
