"""Command-line entry point of the engine.

    torchrun --nproc-per-node 4 -m parallel.train --config examples/tiny.yaml \
        --set parallel.dp=2 --set parallel.tp=2 --metrics-file runs/tiny/metrics.jsonl

Without torchrun it runs as one process, or launches N local processes itself:

    python -m parallel.train --nproc-per-node 4 --config examples/tiny.yaml --set parallel.tp=4

A config mistake ends with one line on stderr naming the field and exit code 2,
before any process group exists. Launched this way the config is checked before
any process starts, so a mistake prints that line alone; under a bare torchrun
each rank checks it and torchrun then adds its own failure summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, NoReturn

from parallel.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from parallel.data import TokenSource


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m parallel.train", description="Train with the fourfold engine.")
    parser.add_argument("--config", help="YAML job spec (defaults apply when omitted)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one field, value parsed as YAML; repeatable",
    )
    parser.add_argument("--metrics-file", help="append one JSON object per optimizer step (global rank 0)")
    parser.add_argument(
        "--resume", metavar="auto|PATH", help="resume from the newest complete checkpoint in checkpoint.dir, or PATH"
    )
    parser.add_argument(
        "--nproc-per-node", type=int, help="check the config, then start this many local ranks through torchrun"
    )
    return parser.parse_args(argv)


# The module each launched rank runs (a test wraps this one and points it at the wrapper).
LAUNCH_MODULE = "parallel.train"


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Start `args.nproc_per_node` ranks on this machine with torch's own launcher (torchrun).

    The ranks print their own one-line errors; a failed rank's exit code becomes ours,
    without torchrun's traceback on top."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for item in argv:  # pass everything on except our --nproc-per-node
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            rest.append(item)
    try:
        torchrun(["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", LAUNCH_MODULE, *rest])
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        print(f"fourfold: rank {rank} exited with code {failure.exitcode}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def preflight(cfg: Config, write_probe: bool = True) -> TokenSource:
    """What can be checked before any process group exists, each mistake a ConfigError: the data
    (opened), `model.init_from`, that `checkpoint.dir` can be written (`write_probe`: one rank
    does it), and the checkpoint to resume from. Returns the opened data source."""
    from parallel.checkpoint import check_storage, resolve_resume
    from parallel.data import build_source  # imports torch, so only once the config parsed
    from parallel.hf import check_hf_dir

    source = build_source(cfg.data, cfg.train.seq_len, cfg.train.seed, cfg.model.vocab_size)
    if cfg.model.init_from:
        check_hf_dir(cfg.model.init_from, cfg.model)
    if cfg.checkpoint.dir and write_probe:
        check_storage(cfg.checkpoint.dir)
    resolve_resume(cfg, None)
    return source


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    launching = args.nproc_per_node is not None and "RANK" not in os.environ
    world_size = args.nproc_per_node if launching else int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides, world_size=world_size)
        if args.resume:
            cfg.checkpoint.resume = args.resume
        source = preflight(cfg, write_probe=int(os.environ.get("RANK", 0)) == 0)
    except ConfigError as err:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"fourfold: config error: {err}", file=sys.stderr)
        return 2
    if launching:
        return _launch(args, argv)

    import torch.distributed as dist

    from parallel.checkpoint import CheckpointError
    from parallel.comms import CommTimeout
    from parallel.trainer import Trainer

    try:
        trainer = Trainer(cfg, metrics_file=args.metrics_file, source=source)
    except ConfigError as err:  # e.g. a checkpoint whose shards turn out unreadable while loading
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"fourfold: error: {err}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    try:
        trainer.run()
    except CommTimeout as err:  # a peer stopped answering: say who waited on what, not a traceback
        print(f"fourfold: error: {err}", file=sys.stderr, flush=True)
        return 3
    except CheckpointError as err:  # e.g. the disk filled up; every rank raises it, rank 0 says it
        if trainer.rank == 0:
            print(f"fourfold: error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def exit_with(code: int) -> NoReturn:
    """Leave the process with `code` once main() has cleaned up (metrics file closed, process
    groups destroyed), skipping the interpreter's teardown: there, C++ threads that torch's gloo
    backend still holds can end the process with SIGABRT ("terminate called without an active
    exception") after it has finished, turning a clean exit into a crash now and then (seen under
    load, after a refused checkpoint). Python's own buffers are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_with(main())
