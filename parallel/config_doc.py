"""Render the Markdown configuration reference from the pydantic schema in parallel/config.py.

The field tables come from the schema itself (type, constraints, default and the docstring under
each field), so the reference cannot drift from the code; tests/unit/test_docs.py fails when
docs/configuration.md is stale.

    python -m parallel.config_doc                                 # print it
    python -m parallel.config_doc --write docs/configuration.md   # regenerate the checked-in copy
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from parallel.config import PRESETS, Config
from parallel.moe_config import MOE_PRESETS, MoEConfig

MOE_COLUMNS = ("n_experts", "top_k", "expert_ffn_dim", "n_shared_experts", "first_dense")

# One sentence per section, shown above its table. Everything else comes from the schema.
SECTION_INTROS: dict[str, str] = {
    "model": (
        "The Llama-style decoder. Pick a `preset`; a dimension left `null` comes from the preset, one given "
        "explicitly overrides it. With `preset: null` every dimension is required."
    ),
    "parallel": (
        "The layout: how the world of `dp * tp * pp * cp` ranks is split. "
        "See [parallelism.md](parallelism.md) for what each axis does."
    ),
    "train": "Batch, sequence, optimizer (AdamW) and learning-rate schedule (linear warm-up, cosine decay).",
    "data": "Where tokens come from. Samples are addressed by a global index, so every layout sees the same batches.",
    "metrics": "How throughput and MFU are measured and printed. See [metrics.md](metrics.md).",
    "checkpoint": (
        "Saving and resuming with `torch.distributed.checkpoint`; a checkpoint loads at any layout. "
        "See [checkpoints.md](checkpoints.md)."
    ),
    "resources": "What each rank takes on a Ray cluster. The engine ignores it; `python -m workers.run` reads it.",
    "restart": "How the service restarts a failed job. The engine and the Ray launcher accept it and ignore it.",
}

CROSS_FIELD_CHECKS = (
    "`parallel.tp` divides `model.n_heads`, `model.n_kv_heads`, `model.vocab_size` and `model.ffn_dim`.",
    "`model.n_kv_heads` divides `model.n_heads`, `model.n_heads` divides `model.dim`, and the head dimension "
    "is even (RoPE).",
    "`parallel.dp_replicate` divides `parallel.dp`, and `dp_replicate > 1` (hybrid sharding) needs "
    "`parallel.zero` in 1-3.",
    "`train.global_batch` is a multiple of `parallel.dp * train.micro_batch`; the quotient is the number of "
    "gradient-accumulation micro-batches per step.",
    "`train.seq_len` is a multiple of `parallel.tp` (sequence parallelism), and of `2 * cp * tp` when `cp > 1`.",
    "`parallel.microbatches`, when set, equals the gradient-accumulation count "
    "`global_batch / (dp * micro_batch)`; `parallel.pp_virtual` is 1 unless `pp > 1`.",
    "With `parallel.pp > 1`: `model.n_layers` is at least `pp * pp_virtual` (one layer per stage); `gpipe` and "
    "`1f1b` take `pp_virtual: 1`, `interleaved_1f1b` at least 2, `zbv` exactly 2 (an unset `pp_virtual` is 2 "
    "with `zbv`; an unset `pp_schedule` is `interleaved_1f1b` when `pp_virtual >= 3`); the micro-batch count must "
    "be at least `pp` for `1f1b` and `interleaved_1f1b` and `2 * pp - 1` for `zbv` (and for `interleaved_1f1b` "
    "a multiple of `max(1, microbatches // pp)`).",
    "`data.path` is required for `data.source` `text` and `tokens`; the data is opened and checked before any "
    "process group exists.",
    "With `model.moe`: `top_k` is at most `n_experts`, at least one block is an MoE block, and (so far) "
    "`parallel.tp` and `parallel.cp` are 1, `train.compile` is off, `model.init_from` and `plan.auto` unset.",
    "`dp * tp * pp * cp` equals the number of processes launched; an unset `parallel.dp` is taken as "
    "`world size / (tp * pp * cp)` when that divides.",
)

# Numeric bounds from Field(gt=..., ...): pydantic keeps each as a metadata object with that attribute.
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _scalar(value: Any) -> str:
    """A value as it would be written in YAML."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _type_name(annotation: Any) -> str:
    """`int`, `float or null`, one of `a`, `b` ... for the annotations the config uses."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(f"`{_scalar(v)}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if len(named) < len(args) else "")
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _constraints(field: FieldInfo) -> str:
    parts = []
    for meta in field.metadata:
        for attr, symbol in _BOUNDS:
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {_scalar(value)}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return "(section)"
    if field.is_required():
        return "(required)"
    return f"`{_scalar(field.default)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _field_table(prefix: str, model: type[BaseModel]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if _section_type(field) is not None:
            continue  # a nested section gets its own heading
        kind = _type_name(field.annotation)
        bounds = _constraints(field)
        if bounds:
            kind += f", {bounds}"
        key = f"{prefix}.{yaml_key(name, field)}" if prefix else yaml_key(name, field)
        lines.append(f"| `{key}` | {_cell(kind)} | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return lines


def yaml_key(name: str, field: FieldInfo) -> str:
    """The key written in YAML and --set: the alias when the attribute name differs (`async_` -> `async`)."""
    return field.alias or name


def _section_type(field: FieldInfo) -> type[BaseModel] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def sections() -> dict[str, type[BaseModel]]:
    """Section name -> its pydantic model, in schema order; "" is the top level of the spec."""
    out: dict[str, type[BaseModel]] = {"": Config}
    for name, field in Config.model_fields.items():
        section = _section_type(field)
        if section is not None:
            out[name] = section
    return out


def _preset_table() -> list[str]:
    columns = ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size", "rope_theta"]
    lines = ["| preset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for preset, dims in PRESETS.items():
        values = [_scalar(dims.get(c, 10000.0 if c == "rope_theta" else None)) for c in columns]
        lines.append(f"| `{preset}` | " + " | ".join(values) + " |")
    return lines


def render_reference() -> str:
    """The whole configuration reference as Markdown."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m parallel.config_doc --write docs/configuration.md` from parallel/config.py;",
        "     do not edit by hand: change the field docstrings and regenerate. -->",
        "",
        "A job spec is YAML with the sections below. Every field has a default, so an empty file is a valid",
        "(tiny, synthetic-data) job. Any field can be overridden on the command line with",
        "`--set section.key=value`, the value parsed as YAML:",
        "",
        "```bash",
        "python -m parallel.train --config examples/tiny.yaml --set parallel.zero=2 --set train.lr=1e-3",
        "```",
        "",
        "Unknown sections or fields are errors. Every mistake is reported as one line naming the field, the",
        "value and what would be valid, with exit code 2, before any process group exists.",
        "",
    ]
    for name, model in sections().items():
        out += [f"## `{name}`" if name else "## Top level", ""]
        if name in SECTION_INTROS:
            out += [SECTION_INTROS[name], ""]
        out += _field_table(name, model)
        out.append("")
        if name == "model":
            out += [
                "### Presets",
                "",
                "Llama-3-style dimensions; `rope_theta` is 10000 unless listed otherwise.",
                "",
                *_preset_table(),
                "",
                "### `model.moe`",
                "",
                "Mixture of experts ([parallelism.md](parallelism.md#mixture-of-experts)). Set by the MoE presets, "
                "whose experts are below; any field given here overrides the preset's.",
                "",
                *_field_table("model.moe", MoEConfig),
                "",
                "| preset | " + " | ".join(MOE_COLUMNS) + " |",
                "|---" * (len(MOE_COLUMNS) + 1) + "|",
                *(
                    f"| `{k}` | " + " | ".join(_scalar(v.get(c, "")) for c in MOE_COLUMNS) + " |"
                    for k, v in MOE_PRESETS.items()
                ),
                "",
            ]
    out += ["## Checks across fields", "", "Made by `check()` in parallel/config.py before any process group exists:"]
    out += [""]
    out += [*(f"- {line}" for line in CROSS_FIELD_CHECKS), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel.config_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the reference to PATH instead of printing it")
    args = parser.parse_args(argv)
    text = render_reference()
    if args.write:
        path = Path(args.write)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
