"""Command-line entry point of the engine.

    torchrun --nproc-per-node 4 -m parallel.train --config examples/tiny.yaml \
        --set parallel.dp=2 --set parallel.tp=2 --metrics-file runs/tiny/metrics.jsonl

Without torchrun it runs as one process, or launches N local processes itself:

    python -m parallel.train --nproc-per-node 4 --config examples/tiny.yaml --set parallel.tp=4

A config mistake ends with one line on stderr naming the field and exit code 2,
before any process group exists. Launched this way the config is checked before
any process starts, so a mistake prints that line alone; under a bare torchrun
each rank checks it, the ranks of one machine say each distinct refusal once
(see `say_once`), and torchrun then adds its own failure summary.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from parallel.config import Config, ConfigError
from parallel.spec_files import load_config

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


def _process_id(pid: int) -> str:
    """`pid` and its start time (/proc, Linux): a pid the kernel reuses later gets another id."""
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        start = "0"
    return f"{pid}-{start}"


def _sweep(tmp: Path) -> None:
    """Remove the say_once directories of launchers that have exited (their ranks were killed
    before the last one could tidy up)."""
    for old in tmp.glob("fourfold-said-*-*-*"):
        pid, start = old.name.split("-")[2:4]
        if pid.isdigit() and start != "0" and _process_id(int(pid)) != f"{pid}-{start}":
            shutil.rmtree(old, ignore_errors=True)


def say_once(message: str) -> None:
    """Print `message` on stderr, flushed, once per distinct message among the local ranks of one
    launch (those of one torchrun agent on this machine).

    Every rank that refuses says why, not just rank 0: torchrun kills the other ranks as soon as
    the first one exits, so a rank-0-only message could be lost. The ranks take turns under an
    exclusive lock on a file in a directory keyed by the run (torchrun's run id, restart count,
    master address and port, and the launching process with its start time, since a bare torchrun's
    run id is "none" and its port 29500 in every run); the first with a message prints it and then
    leaves a marker named by the message's hash, so a rank leaves only after the message is out.
    The last local rank removes the directory; one left by killed ranks is removed by a later run
    once its launcher has exited. Anything failing here prints the message: twice beats never."""
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    said = False
    try:
        if local_ranks > 1:  # else one process, or a launcher that does not say who else is here
            said = _said_before(message, local_ranks)
    except OSError:
        said = False
    if not said:
        print(message, file=sys.stderr, flush=True)


def _said_before(message: str, local_ranks: int) -> bool:
    """say_once's turn-taking: True when another local rank has printed `message` or this one just
    did; False (or an OSError) leaves the printing to the caller."""
    import fcntl

    keys = ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
    run = hashlib.sha256("\0".join(os.environ.get(k, "") for k in keys).encode()).hexdigest()[:16]
    tmp = Path(tempfile.gettempdir())
    run_dir = tmp / f"fourfold-said-{_process_id(os.getppid())}-{run}"
    if not run_dir.exists():
        _sweep(tmp)
    run_dir.mkdir(mode=0o700, exist_ok=True)
    if run_dir.is_symlink() or run_dir.stat().st_uid != os.getuid():
        return False  # not ours: say it ourselves
    lock = os.open(run_dir / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    said = False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel releases it if this rank is killed holding it
        marker = run_dir / hashlib.sha256(message.encode()).hexdigest()[:16]
        said = marker.exists()
        if not said:
            print(message, file=sys.stderr, flush=True)
            said = True
            marker.touch()  # after the print: a rank killed in between means a repeat, not silence
        (run_dir / f"done-{os.environ.get('LOCAL_RANK', os.getpid())}").touch()
        if len(list(run_dir.glob("done-*"))) >= local_ranks:  # every local rank has had its turn
            shutil.rmtree(run_dir, ignore_errors=True)
    except OSError:
        pass
    finally:
        os.close(lock)
    return said


def preflight(cfg: Config, write_probe: bool = True) -> TokenSource:
    """What can be checked before any process group exists, each mistake a ConfigError: the data
    (opened), `model.init_from`, that `checkpoint.dir` can be written (`write_probe`: one rank
    does it), and the checkpoint to resume from. Returns the opened data source."""
    from parallel.checkpoint import check_storage, resolve_resume
    from parallel.data import build_source  # imports torch, so only once the config parsed
    from parallel.hf import check_hf_dir

    if cfg.plan.auto:
        raise ConfigError(
            f"plan.auto: {', '.join(cfg.plan.auto)} left to the planner; the service chooses them when it admits "
            "the job. To run the engine alone give them values (`fourfold plan --config ...` ranks the layouts)"
        )
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
        say_once(f"fourfold: config error: {err}")
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
        say_once(f"fourfold: error: {err}")
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    try:
        trainer.run()
    except CommTimeout as err:  # a peer stopped answering: say who waited on what, not a traceback
        print(f"fourfold: error: {err}", file=sys.stderr, flush=True)
        return 3
    except CheckpointError as err:  # e.g. the disk filled up; every rank raises it, each message said once
        say_once(f"fourfold: error: {err}")
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
