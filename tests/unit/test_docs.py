"""The docs stay true to the code: the config reference is generated from the schema and checked in."""

from pathlib import Path

import pytest

from parallel.config_doc import render_reference, sections, yaml_key

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
REGENERATE = "python -m parallel.config_doc --write docs/configuration.md"


def test_configuration_reference_is_current() -> None:
    assert REFERENCE.exists(), f"docs/configuration.md is missing; generate it with `{REGENERATE}`"
    assert REFERENCE.read_text() == render_reference(), (
        f"docs/configuration.md is stale (parallel/config.py changed); regenerate it with `{REGENERATE}`"
    )


# (YAML key, section, attribute name); the top level's section fields are the sections themselves.
FIELDS = {
    (f"{section}.{yaml_key(name, field)}" if section else name): (section, name)
    for section, model in sections().items()
    for name, field in model.model_fields.items()
    if section or name not in sections()
}


@pytest.mark.parametrize("key", FIELDS)
def test_every_field_is_documented(key: str) -> None:
    docs = REFERENCE.read_text() + (ROOT / "README.md").read_text()
    assert f"`{key}`" in docs, f"config field {key} appears in neither README.md nor docs/configuration.md"


@pytest.mark.parametrize("key", FIELDS)
def test_every_field_has_a_docstring(key: str) -> None:
    section, name = FIELDS[key]
    field = sections()[section].model_fields[name]
    assert field.description, f"{key} has no docstring in parallel/config.py; the reference takes it from there"


def test_readme_sections_are_known() -> None:
    """The README summarises every section of the schema."""
    readme = (ROOT / "README.md").read_text()
    for section in sections():
        if section:
            assert f"`{section}`" in readme, f"README.md does not summarise the `{section}` section"


def test_accelerator_table_matches_flops() -> None:
    from parallel.flops import ACCELERATORS

    text = (ROOT / "docs" / "metrics.md").read_text()

    def cell(value: float | None) -> str:
        return "—" if value is None else str(value)

    for a in ACCELERATORS:
        row = f"| {a.name} | {cell(a.bf16)} | {cell(a.fp16)} | {cell(a.tf32)} | {cell(a.fp32)} |"
        assert row in text, f"docs/metrics.md's peak table is out of date for {a.name}: expected {row!r}"


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_is_valid(example: Path) -> None:
    from parallel.spec_files import load_config

    cfg = load_config(example)
    assert cfg.name
