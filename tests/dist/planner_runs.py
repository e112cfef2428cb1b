"""Run layouts with the probe (tests/dist/planner_probe.py) on gloo ranks, and set what it measured beside
what the planner predicts for the same ranks: `measure_layouts`, `predicted`, `within`, `table`.

    .venv/bin/python -m tests.dist.planner_runs     # prints the predicted-vs-measured table
"""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from tests.dist.harness import BASE, free_port
from tests.dist.planner_probe import STEPS, Probe

# -- running layouts --------------------------------------------------------------------------------------


def config_of(world: int, overrides: list[str]) -> Any:
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides

    return build_config(apply_overrides(copy.deepcopy(BASE), [*overrides, f"train.steps={STEPS}"]), world_size=world)


def _worker(rank: int, world: int, port: int, jobs: list[tuple[list[str], str]]) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from parallel.trainer import Trainer

    for overrides, out in jobs:
        start = time.perf_counter()
        trainer = Trainer(config_of(world, overrides))
        probe = Probe(trainer)
        trainer.run()
        mine = probe.result() | {"seconds": time.perf_counter() - start}
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        if rank == 0:
            torch.save(every, out)
        trainer.close()
    dist.destroy_process_group()


def measure_layouts(world: int, layouts: dict[str, list[str]], tmp: Path) -> dict[str, list[dict[str, Any]]]:
    """Run each layout (BASE + overrides) on `world` ranks, one after another in one set of processes;
    return each rank's measurements (`Probe.result`) per layout."""
    outs = {name: str(tmp / f"probe-{world}-{i}.pt") for i, name in enumerate(layouts)}
    jobs = [(o, outs[name]) for name, o in layouts.items()]
    mp.start_processes(_worker, args=(world, free_port(), jobs), nprocs=world, start_method="spawn")
    return {name: torch.load(out, weights_only=False) for name, out in outs.items()}


# -- what the planner predicts for the same ranks ---------------------------------------------------------


def predicted(cfg: Any, pp_rank: int) -> dict[str, Any]:
    """The planner's numbers for one rank of pipeline rank `pp_rank`: state_bytes; the bytes one forward
    of each of its stages keeps for one micro-batch (`unit_bytes`' terms: layers x layer, the first
    stage's token ids, 8 bytes each, the last stage's head and loss); the autograd-saved part of
    activation_bytes at its peak (layers + embedding + head: the logits, the pipeline stage's outputs and
    receive buffers are held outside autograd); comm_bytes per axis."""
    from parallel.planner import activation_bytes, comm_bytes, state_bytes
    from parallel.planner.activations import unit_bytes
    from parallel.planner.shapes import rank_stages

    units = unit_bytes(cfg, "fp32")
    per_stage = {
        s.index: round(
            s.dense_layers * units["layer"]
            + s.moe_layers * units["moe_layer"]
            + s.first * units["tokens"] * 8
            + s.last * units["head"]
        )  # fmt: skip
        for s in rank_stages(cfg.model, cfg.parallel, pp_rank)
    }
    acts = activation_bytes(cfg, pp_rank, "fp32")
    return {
        "state": state_bytes(cfg, pp_rank),
        "per_mb": per_stage,
        "peak": acts["layers"] + acts["embedding"] + acts["head"],
        "comm": comm_bytes(cfg, "fp32", pp_rank),
    }


def within(measured: float, want: float, tol: float) -> bool:
    return abs(measured - want) <= tol * abs(want)


def rows(world: int, overrides: list[str], ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One comparison row per distinct pp rank (the other ranks must agree with it; see the test)."""
    cfg = config_of(world, overrides)
    out = []
    for r in sorted({m["pp_rank"] for m in ranks}):
        mine = [m for m in ranks if m["pp_rank"] == r]
        want = predicted(cfg, r)
        per_mb: dict[int, list[int]] = defaultdict(list)
        for m in mine:
            for (stage, _), n in m["per_mb"].items():
                per_mb[stage].append(n)
        out.append({"pp_rank": r, "want": want, "got": mine[0], "per_mb": dict(per_mb), "ranks": mine})
    return out


TOL = {"state": 0.02, "activations": 0.10, "comm": 0.05}


def table(world: int, layouts: dict[str, list[str]], results: dict[str, list[dict[str, Any]]]) -> str:
    """Predicted vs measured, every layout and pp rank, kilobytes (measured on the row's first rank)."""
    lines = [
        f"{'layout':<22} {'pp':>2}  {'state p/g/o pred -> meas (KB)':<46} {'act/mb pred -> meas':<24} "
        f"{'act peak':<20} comm per axis pred -> meas (KB)"
    ]
    kb = lambda n: f"{n / 1000:.1f}"  # noqa: E731
    for name, ov in layouts.items():
        for row in rows(world, ov, results[name]):
            w, g = row["want"], row["got"]
            ok = lambda a, b, k: "" if within(a, b, TOL[k]) else "!"  # noqa: E731
            st = " ".join(
                f"{kb(w['state'][k])}->{kb(g['state'][k])}{ok(g['state'][k], w['state'][k], 'state')}"
                for k in ("params", "grads", "optimizer")
            )
            mb = " ".join(
                f"s{s}:{kb(w['per_mb'][s])}->{kb(max(row['per_mb'].get(s, [0])))}"
                f"{ok(max(row['per_mb'].get(s, [0])), w['per_mb'][s], 'activations')}"
                for s in w["per_mb"]
            )
            peak = f"{kb(w['peak'])}->{kb(g['peak'])}{ok(g['peak'], w['peak'], 'activations')}"
            axes = sorted(set(w["comm"]) | set(g["comm"]))
            cm = " ".join(
                f"{a}:{kb(w['comm'].get(a, 0))}->{kb(g['comm'].get(a, 0))}"
                f"{ok(g['comm'].get(a, 0), w['comm'].get(a, 0), 'comm')}"
                for a in axes
            )
            lines.append(f"{name:<22} {row['pp_rank']:>2}  {st:<46} {mb:<24} {peak:<20} {cm}")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    from tests.dist.test_planner_measured import FOUR_D, LAYOUTS, WORLD

    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        for world, layouts in ((WORLD, LAYOUTS), (16, FOUR_D)):
            print(table(world, layouts, measure_layouts(world, layouts, Path(d))))
        print(f"{time.perf_counter() - start:.0f} s")
