"""One rank of a job: joins the process group and runs the engine's trainer.

`RankRunner` is plain Python (no Ray inside); `workers.group` wraps it in a Ray actor,
one per rank. Everything it tells the driver goes through `report(event)`, a callable
the driver hands in (a Ray queue there, a list in a test):

    {"kind": "metrics", "rank": 0, "metrics": {...}}      rank 0, after every step
    {"kind": "heartbeat", "rank": r, "step": s, "phase": "train", "time": t}   every rank, every step
    {"kind": "error", "rank": r, "error": "RuntimeError: ...", "time": t}        a rank that raised

Stopping is cooperative and happens at a step boundary on every rank at once: after each
step the ranks all-reduce their stop flags on a small gloo group, so a request that reaches
one rank stops all of them after the same step. With `checkpoint.dir` set, a stopped job
first saves a checkpoint of that step, so nothing is lost.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

Report = Callable[[dict[str, Any]], None]


class StopRequested(Exception):
    """Raised inside the training loop to leave it at a step boundary."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankRunner:
    def __init__(self, rank: int, world_size: int, local_rank: int, report: Report) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.report = report
        self._stop = threading.Event()
        self.step, self.phase = 0, "created"

    def where(self) -> dict[str, Any]:
        """This rank's node (Ray node id when under Ray), host address and process id."""
        node_id = None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        except ImportError:
            pass
        return {"rank": self.rank, "node_id": node_id, "host": _host_address(), "pid": os.getpid()}

    def free_port(self) -> int:
        return free_port()

    def request_stop(self) -> None:
        self._stop.set()

    def _beat(self, phase: str) -> None:
        self.phase = phase
        self.report({"kind": "heartbeat", "rank": self.rank, "step": self.step, "phase": phase, "time": time.time()})

    def run(
        self, spec: dict[str, Any], master_addr: str, master_port: int, env: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Train the job to its end (or a requested stop); returns a summary."""
        os.environ.update(env or {})
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
        )  # fmt: skip
        import torch
        import torch.distributed as dist

        from parallel.config import build_config
        from parallel.trainer import Trainer

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        self._beat("init")
        cfg = build_config(spec, world_size=self.world_size)
        trainer = Trainer(cfg)
        self.step = trainer.step
        control = dist.new_group(backend="gloo")  # stop flags, on CPU whatever the training backend
        stopped = False

        stall = _stall_hook(self.rank)
        hold = _hold_hook()

        def on_step(metrics: dict[str, Any]) -> None:
            self.step = metrics["step"]
            if stall is not None and self.step == stall:  # test hook: this rank hangs here
                self._beat("stalled-by-test-hook")
                time.sleep(3600)
            if self.rank == 0:
                self.report({"kind": "metrics", "rank": 0, "metrics": metrics})
            self._beat("train")
            if hold is not None and self.step >= hold[0]:  # test hook: wait for a file or a stop
                while not os.path.exists(hold[1]) and not self._stop.is_set():
                    self._beat("held-by-test-hook")
                    time.sleep(0.2)
            flag = torch.tensor([1.0 if self._stop.is_set() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
            if flag.item() > 0 and trainer.step < cfg.train.steps:
                raise StopRequested

        try:
            self._beat("train")
            trainer.run(on_step=on_step)
        except StopRequested:
            stopped = True
            self._beat("stopping")
            if trainer.checkpointer is not None and cfg.checkpoint.dir:
                trainer.checkpointer.finish()
                trainer.checkpointer.save(trainer.step, trainer.checkpoint_meta(), wait=True)
        except Exception as err:
            # Said before this rank leaves the process group: its peers fail next ("connection
            # closed"), so the earliest error event is the cause.
            self.report({"kind": "error", "rank": self.rank, "error": f"{type(err).__name__}: {err}",
                         "time": time.time()})  # fmt: skip
            raise
        finally:
            trainer.close()
            if dist.is_initialized():
                dist.destroy_process_group()
        self._beat("done")
        return {"rank": self.rank, "step": self.step, "stopped": stopped}


def _stall_hook(rank: int) -> int | None:
    """FOURFOLD_TEST_STALL=RANK:STEP:MARKER makes that rank hang after that step, once: the first
    rank to stall creates MARKER, and a restarted job runs through (fault-tolerance tests)."""
    parts = os.environ.get("FOURFOLD_TEST_STALL", "").split(":", 2)
    if len(parts) != 3 or int(parts[0]) != rank:
        return None
    try:
        with open(parts[2], "x"):
            pass
    except FileExistsError:
        return None
    return int(parts[1])


def _hold_hook() -> tuple[int, str] | None:
    """FOURFOLD_TEST_HOLD=STEP:FILE makes every rank wait after each step from STEP on, beating,
    until FILE exists or a stop is requested (elastic tests: a shrunk job cannot finish before
    it grows back)."""
    step, sep, path = os.environ.get("FOURFOLD_TEST_HOLD", "").partition(":")
    return (int(step), path) if sep else None


def _host_address() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except ImportError:
        return socket.gethostbyname(socket.gethostname())
