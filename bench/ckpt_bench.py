"""Checkpoint benchmark: save time, async blocking time and bytes/s, next to the disk's raw write speed.

Builds the engine's trainer in one process for a preset (default `debug`), trains one step so the
AdamW states exist, then measures, all in this one run and on the same directory:

- raw: writing the checkpoint's byte count to a plain file in 4 MiB blocks, then fsync;
- sync: `Checkpointer.save` with checkpoint.async off (write every shard, fsync, commit);
- async: how much longer the save and the next step take than a step without a save (the copy to
  memory runs beside that step's forward and backward; its update waits for the copy), and the
  time until committed;
- load: `Checkpointer.load` of the newest checkpoint into the same layout, next to reading the
  raw file's bytes back, each after its files were dropped from the page cache (posix_fadvise
  DONTNEED after fsync: read from the disk, not from memory, where the kernel honours it).

Raw writes and saves, then raw reads and loads, are interleaved, `--repeats` times; medians are
reported.

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


def drop_cached(root: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under root (or root itself)."""
    for path in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(path: Path) -> float:
    """Seconds to read the file back in 4 MiB blocks, from the disk."""
    drop_cached(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(4 << 20):
            pass
    return time.perf_counter() - start


def raw_write(path: Path, n_bytes: int, keep: bool = False) -> float:
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
    if not keep:
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
        "train": {"steps": 1000, "global_batch": 2, "micro_batch": 2, "seq_len": 64},
        "data": {"source": "synthetic"},
        # Keep every save, so the timings hold writing and committing only (no retention deletes).
        "checkpoint": {"dir": str(ckpt_dir), "keep_last": 2 * args.repeats + 1},
    }
    trainer = Trainer(build_config(spec, world_size=1))
    trainer.train_step()
    ck = trainer.checkpointer
    cfg = trainer.cfg
    extra = trainer.checkpoint_meta()

    def timed_step() -> float:
        start = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - start

    plain_step_s = [timed_step() for _ in range(3)]
    size = 0
    raw_s, sync_s, async_block_s, async_call_s, async_total_s = [], [], [], [], []
    for _ in range(args.repeats):  # interleaved: the disk's state changes from one write to the next
        step = trainer.step
        cfg.checkpoint.async_ = False
        sync_s.append(ck.save(step, extra))
        size = list_checkpoints(str(ckpt_dir))[-1].size_bytes
        raw_s.append(raw_write(root / "raw.bin", size))
        plain_step_s.append(timed_step())
        # Asynchronous: what the save and the next step (which waits for the copy before its update)
        # take beyond a step without a save.
        cfg.checkpoint.async_ = True
        start = time.perf_counter()
        blocked = ck.save(trainer.step, extra)
        with_save = blocked + timed_step()
        ck.finish()
        async_total_s.append(time.perf_counter() - start)
        async_call_s.append(blocked)
        async_block_s.append(max(0.0, with_save - statistics.median(plain_step_s)))
        plain_step_s.append(timed_step())
    newest = list_checkpoints(str(ckpt_dir))[-1]
    raw_write(root / "raw.bin", size, keep=True)
    raw_read_s, load_s = [], []
    for _ in range(args.repeats):
        raw_read_s.append(raw_read(root / "raw.bin"))
        drop_cached(Path(newest.path))
        start = time.perf_counter()
        ck.load(newest.path)
        load_s.append(time.perf_counter() - start)
    (root / "raw.bin").unlink()
    trainer.close()

    med = statistics.median
    mib = size / 2**20
    print(f"ckpt_bench preset={args.preset} checkpoint={mib:.1f} MiB repeats={args.repeats} dir={root}")
    print(f"raw sequential write + fsync : {med(raw_s) * 1e3:8.1f} ms  {mib / med(raw_s):8.1f} MiB/s")
    print(f"sync save (write+fsync+commit): {med(sync_s) * 1e3:8.1f} ms  {mib / med(sync_s):8.1f} MiB/s")
    print(
        f"async save: training blocked {med(async_block_s) * 1e3:.1f} ms "
        f"({med(async_block_s) / med(sync_s):.0%} of sync; the save call {med(async_call_s) * 1e3:.1f} ms, "
        f"the rest the next step slowed by the copy and the write beside it), "
        f"committed after {med(async_total_s) * 1e3:.1f} ms"
    )
    print(f"raw sequential read          : {med(raw_read_s) * 1e3:8.1f} ms  {mib / med(raw_read_s):8.1f} MiB/s")
    print(f"load, same layout            : {med(load_s) * 1e3:8.1f} ms  {mib / med(load_s):8.1f} MiB/s")
    print(f"step without a save: {med(plain_step_s) * 1e3:.1f} ms")
    print(f"sync save speed / raw write speed: {med(raw_s) / med(sync_s):.2f}")
    print(f"load speed / raw read speed: {med(raw_read_s) / med(load_s):.2f}")
    if args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
