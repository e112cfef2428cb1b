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

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Annotated, Any

import typer

from api.cli.common import app, fail

if TYPE_CHECKING:
    from parallel.config import Config, ResourcesConfig
    from parallel.planner import Accelerator, Candidate, Cluster

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
        typer.Option(
            help="share of the dense peak the matmuls reach (default 0.55; 1.0 on CPU, whose peak is measured)"
        ),
    ] = None,
    cpu_tflops: Annotated[
        float | None, typer.Option(help="a CPU's matmul TFLOP/s, instead of measuring this machine's")
    ] = None,
) -> None:
    """Rank the layouts the engine accepts for a job on a cluster: memory, step time, tokens/s, MFU."""
    from parallel.config import ConfigError, load_config
    from parallel.planner import min_accelerators, search
    from parallel.planner.timing import DEFAULT_EFFICIENCY

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
    notes: list[str] = []
    if ray:
        target, notes = cluster_from_ray(_ray_resources(), cfg.resources, accelerator, cpu_tflops)
    else:
        target = parse_cluster(str(cluster), cpu_tflops)
    eff = efficiency if efficiency is not None else 1.0 if target.accelerator.kind == "cpu" else DEFAULT_EFFICIENCY
    where = "--ray" if ray else f"--cluster {_cluster_text(target)}"
    try:
        found = search(cfg, target, efficiency=eff, margin=margin, top=top)
        fewest = min_accelerators(cfg, target.accelerator, per_node=_node_size(target), margin=margin)
    except ValueError as err:  # an accelerator without a peak for the job's dtype
        hint = f" or plan with --set train.dtype=auto (was {cfg.train.dtype})" if "peak" in str(err) else ""
        raise fail(f"{where}: {err}{hint}") from None
    if not found:
        raise fail(f"{where}: no layout the engine accepts runs on {target.world} devices")
    report = _report(cfg, target, found, fewest, eff, margin, notes)
    typer.echo(json.dumps(report, indent=2) if as_json else _text(report, found))
    if not report["fits"]:
        raise typer.Exit(1)


# -- the cluster -------------------------------------------------------------------------------------------------


def _node_size(c: Cluster) -> int:
    """The node `min_accelerators` counts in: the cluster's, or for one node smaller than the accelerator's
    usual (8 GPUs), the usual one: the answer says how many devices a job needs, not how many such nodes."""
    return c.per_node if c.nodes > 1 else max(c.per_node, c.accelerator.per_node)


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_accelerator(ranks_per_node: int, tflops: float | None = None, node_memory: int | None = None) -> Accelerator:
    """This machine's CPU as `cpu_measured` describes it (the matmul peak measured now unless `tflops`), each
    rank holding its share of the node's memory (`node_memory`, default this machine's): a node's ranks are
    processes sharing one memory, not devices with their own."""
    from parallel.planner import cpu_measured

    share = (node_memory or _physical_memory()) // max(1, ranks_per_node)
    return cpu_measured(tflops=tflops, memory_bytes=share, per_node=ranks_per_node)


def parse_cluster(text: str, cpu_tflops: float | None = None) -> Cluster:
    """`--cluster`'s string as a planner Cluster, or a `fail` naming what is valid. A CPU cluster gets this
    machine's CPU, each rank with its share of the memory."""
    from parallel.planner import Cluster, cpu_measured

    placeholder = cpu_measured(tflops=1.0, memory_bytes=1)  # no measurement until the string is known good
    try:
        parsed = Cluster.parse(text, accelerators={"cpu": placeholder})
    except ValueError as err:
        message = str(err).removeprefix(f"cluster {text!r}: ")
        if message.startswith("unknown accelerator"):
            message += f" (aliases: {', '.join(_aliases())})"
        elif message.startswith("a cluster needs"):
            message = "give at least one node and one device per node, e.g. 8x8xh100-80gb"
        raise fail(f"--cluster {text.strip() or repr(text)}: {message}") from None
    if parsed.accelerator is placeholder:
        return dataclasses.replace(parsed, accelerator=cpu_accelerator(parsed.per_node, cpu_tflops))
    return parsed


def _aliases() -> list[str]:
    from parallel.planner.hardware import ALIASES

    return list(ALIASES)


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


def cluster_from_ray(
    resources: dict[str, dict[str, float]],
    job: ResourcesConfig,
    accelerator: str | None = None,
    cpu_tflops: float | None = None,
) -> tuple[Cluster, list[str]]:
    """A planner Cluster from Ray's alive nodes' totals (`workers.group.node_resources()`: node id ->
    {"CPU": n, "GPU": n, "memory": bytes, ...}) and the notes that say what was assumed.

    GPUs when `accelerator` names one, or the job runs on GPUs (resources.accelerator=gpu); Ray does not say
    which GPU, so then `accelerator` is required. Each node holds the ranks the launcher would put there
    (`workers.placement.slots_of`: its GPUs with cpus_per_rank CPUs each, or its CPUs / cpus_per_rank). On
    CPU the peak is measured here (or `cpu_tflops`) and each rank gets its share of the node's Ray memory.
    The planner takes equal nodes: unequal ones are planned as that many nodes of the smallest."""
    from parallel.planner import ACCELERATORS, Cluster
    from parallel.planner import accelerator as lookup
    from workers.placement import slots_of

    gpu = accelerator.lower() != "cpu" if accelerator is not None else job.accelerator == "gpu"
    if gpu and accelerator is None:
        known = ", ".join(ACCELERATORS)
        raise fail(f"--accelerator: the job runs on GPUs and Ray does not say which; give one of {known}")
    acc = None
    if gpu:
        try:
            acc = lookup(str(accelerator))
        except ValueError as err:
            raise fail(f"--accelerator {accelerator}: {err}") from None
    res = job.model_copy(update={"accelerator": "gpu" if gpu else "cpu"})
    slots = {node: slots_of(have, res) for node, have in resources.items()}
    slots = {node: n for node, n in slots.items() if n > 0}
    unit = "GPUs" if gpu else f"CPU slots (resources.cpus_per_rank={res.cpus_per_rank:g})"
    if not slots:
        raise fail(f"--ray: no alive node of the Ray cluster has {unit} for a rank ({len(resources)} nodes)")
    per_node = min(slots.values())
    notes = [f"Ray: {len(slots)} node(s) of {', '.join(str(n) for n in sorted(slots.values()))} {unit}"]
    if len(set(slots.values())) > 1:
        notes.append(f"nodes differ; planned as {len(slots)} nodes of {per_node}, the smallest")
    if acc is None:
        memory = min(int(resources[node].get("memory", 0)) for node in slots) or None
        acc = cpu_accelerator(per_node, cpu_tflops, memory)
        peak = "as given" if cpu_tflops else "measured on this machine"
        notes.append(f"CPU peak {peak}; each rank's memory is its share of the node's ({_size(acc.memory_bytes)})")
    return Cluster(len(slots), per_node, acc), notes


# -- the report ------------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    from parallel.planner.timing import size

    return size(n)


def _key(acc: Accelerator) -> str:
    from parallel.planner import ACCELERATORS

    return next((k for k, v in ACCELERATORS.items() if v == acc), "cpu" if acc.kind == "cpu" else acc.name)


def _cluster_text(c: Cluster) -> str:
    return f"{c.nodes}x{c.per_node}x{_key(c.accelerator)}"


def _layout(cfg: Config) -> dict[str, Any]:
    p, t = cfg.parallel, cfg.train
    return {
        "dp": p.dp, "dp_replicate": p.dp_replicate, "tp": p.tp, "pp": p.pp, "cp": p.cp, "cp_mode": p.cp_mode,
        "zero": p.zero, "pp_schedule": p.pp_schedule if p.pp > 1 else None, "pp_virtual": p.pp_virtual,
        "activation_checkpointing": p.activation_checkpointing, "micro_batch": t.micro_batch,
        "global_batch": t.global_batch,
    }  # fmt: skip


def _report(
    cfg: Config, c: Cluster, found: list[Candidate], fewest: int | None, eff: float, margin: float, notes: list[str]
) -> dict[str, Any]:
    """What both outputs say, as plain data (the --json document)."""
    from parallel.planner import total_params

    acc = c.accelerator
    return {
        "job": {
            "name": cfg.name, "params": total_params(cfg.model), "global_batch": cfg.train.global_batch,
            "seq_len": cfg.train.seq_len, "dtype": found[0].prediction.dtype,
        },
        "cluster": {
            "text": _cluster_text(c), "nodes": c.nodes, "per_node": c.per_node, "world": c.world,
            "accelerator": _key(acc), "accelerator_name": acc.name, "memory_bytes": acc.memory_bytes,
            "usable_bytes": int(acc.memory_bytes * (1 - margin)), "peak_tflops": acc.peak_tflops,
        },
        "efficiency": eff, "margin": margin, "notes": notes,
        "fits": any(x.prediction.fits for x in found),
        "candidates": [
            {"rank": x.rank, "layout": _layout(x.config), "reaches_target": x.reaches_target, "reasons": x.reasons,
             "prediction": x.prediction.as_dict()}
            for x in found
        ],
        "min_accelerators": {"count": fewest, "accelerator": _key(acc), "per_node": _node_size(c)},
    }  # fmt: skip


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
