"""Planner accuracy benchmark: the layout planner's predicted step times against measured ones on this CPU.

    OMP_NUM_THREADS=1 GLOO_SOCKET_IFNAME=lo MASTER_ADDR=127.0.0.1 python bench/planner_bench.py \
        [--world 2] [--steps 7] [--warmup 2] [--seq-len 256] [--preset debug] [--layers 8] \
        [--layouts dp,tp,pp_1f1b] [--link-gbps 2.0] [--json]

Each layout runs on `--world` gloo ranks, one thread each, in one set of processes (as tests/dist/harness.py
runs them). All trainers are built and warmed up first; the timed steps then run round-robin, one step of
each layout per round, so that a drift in this (shared) machine's speed touches every layout alike. Each
round the ranks also measure, all at once, their one-thread matmul peak (`measure_cpu_matmul_tflops`) and
the link rate (bytes a rank sends per second in a loopback ring all-reduce; or --link-gbps); the medians
describe the CPU to `parallel.planner.predict`, at its CPU_EFFICIENCY for compute and 1.0 for links.
Measured step time: the median over the timed steps of the slowest rank's step (a barrier before each).
Printed: the table (scaled: the error left once predictions are scaled by the median measured/predicted
ratio, i.e. in the ratios between layouts; spread: (slowest - fastest) / median timed step), Spearman's
and Kendall's rank correlations and the median absolute relative error, for the median and the fastest
step (other work on the machine only adds time). Exits 0 whatever the agreement; non-zero if a run fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

LAYOUTS: dict[str, list[str]] = {  # name -> overrides; W is the world size
    "dp": ["parallel.dp=W", "parallel.zero=0"],
    "dp_zero1": ["parallel.dp=W", "parallel.zero=1"],
    "dp_zero2": ["parallel.dp=W", "parallel.zero=2"],
    "dp_zero3": ["parallel.dp=W", "parallel.zero=3"],
    "dp_mb1": ["parallel.dp=W", "train.micro_batch=1"],
    "dp_full": ["parallel.dp=W", "parallel.activation_checkpointing=full"],
    "dp_selective": ["parallel.dp=W", "parallel.activation_checkpointing=selective"],
    "tp": ["parallel.tp=W"],
    "pp_gpipe": ["parallel.pp=W", "parallel.pp_schedule=gpipe", "train.micro_batch=1"],
    "pp_1f1b": ["parallel.pp=W", "parallel.pp_schedule=1f1b", "train.micro_batch=1"],
    "pp_zbv": ["parallel.pp=W", "parallel.pp_schedule=zbv", "train.micro_batch=1"],
    "cp_ring": ["parallel.cp=W"],
}


def config_of(args: argparse.Namespace, overrides: list[str]) -> Any:
    """The checked Config of one layout: the bench's model and batch plus the layout's overrides."""
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides

    base = {
        "model": {"preset": args.preset, "n_layers": args.layers},
        "train": {"steps": args.warmup + args.steps, "global_batch": args.global_batch,
                  "micro_batch": args.micro_batch, "seq_len": args.seq_len, "seed": 0},
        "data": {"source": "synthetic"},
        "metrics": {"peak_tflops": 1.0},  # given, so no trainer measures it (MFU is not used here)
    }  # fmt: skip
    items = [o.replace("=W", f"={args.world}") for o in overrides]
    return build_config(apply_overrides(copy.deepcopy(base), items), world_size=args.world)


def _link_gbps(world: int, payload: int = 16 * 2**20, reps: int = 3) -> float:
    """GB/s a rank sends in a ring all-reduce of `payload` bytes: 2(n-1)/n x payload per call."""
    import torch.distributed as dist

    x = torch.ones(payload // 4)
    dist.all_reduce(x)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        dist.all_reduce(x)
    return 2 * (world - 1) / world * payload * reps / (time.perf_counter() - start) / 1e9


def _worker(rank: int, args: argparse.Namespace, port: int, names: list[str], out: str) -> None:
    """Build every layout's trainer, warm each up, then run the timed steps round-robin (one step of each
    layout per round, the peak and the link measured again each round), so that a drift in this machine's
    speed (a shared host) touches every layout alike."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(args.world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from parallel.flops import measure_cpu_matmul_tflops
    from parallel.trainer import Trainer

    dist.init_process_group("gloo", timeout=timedelta(seconds=900))  # the trainers reuse it
    trainers = {name: Trainer(config_of(args, LAYOUTS[name])) for name in names}
    for trainer in trainers.values():
        for _ in range(args.warmup):
            dist.barrier()
            trainer.train_step()
    peaks, links, steps = [], [], {name: [] for name in names}
    for _ in range(args.steps):
        dist.barrier()
        peaks.append(measure_cpu_matmul_tflops(seconds=0.3))  # every rank at once, as the layouts run
        links.append(args.link_gbps or _link_gbps(args.world))
        for name, trainer in trainers.items():
            dist.barrier()
            steps[name].append(trainer.train_step()["step_time_s"])
    every: list[Any] = [None] * args.world
    dist.all_gather_object(every, {"peaks": peaks, "steps": steps})
    if rank == 0:
        result = {
            "peaks": [statistics.median(r["peaks"]) for r in every],
            "link_gbps": statistics.median(links),
            "steps": {n: [max(s) for s in zip(*(r["steps"][n] for r in every), strict=True)] for n in names},
        }  # the slowest rank's time of each step
        Path(out).write_text(json.dumps(result))
    for trainer in trainers.values():
        trainer.close()
    dist.destroy_process_group()


def ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties given the average of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the (tie-averaged) ranks."""
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var else float("nan")


def kendall(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b (ties counted apart in each variable)."""
    conc = disc = tx = ty = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                tx += 1
            elif dy == 0:
                ty += 1
            elif (dx > 0) == (dy > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + tx) * (conc + disc + ty)) ** 0.5
    return (conc - disc) / denom if denom else float("nan")


def agreement(p: list[float], m: list[float]) -> dict[str, float]:
    """Rank correlations of predicted `p` and measured `m` step times, and their median absolute relative
    error, raw and after scaling `p` by the median m/p (the error left in the ratios between layouts)."""
    scale = statistics.median(b / a for a, b in zip(p, m, strict=True))
    return {
        "spearman": spearman(p, m), "kendall_tau_b": kendall(p, m), "scale": scale,
        "median_abs_rel_err": statistics.median(abs(a / b - 1) for a, b in zip(p, m, strict=True)),
        "scaled_median_abs_rel_err": statistics.median(abs(a * scale / b - 1) for a, b in zip(p, m, strict=True)),
    }  # fmt: skip


def run(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """Measure every layout, predict it, and return the rows and the agreement figures."""
    from parallel.planner import Cluster, cpu_measured, predict
    from parallel.planner.timing import CPU_EFFICIENCY, describe

    load = os.getloadavg()[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_worker, args=(args, port, names, out), nprocs=args.world, start_method="spawn")
        got = json.loads(Path(out).read_text())
    peak = statistics.mean(got["peaks"])
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // args.world
    acc = cpu_measured(tflops=peak, memory_bytes=memory, link_gbps=got["link_gbps"], per_node=args.world)
    cluster = Cluster(1, args.world, acc)
    rows = []
    for name in names:
        cfg = config_of(args, LAYOUTS[name])
        pred = predict(cfg, cluster, efficiency=CPU_EFFICIENCY, comm_efficiency=1.0)
        steps = got["steps"][name]
        rows.append({"name": name, "layout": describe(cfg), "predicted_s": pred.step_time_s,
                     "measured_s": statistics.median(steps), "fastest_s": min(steps), "steps_s": steps,
                     "time": pred.time, "bottleneck": pred.bottleneck})  # fmt: skip
    p, m = [r["predicted_s"] for r in rows], [r["measured_s"] for r in rows]
    fit = agreement(p, m)
    for r, pr, mr in zip(rows, ranks(p), ranks(m), strict=True):
        r |= {"ratio": r["predicted_s"] / r["measured_s"], "pred_rank": pr, "meas_rank": mr,
              "scaled_err": r["predicted_s"] * fit["scale"] / r["measured_s"] - 1}  # fmt: skip
    return {"world": args.world, "peak_tflops_per_rank": got["peaks"], "link_gbps": got["link_gbps"],
            "load_before": load, "rows": rows, **fit,
            "fastest": agreement(p, [r["fastest_s"] for r in rows])}  # fmt: skip


def report(res: dict[str, Any]) -> str:
    """The table and the figures as text."""
    peaks = ", ".join(f"{1e3 * x:.1f}" for x in res["peak_tflops_per_rank"])
    lines = [
        f"matmul peak per rank (1 thread, ranks at once): {peaks} GFLOP/s; link {res['link_gbps']:.2f} GB/s; "
        f"load average before {res['load_before']:.2f} (others' work slows the steps)",
        f"{'name':<13} {'layout':<38} {'pred ms':>8} {'meas ms':>8} {'p/m':>5} {'rk p':>4} {'rk m':>4} "
        f"{'scaled':>7} {'spread':>6}  predicted terms (ms)",
    ]
    for r in res["rows"]:
        terms = " ".join(f"{k.removeprefix('comm_')}={1e3 * v:.0f}" for k, v in r["time"].items() if 1e3 * v >= 0.5)
        spread = (max(r["steps_s"]) - min(r["steps_s"])) / r["measured_s"]  # of the timed steps
        lines.append(
            f"{r['name']:<13} {r['layout']:<38} {1e3 * r['predicted_s']:>8.0f} {1e3 * r['measured_s']:>8.0f} "
            f"{r['ratio']:>5.2f} {r['pred_rank']:>4g} {r['meas_rank']:>4g} {r['scaled_err']:>+7.0%} "
            f"{spread:>6.0%}  {terms}"
        )
    for label, fit in (("median step", res), ("fastest step", res["fastest"])):
        lines.append(
            f"{label + ':':<14} Spearman rho {fit['spearman']:+.3f}  Kendall tau-b {fit['kendall_tau_b']:+.3f}  "
            f"median |pred/meas - 1| {fit['median_abs_rel_err']:.1%}, {fit['scaled_median_abs_rel_err']:.1%} "
            f"with predictions scaled by {fit['scale']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="ranks (one thread each; keep <= cores)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--preset", default="debug", help="model preset (tiny, debug, 125m, ...)")
    parser.add_argument("--layers", type=int, default=8, help="n_layers (pp zbv needs 2 x world)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"subset of {','.join(LAYOUTS)}")
    parser.add_argument("--link-gbps", type=float, default=None, help="link rate instead of measuring it")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    if unknown := [n for n in names if n not in LAYOUTS]:
        parser.error(f"unknown layouts {unknown}; known: {', '.join(LAYOUTS)}")
    if len(names) < 2 or min(args.world, args.steps, args.seq_len) < 1 or args.warmup < 0:
        parser.error("give at least two layouts, positive --world/--steps/--seq-len, --warmup >= 0")
    for name in names:  # a bad combination fails here, before any process starts
        try:
            config_of(args, LAYOUTS[name])
        except ValueError as err:  # ConfigError
            parser.error(f"layout {name}: {err}")
    if args.world > (os.cpu_count() or 1):
        print(f"note: {args.world} ranks on {os.cpu_count()} cores: contention distorts the times", file=sys.stderr)
    print(f"planner_bench torch {torch.__version__}, world {args.world}, {args.preset} x {args.layers} layers, "
          f"seq {args.seq_len}, batch {args.global_batch}/{args.micro_batch}, warmup {args.warmup}, "
          f"steps {args.steps}", file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    res = run(args, names) | {"wall_s": time.perf_counter() - start}
    print(json.dumps(res, indent=1) if args.json else report(res) + f"\nwall {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
