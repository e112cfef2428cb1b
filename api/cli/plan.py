"""`fourfold plan`: the layout planner (parallel/planner/, docs/planner.md) from the command line.

    fourfold plan --config job.yaml --cluster 8x8xh100-80gb [--set section.key=value ...] [--top 10] [--json]
    fourfold plan --config job.yaml --ray [--accelerator h100-80gb]     # RAY_ADDRESS's cluster, or a local one

Prints the ranked layouts (predicted peak memory per rank, step time, tokens/s, MFU, bottleneck), an
itemised memory breakdown and the reasons for the best three, and the fewest accelerators on which the
job fits at all. Exit codes: 0 some layout fits, 1 none does (the nearest misses are shown), 2 bad input
(one line on stderr).

On CPU a node's ranks share its memory: each rank's capacity is the node's physical memory divided by
the ranks on the node, and the matmul peak is measured here (`--cpu-tflops` gives it instead).
"""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api.cli.common import app, fail

if TYPE_CHECKING:
    from parallel.config import ResourcesConfig
    from parallel.planner import Candidate, Cluster

DETAILED = 3
"""Candidates whose memory breakdown and reasons are printed."""


@app.command()
def plan(
    config: Annotated[str | None, typer.Option("--config", help="YAML job spec (default: the defaults)")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", metavar="SECTION.KEY=VALUE", help="override a config field")
    ] = None,
    cluster: Annotated[
        str | None,
        typer.Option(help="NODESxPER_NODExACCELERATOR (8x8xh100-80gb), PER_NODExACCELERATOR (4xcpu), or ACCELERATOR"),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="plan on the live Ray cluster (RAY_ADDRESS, or a local one)")
    ] = False,
    accelerator: Annotated[
        str | None, typer.Option(help="with --ray: which GPU the nodes have (Ray does not say), or cpu")
    ] = None,
    top: Annotated[int, typer.Option(help="how many layouts to rank")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document, for scripts")] = False,
    margin: Annotated[float, typer.Option(help="share of memory held back for fragmentation")] = 0.1,
    efficiency: Annotated[
        float | None,
        typer.Option(help="share of the dense peak the matmuls reach (default 0.55; 0.6 of the measured peak on CPU)"),
    ] = None,
    cpu_tflops: Annotated[
        float | None, typer.Option(help="a CPU's matmul TFLOP/s, instead of measuring this machine's")
    ] = None,
) -> None:
    """Rank the layouts the engine accepts for a job on a cluster: memory, step time, tokens/s, MFU."""
    from parallel.config import ConfigError
    from parallel.spec_files import load_config

    if top < 1:
        raise fail(f"--top {top}: give a whole number of at least 1")
    if not 0 <= margin < 1:
        raise fail(f"--margin {margin}: give a share from 0 up to (not including) 1, e.g. 0.1")
    if efficiency is not None and not 0 < efficiency <= 1:
        raise fail(f"--efficiency {efficiency}: give a share above 0 and at most 1, e.g. 0.55")
    if cpu_tflops is not None and not 0 < cpu_tflops < math.inf:
        raise fail(f"--cpu-tflops {cpu_tflops}: give a positive number of TFLOP/s")
    if ray == (cluster is not None):
        raise fail("--cluster: give a cluster such as 8x8xh100-80gb, or --ray for the live Ray cluster (not both)")
    if accelerator is not None and not ray:
        raise fail("--accelerator: goes with --ray; with --cluster name it in the string, e.g. 8x8xh100-80gb")
    try:
        cfg = load_config(config, list(overrides or []))
    except ConfigError as err:
        raise fail(" ".join(str(err).split())) from None  # a YAML error's excerpt spans lines
    from service.planning import PlanInputError
    from service.planning import plan as make_plan

    notes: list[str] = []
    try:
        if ray:
            target, notes = cluster_from_ray(_ray_resources(), cfg.resources, accelerator, cpu_tflops)
        else:
            target = parse_cluster(str(cluster), cpu_tflops)
        report, found = make_plan(cfg, target, top, margin, efficiency, notes, field="ray" if ray else "cluster")
    except PlanInputError as err:
        raise fail(f"--{err}") from None
    typer.echo(json.dumps(report, indent=2) if as_json else _text(report, found))
    if not report["fits"]:
        raise typer.Exit(1)


def parse_cluster(text: str, cpu_tflops: float | None = None) -> Cluster:
    """`service.planning.parse_cluster`, its errors as one line naming --cluster."""
    from service.planning import PlanInputError
    from service.planning import parse_cluster as parse

    try:
        return parse(text, cpu_tflops)
    except PlanInputError as err:
        raise fail(f"--{err}") from None


def cluster_from_ray(
    resources: dict[str, dict[str, float]],
    job: ResourcesConfig,
    accelerator: str | None = None,
    cpu_tflops: float | None = None,
) -> tuple[Cluster, list[str]]:
    """`service.planning.cluster_from_ray`, its errors as one line naming the option."""
    from service.planning import PlanInputError
    from service.planning import cluster_from_ray as from_ray

    try:
        return from_ray(resources, job, accelerator, cpu_tflops)
    except PlanInputError as err:
        raise fail(f"--{err}") from None


def _ray_resources() -> dict[str, dict[str, float]]:
    """Alive nodes' total resources on RAY_ADDRESS's cluster, or on a local one started now."""
    from workers.run import connect

    try:
        connect()
    except Exception as err:  # an unreachable RAY_ADDRESS, a local start that failed
        where = os.environ.get("RAY_ADDRESS") or "a local cluster on 127.0.0.1"
        last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise fail(f"--ray: cannot connect to Ray ({where}): {last}") from None
    from workers.group import node_resources

    return node_resources()


# -- the report ------------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    from parallel.planner.timing import size

    return size(n)


def _text(report: dict[str, Any], found: list[Candidate]) -> str:
    job, cl = report["job"], report["cluster"]
    out = [
        f"{job['name']}: {_count(job['params'])} parameters, global_batch {job['global_batch']} x seq_len "
        f"{job['seq_len']}, {job['dtype']}",
        f"on {cl['text']} ({cl['world']} x {cl['accelerator_name']}, {_size(cl['memory_bytes'])} per rank, "
        f"{_size(cl['usable_bytes'])} usable at margin {report['margin']:g}; efficiency {report['efficiency']:g})",
        *(f"note: {n}" for n in report["notes"]),
        "",
    ]
    if not report["fits"]:
        smallest = found[0].prediction
        out += [f"NOTHING FITS: the smallest layout needs {_size(smallest.memory['total'])} per rank, "
                f"{_size(smallest.usable_bytes)} usable; the nearest misses:", ""]  # fmt: skip
    out += _table(found)
    for x in found[: DETAILED if report["fits"] else 1]:
        out += ["", *_detail(x)]
    fewest = report["min_accelerators"]
    out.append("")
    if fewest["count"] is None:
        out.append(f"needs more than 256 nodes of {fewest['per_node']} x {cl['accelerator']}: no layout fits")
    else:
        how = f"in nodes of {fewest['per_node']}, with ZeRO 1-3, full checkpointing, micro-batch 1"
        out.append(
            f"needs at least {fewest['count']} x {cl['accelerator']} (the fewest on which some layout fits, {how})"
        )
    return "\n".join(out)


def _table(found: list[Candidate]) -> list[str]:
    head = ("#", "LAYOUT", "PEAK/RANK", "OF CAP", "STEP", "TOKENS/S", "MFU", "BOTTLENECK", "FITS", "TARGET")
    rows = []
    for x in found:
        p = x.prediction
        rows.append((
            str(x.rank), p.layout, _size(p.memory["total"]), f"{p.memory['total'] / p.capacity_bytes:.0%}",
            _ms(p.step_time_s), f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}", p.bottleneck,
            "yes" if p.fits else "no", "yes" if x.reaches_target else f"gb {x.config.train.global_batch}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = {1, 7, 8, 9}  # text columns; numbers align right
    return [
        "  ".join(
            cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [head, *rows]
    ]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:,}"


def _detail(x: Candidate) -> list[str]:
    p = x.prediction
    items = {k: v for k, v in p.memory.items() if k != "total" and v}
    width = max((len(k) for k in items), default=0)
    out = [
        f"#{x.rank} {p.layout}",
        f"  memory per rank at the {p.memory_phase} peak: {_size(p.memory['total'])} of {_size(p.usable_bytes)} "
        f"usable ({p.memory['total'] / p.capacity_bytes:.0%} of {_size(p.capacity_bytes)})",
        *(f"    {k.ljust(width)}  {_size(v):>10}" for k, v in sorted(items.items(), key=lambda kv: -kv[1])),
        f"  step {_ms(p.step_time_s)}: " + ", ".join(f"{k} {_ms(v)}" for k, v in p.time.items() if v > 0),
        *(f"  - {r}" for r in x.reasons),
        *(f"  note: {n}" for n in p.notes),
    ]
    return out
