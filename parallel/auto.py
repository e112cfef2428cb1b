"""`auto` in a job spec: the layout fields a spec may leave to the planner, and `expand_auto`, which
moves them into `plan.auto` before the config is validated (parallel/config.py's `Config` calls it;
the service plans them, service/planning.py). Plain data in, plain data out.
"""

from __future__ import annotations

from typing import Any

AUTO = "auto"
AUTO_FIELDS: dict[str, tuple[str, ...]] = {
    "parallel": ("dp", "tp", "pp", "cp", "zero", "dp_replicate", "ep", "pp_schedule", "activation_checkpointing"),
    "train": ("micro_batch",),
}
"""The layout fields a spec may leave to the planner by writing `auto` (`parallel: auto` is every one)."""


def expand_auto(data: Any) -> Any:
    """A spec's `auto` values moved into plan.auto (the fields keep their defaults until the planner
    fills them; an auto micro_batch is 1 meanwhile, which every global batch takes). An auto axis with
    dp unset leaves dp to the planner too: an unset dp is whatever the other axes leave of the world."""
    if not isinstance(data, dict):
        return data
    out, auto = dict(data), []
    if out.get("parallel") == AUTO:
        out["parallel"] = {}
        auto += AUTO_FIELDS["parallel"]
        train = out.get("train")
        if not (isinstance(train, dict) and "micro_batch" in train):
            auto.append("micro_batch")
    for section, fields in AUTO_FIELDS.items():
        part = out.get(section)
        if isinstance(part, dict) and any(part.get(f) == AUTO for f in fields):
            auto += [f for f in fields if part.get(f) == AUTO]
            out[section] = {k: v for k, v in part.items() if not (k in fields and v == AUTO)}
    if not auto:
        return data
    par = out.get("parallel")
    if any(a in auto for a in ("tp", "pp", "cp")) and not (isinstance(par, dict) and "dp" in par):
        auto.append("dp")  # an unset dp fills whatever the others leave of the world, as it does without auto
    train = out.get("train", {})
    if "micro_batch" in auto and isinstance(train, dict):  # not a mapping: the validation refuses it
        out["train"] = {**train, "micro_batch": 1}
    plan = out.get("plan", {})
    if isinstance(plan, dict) and isinstance(plan.get("auto", []), list):  # else the validation refuses it
        given = plan.get("auto", [])  # kept whole, so that the validation sees any item it refuses
        order = (*AUTO_FIELDS["parallel"], *AUTO_FIELDS["train"])
        out["plan"] = {**plan, "auto": [*given, *(f for f in order if f in auto and f not in given)]}
    return out
