"""Where a step's time goes, contender by contender: torch.profiler over the steps of bench/peers_bench.py.

Two gloo ranks build the contenders named (those of peers_bench.py, the same builders), warm each
up, then profile --steps steps of each in turn, --rounds times (interleaved). Rank 0 prints, per
contender, the step time and the operators' own (self) CPU time per step, the largest first, side
by side: an operator that costs one contender more than the other is where a ratio below 1 comes from.

    python bench/profile_step.py --contenders "fourfold ZeRO-3" "plain FSDP2" --rounds 3

Run it in the Python peers_bench.py runs in (.venv-peers for the torchtitan contenders).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers_bench  # noqa: E402  (the contenders, built the same way)

BUILDERS = {
    "fourfold ZeRO-0": lambda a: peers_bench._ours(a, 0),
    "fourfold ZeRO-0 compiled": lambda a: peers_bench._ours(a, 0, compile=True),
    "fourfold ZeRO-3": lambda a: peers_bench._ours(a, 3),
    "fourfold ZeRO-3 compiled": lambda a: peers_bench._ours(a, 3, compile=True),
    "fourfold ZeRO-3 (titan shape)": lambda a: peers_bench._ours(a, 3, shape=peers_bench.TITAN_SHAPE),
    "fourfold ZeRO-1": lambda a: peers_bench._ours(a, 1),
    "fourfold ZeRO-2": lambda a: peers_bench._ours(a, 2),
    "plain DDP": lambda a: peers_bench._peer(a, "plain DDP"),
    "DDP + ZeroRedundancyOptimizer": lambda a: peers_bench._peer(a, "DDP + ZeroRedundancyOptimizer"),
    "FSDP2 reshard_after_forward=False": lambda a: peers_bench._peer(a, "FSDP2 reshard_after_forward=False"),
    "plain FSDP2": lambda a: peers_bench._peer(a, "plain FSDP2"),
    "torchtitan FSDP2": peers_bench._titan,
}


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    peers_bench.init_rank(rank, port)
    steps = {name: BUILDERS[name](args) for name in args.contenders}
    for step in steps.values():
        step()  # warm-up (and compile)
    result = {name: {"step_ms": 0.0, "ops": {}} for name in steps}
    n = args.steps * args.rounds
    for _ in range(args.rounds):  # interleaved, as peers_bench.py: the machine's mood falls on all alike
        for name, step in steps.items():
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                result[name]["step_ms"] += (time.perf_counter() - start) * 1e3 / n
            ops = result[name]["ops"]
            for e in prof.key_averages():
                ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / n
    peers_bench.finish_rank(rank, out, result)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=["fourfold ZeRO-3", "plain FSDP2"], choices=BUILDERS)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps of each contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=25, help="operators shown")
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"fourfold-profile-{os.getpid()}.json"
    mp.spawn(_rank, args=(peers_bench._port(), args, str(out)), nprocs=2)
    result = json.loads(out.read_text())
    out.unlink()
    names = list(result)
    keys = {k for r in result.values() for k in r["ops"]}
    keys = sorted(keys, key=lambda k: -max(r["ops"].get(k, 0.0) for r in result.values()))
    width = max(len(n) for n in names) + 2
    print(f"profile_step preset={args.preset} seq={args.seq_len} global_batch={args.global_batch} dp=2, "
          f"{args.rounds} rounds x {args.steps} steps each, interleaved; self CPU ms per step, rank 0")  # fmt: skip
    print(f"{'':<44}" + "".join(f"{n:>{width}}" for n in names))
    print(f"{'step time (wall)':<44}" + "".join(f"{result[n]['step_ms']:>{width}.1f}" for n in names))
    shown = keys[: args.top]
    # Then every collective and every wait for a value on the host, however small: what a step syncs on.
    shown += [k for k in keys[args.top :] if k.startswith("c10d::") or k == "aten::_local_scalar_dense"]
    for key in shown:
        print(f"{key[:43]:<44}" + "".join(f"{result[n]['ops'].get(key, 0.0):>{width}.1f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
