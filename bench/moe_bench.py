"""Expert parallelism benchmark: the all-to-all's share of the step time at ep=2 and ep=4.

    python bench/moe_bench.py [--ep 2 4] [--steps 3] [--preset debug-moe]

For each ep it trains the MoE preset on ep gloo ranks (dp = ep, every rank one thread), once with the
experts sharded over the ranks (parallel.ep = ep) and once replicated (ep = 1, plain data parallelism,
the same ranks and tokens), and profiles the measured steps with torch.profiler. The all-to-all time is
what the profiler records inside the all-to-all collectives on rank 0, forward (the counts, the tokens
to their experts, the outputs back) and backward (the gradients along the same paths); its share is
that over the step's wall time. `other collectives`: the time inside gloo's other collectives (the
gradient all-reduce, the all-gather of updated ZeRO shards, the loss and norm reductions). With more
ranks than cores the ranks share cores, so the wait inside a collective includes a slower peer's
compute: on this machine the share is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dist.harness import spawn  # noqa: E402  (reuses the tests' gloo launcher)


def _is_all_to_all(name: str) -> bool:
    name = name.lower()
    return "all_to_all" in name or "alltoall" in name


def _run(rank: int, world: int, ep: int, steps: int, preset: str) -> dict:
    import time

    from torch.profiler import ProfilerActivity, profile

    from parallel.config import build_config
    from parallel.trainer import Trainer

    cfg = build_config(
        {
            "model": {"preset": preset},
            "parallel": {"dp": world, "ep": ep, "zero": 1},
            "train": {"steps": steps + 1, "global_batch": 2 * world, "micro_batch": 2, "seq_len": 256},
            "metrics": {"peak_tflops": 1.0},
        },
        world_size=world,
    )
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up: first-touch allocations
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        step_s = (time.perf_counter() - start) / steps
    events = list(prof.events())
    trainer.close()
    a2a = _covered_s(e for e in events if _is_all_to_all(e.name))
    dp = _covered_s(e for e in events if e.name.startswith("gloo:") and not _is_all_to_all(e.name))
    return {"step_s": step_s, "a2a_s": a2a / steps, "dp_s": dp / steps}


def _covered_s(events: Iterable) -> float:
    """Seconds covered by the events' time ranges, overlaps counted once (a collective's record nests its
    backend's inside it)."""
    total_us, end = 0.0, -1.0
    for e in sorted(events, key=lambda e: e.time_range.start):
        if e.time_range.end > end:
            total_us += e.time_range.end - max(e.time_range.start, end)
            end = e.time_range.end
    return total_us / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--preset", default="debug-moe")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"MoE all-to-all share of the step ({args.preset}, seq 256, 2 sequences per rank, ZeRO-1, gloo, "
          f"{os.cpu_count()} cores)")  # fmt: skip
    print(f"{'ranks':>5} {'layout':<14} {'step ms':>9} {'all-to-all ms':>14} {'share':>7} {'other collectives ms':>21}")
    with tempfile.TemporaryDirectory() as tmp:
        for ep in args.ep:
            for label, layout_ep in ((f"ep={ep}", ep), ("ep=1 (dp only)", 1)):
                r = spawn(_run, ep, Path(tmp), layout_ep, args.steps, args.preset, timeout_s=900)[0]
                share = r["a2a_s"] / r["step_s"]
                print(f"{ep:>5} {label:<14} {r['step_s'] * 1e3:>9.1f} {r['a2a_s'] * 1e3:>14.1f} {share:>7.1%} "
                      f"{r['dp_s'] * 1e3:>21.1f}")  # fmt: skip


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
