"""Pipeline bubble benchmark: measured step time per schedule against its no-bubble ideal.

    python bench/pipeline_bench.py [--pp 2 4] [--microbatches 8] [--steps 3]

For each pp and schedule it trains the `debug` model (8 layers) on pp gloo ranks,
one thread each. Each rank times its own compute (forward, backward and weight-
gradient chunks); the ideal step time is the busiest rank's compute, the time
the step would take with no idle bubble. Bubble fraction = 1 - ideal / measured,
printed next to the 1F1B theory (p-1)/(m+p-1). With more ranks than cores the
ranks share cores, so the measured time includes that contention too.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.dist.harness import spawn  # noqa: E402  (reuses the tests' gloo launcher)

# (label, pp_schedule, pp_virtual): "1f1b torch" is torch's own 1F1B loop, which waits for each send
# with the next receive, beside ours (parallel/pipeline_schedules.py), in the same run.
SCHEDULES = [("gpipe", "gpipe", 1), ("1f1b", "1f1b", 1), ("1f1b torch", "1f1b", 1),
             ("interleaved_1f1b", "interleaved_1f1b", 2), ("zbv", "zbv", 2)]  # fmt: skip


def _run(rank: int, world: int, label: str, schedule: str, virtual: int, micro: int, steps: int) -> dict:
    import time

    from torch.distributed.pipelining.schedules import Schedule1F1B

    from parallel import pipeline_parallel
    from parallel.config import build_config
    from parallel.trainer import Trainer

    if label == "1f1b torch":
        pipeline_parallel.SCHEDULES["1f1b"] = Schedule1F1B

    cfg = build_config(
        {
            "model": {"preset": "debug", "n_layers": 8},
            "parallel": {"pp": world, "pp_schedule": schedule, "pp_virtual": virtual},
            "train": {"steps": steps + 1, "global_batch": micro, "micro_batch": 1, "seq_len": 256},
            "metrics": {"peak_tflops": 1.0},
        },
        world_size=world,
    )
    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up: shape inference and first-touch allocations
    trainer.pipeline.busy_s = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return {"step_s": (time.perf_counter() - start) / steps, "busy_s": trainer.pipeline.busy_s / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, debug preset (8 layers), seq 256, "
          f"{args.microbatches} micro-batches of 1, gloo, 1 thread per rank")  # fmt: skip
    print(f"{'pp':>3} {'schedule':<17} {'step (s)':>9} {'ideal (s)':>10} {'bubble':>7} {'1F1B theory':>12}")
    m = args.microbatches
    with tempfile.TemporaryDirectory() as tmp:
        for pp in args.pp:
            theory = (pp - 1) / (m + pp - 1)
            for label, schedule, virtual in SCHEDULES:
                results = spawn(_run, pp, Path(tmp), label, schedule, virtual, m, args.steps)
                step = max(r["step_s"] for r in results)
                ideal = max(r["busy_s"] for r in results)
                print(f"{pp:>3} {label:<17} {step:>9.3f} {ideal:>10.3f} {1 - ideal / step:>7.1%} {theory:>12.1%}",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    main()
