"""Checkpoint benchmark: save time, async blocking time and bytes/s, next to the disk's raw write speed.

Builds the engine's trainer in one process for a preset (default `debug`), trains one step so the
AdamW states exist, then measures, all in this one run and on the same directory:

- raw: writing the checkpoint's byte count to a plain file in 4 MiB blocks, then fsync;
- sync: `Checkpointer.save` with checkpoint.async off (write every shard, fsync, commit);
- async: the time `save` blocks training (staging a copy in memory) and the time until committed.

    python bench/ckpt_bench.py --preset debug --repeats 3 --dir /tmp/fourfold-ckpt-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from parallel.checkpoint import list_checkpoints
from parallel.config import build_config
from parallel.trainer import Trainer


def raw_write(path: Path, n_bytes: int) -> float:
    """Seconds to write n_bytes sequentially and fsync them."""
    block = os.urandom(4 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            left -= f.write(block[: min(left, len(block))])
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="debug", help="model preset")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each kind (median reported)")
    parser.add_argument("--dir", default=None, help="where to write (default: a new temporary directory)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    root = Path(args.dir or tempfile.mkdtemp(prefix="fourfold-ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    ckpt_dir = root / "ckpt"

    spec = {
        "model": {"preset": args.preset},
        "train": {"steps": 1, "global_batch": 2, "micro_batch": 2, "seq_len": 64},
        "data": {"source": "synthetic"},
        # Keep every save, so the timings hold writing and committing only (no retention deletes).
        "checkpoint": {"dir": str(ckpt_dir), "keep_last": 2 * args.repeats + 1},
    }
    trainer = Trainer(build_config(spec, world_size=1))
    trainer.train_step()
    ck = trainer.checkpointer
    cfg = trainer.cfg
    extra = trainer.checkpoint_meta()

    step = 0
    sync_s, async_block_s, async_total_s = [], [], []
    for _ in range(args.repeats):
        step += 1
        cfg.checkpoint.async_ = False
        sync_s.append(ck.save(step, extra))
        step += 1
        cfg.checkpoint.async_ = True
        start = time.perf_counter()
        async_block_s.append(ck.save(step, extra))
        ck.finish()
        async_total_s.append(time.perf_counter() - start)
    size = list_checkpoints(str(ckpt_dir))[-1].size_bytes
    raw_s = [raw_write(root / "raw.bin", size) for _ in range(args.repeats)]
    trainer.close()

    med = statistics.median
    mib = size / 2**20
    print(f"ckpt_bench preset={args.preset} checkpoint={mib:.1f} MiB repeats={args.repeats} dir={root}")
    print(f"raw sequential write + fsync : {med(raw_s) * 1e3:8.1f} ms  {mib / med(raw_s):8.1f} MiB/s")
    print(f"sync save (write+fsync+commit): {med(sync_s) * 1e3:8.1f} ms  {mib / med(sync_s):8.1f} MiB/s")
    print(
        f"async save: blocked {med(async_block_s) * 1e3:.1f} ms "
        f"({med(async_block_s) / med(sync_s):.0%} of sync), committed after {med(async_total_s) * 1e3:.1f} ms"
    )
    print(f"sync save speed / raw write speed: {med(raw_s) / med(sync_s):.2f}")
    if args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
