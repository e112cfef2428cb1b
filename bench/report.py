"""`make bench`: every comparison of docs/performance.md in one run, and the page written from it.

Runs each benchmark below in turn (one at a time, so that none shares the machine with another),
with the command shown on the page, and writes the page: the machine, the versions, each command
and what it printed. The benchmarks interleave their own contenders and print medians, ranges and
ratios; this script adds nothing to their figures.

    python bench/report.py [--out docs/performance.md] [--database-url postgresql://...] [--quick]

PostgreSQL rows run when --database-url (or FOURFOLD_BENCH_DATABASE_URL) names a server; the recovery
comparison with Ray Train runs when `ray.train` imports (the `bench` extra).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"  # made by `make bench` from bench/peers-requirements.txt

ABOUT = {
    "peers": "The engine against plain PyTorch loops on the same model class, two ranks on gloo; above 1x "
    "the engine is faster. `compiled`: with `train.compile` (the peers run eager). torchtitan 0.3.0: its "
    "llama3 debugmodel and `parallelize_llama` (FSDP2), stepped as its Trainer steps, against ZeRO-3 on the "
    "same shape; the settings its CPU run needs are in bench/peers_bench.py (`titan_cpu_settings`). "
    "Goal: >= 1.1x. Where the time goes: [parallelism.md](parallelism.md#where-a-step-spends-its-time).",
    "mfu": "The model's own step (AdamW, cross entropy, synthetic tokens) in one process, MFU against "
    "the CPU's measured matmul peak; the second run with `train.compile`'s regional compilation "
    "(compile time reported apart). Goal with compile: MFU >= 0.8.",
    "api": "50 aiohttp clients against one uvicorn worker in its own process, 10,000 jobs stored. "
    "`capacity`: closed loop (latency there is queueing); `at N/s`: a fixed schedule, latency from "
    "when each request was due. Goals: a page >= 500 req/s and p99 < 50 ms, one job >= 1,000 req/s "
    "and p99 < 20 ms, >= 200 submissions/s with none lost or duplicated. Why it is as fast as it is: "
    "[service.md](service.md#speed-of-the-api).",
    "moe": "Expert parallelism: the share of the step spent inside all-to-all (forward and backward, rank 0, "
    "torch.profiler) at ep=2 and ep=4, each beside plain data parallelism on the same ranks and tokens "
    "(experts replicated, their gradients all-reduced). [parallelism.md](parallelism.md#expert-parallelism).",
    "ckpt": "The one-process trainer's state saved synchronously and asynchronously, next to writing "
    "the same bytes to the same disk with fsync, interleaved. Goals: sync >= 0.7x raw, async blocks "
    "<= 5% of a sync save. [checkpoints.md](checkpoints.md).",
    "recovery": "Failure to training again, against Ray Train's TorchTrainer on the same cluster "
    "([fault-tolerance.md](fault-tolerance.md)).",
}


def benches(args: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    py = [sys.executable]
    seconds = "3" if args.quick else "10"
    rows = [
        ("Engine vs plain DDP, FSDP2 and torchtitan", "peers",
         [str(args.peers_python), "bench/peers_bench.py", "--preset", "debug", "--seq-len", "256",
          "--global-batch", "8", "--steps", "3" if args.quick else "5", "--rounds", "2" if args.quick else "3"]),
        ("Engine, one process: MFU eager and compiled", "mfu",
         py + ["bench/engine_bench.py", "--preset", "debug"]),
        ("", "mfu", py + ["bench/engine_bench.py", "--preset", "debug", "--compile"]),
        ("Expert parallelism: the all-to-all's share of the step", "moe",
         py + ["bench/moe_bench.py", "--ep", "2", "4", "--steps", "3"]),
        ("Control plane, SQLite", "api",
         py + ["bench/api_bench.py", "--jobs", "10000", "--clients", "50", "--seconds", seconds]),
    ]  # fmt: skip
    if args.database_url:
        rows.append(("Control plane, PostgreSQL", "api", rows[-1][2] + ["--database-url", args.database_url]))
    rows.append(
        ("Checkpoints, debug preset", "ckpt", py + ["bench/ckpt_bench.py", "--preset", "debug", "--repeats", "3"])
    )
    if not args.quick:
        rows.append(
            ("Checkpoints, 125m preset", "ckpt", py + ["bench/ckpt_bench.py", "--preset", "125m", "--repeats", "3"])
        )
    if importlib.util.find_spec("ray.train") is not None:
        rows.append(("Recovery after a failure", "recovery", py + ["bench/recovery_bench.py", "--repeats", "3"]))
    return rows


def machine() -> list[str]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "?")  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, GPU: {gpu}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md")
    parser.add_argument("--database-url", default=os.environ.get("FOURFOLD_BENCH_DATABASE_URL"))
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test of the page)")
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON if PEERS_PYTHON.exists() else sys.executable,
                        help="the Python of bench/peers_bench.py: .venv-peers when there is one")  # fmt: skip
    args = parser.parse_args()
    # PYTHONPATH: the peers venv has the engine's dependencies but not the project installed.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "GLOO_SOCKET_IFNAME": "lo",
           "MASTER_ADDR": "127.0.0.1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    started = datetime.datetime.now(datetime.UTC)
    sections, failed = [], []
    for title, kind, cmd in benches(args):
        python = ".venv-peers/bin/python" if cmd[0] == str(PEERS_PYTHON) else "python"
        shown = " ".join([python, *cmd[1:]]).replace(args.database_url or "\0", "postgresql://...")
        print(f"== {title}: {shown}", flush=True)
        start = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        # Ray's own notices (the recovery benchmark kills workers on purpose) are not figures.
        output = "\n".join(line for line in run.stdout.splitlines() if line.strip() and "(raylet)" not in line)
        print(output, flush=True)
        if run.returncode != 0:
            failed.append(title)
            output += f"\n(exit {run.returncode}) " + (run.stderr.strip().splitlines() or [""])[-1]
        took = time.perf_counter() - start
        heading = [f"## {title}", "", ABOUT[kind], ""] if title else []  # no title: the run before's section
        sections += [*heading, "```console", f"$ {shown}", output, "```", f"({took:.0f} s)", ""]
    page = [
        "# Performance",
        "",
        "Written by `make bench` (`bench/report.py`) on "
        f"{started:%Y-%m-%d %H:%M} UTC: every figure below is what the command above it printed in that run.",
        "Ratios compare contenders measured side by side in the same run; absolute times are this machine's.",
        "",
        *machine(),
        "",
        *sections,
    ]
    args.out.write_text("\n".join(page).rstrip() + "\n")
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
