"""One rank of a job: joins the process group and runs the engine's trainer.

`RankRunner` is plain Python (no Ray inside); `workers.group` wraps it in a Ray actor,
one per rank. Everything it tells the driver goes through `report(event)`, a callable
the driver hands in (a Ray queue there, a list in a test):

    {"kind": "metrics", "rank": 0, "metrics": {...}}      rank 0, after every step
    {"kind": "heartbeat", "rank": r, "step": s, "phase": "forward-backward", "time": t}
    {"kind": "error", "rank": r, "error": "RuntimeError: ...", "time": t}        a rank that raised
    {"kind": "marks", "rank": r, "marks": {"imported": t, "rendezvous": t, "state": t}}   once per generation
    {"kind": "lost", "rank": r, "clean_step": s, "time": t}    its step failed; it waits for rejoin()

The marks are wall-clock moments of the rank's start-up (torch and the engine imported, the process
groups joined, the model built and the checkpoint loaded), from which the service tells where a
recovery's seconds went (`service.recovery.PHASES`).

Heartbeats come from a thread of the rank's own, every few seconds and at every change
of state, so a rank that is busy (a long step, loading a checkpoint) still beats, and one
that is stuck keeps saying where: `starting` (process group, model, checkpoint load),
then the trainer's phase (`data`, `forward-backward`, `optimizer`, `loss`, `checkpoint`,
`idle`), `stopping` and `done`. `workers.health` judges them.

When a peer's process dies (restart.in_place), a rank's step fails on its next collective with that
peer; the rank keeps its state in memory (`parallel.peer.capture`), leaves its process groups, reports
`lost` with the step its state is at, and waits for the driver's `rejoin`: the next generation's
rendezvous and recovery plan. It then builds a fresh trainer in the new groups and restores its own
state, or receives a replica's, or loads the newest checkpoint, and trains on. A replacement process
is started with that plan (`run(..., recovery=...)`); a warm spare first `assume`s the rank.

Stopping is cooperative and happens at a step boundary on every rank at once: after each
step the ranks all-reduce their stop flags on a small gloo group, so a request that reaches
one rank stops all of them after the same step. With `checkpoint.dir` set, a stopped job
first saves a checkpoint of that step, so nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

Report = Callable[[dict[str, Any]], None]


class StopRequested(Exception):
    """Raised inside the training loop to leave it at a step boundary."""


class RankRunner:
    def __init__(self, rank: int, world_size: int, local_rank: int, report: Report) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.report = report
        self._stop = threading.Event()
        self._done = threading.Event()
        self.step, self.phase = 0, "starting"
        self.trainer: Any = None
        self._at_checkpoint = False
        self._store: Any = None  # rank 0's rendezvous store, from open_rendezvous()
        self._rejoin: dict[str, Any] | None = None  # the next generation, from rejoin()
        self._rejoin_event = threading.Event()
        # Import torch and the engine at once, in the background: a new rank process (a restart's
        # included) spends seconds on these imports, which then overlap with the driver's launch
        # (the other actors starting, the rendezvous opening) instead of following it. run() and
        # open_rendezvous() import the same modules, so they wait for this thread first (`_imported`):
        # two threads importing torch.distributed at once can deadlock on its circular imports, which
        # Python breaks by failing one of them with an ImportError (seen: a spare's prepare()).
        self._imports = threading.Thread(target=_warm_imports, name="fourfold-imports", daemon=True)
        self._imports.start()

    def _imported(self) -> None:
        self._imports.join()

    def where(self) -> dict[str, Any]:
        """This rank's node (Ray node id when under Ray), host address, process id, and the GPU ids
        Ray assigned it (empty for a CPU rank)."""
        node_id, gpus = None, []
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
                gpus = [str(g) for g in ray.get_gpu_ids()]
        except ImportError:
            pass
        return {"rank": self.rank, "node_id": node_id, "host": _host_address(), "pid": os.getpid(), "gpus": gpus}

    def open_rendezvous(self, timeout_s: float) -> int:
        """Rank 0: open the job's rendezvous store and keep it until run() joins the process group
        through it; returns its port for the other ranks. The socket is bound here, to this node's
        address only (127.0.0.1 on a local cluster) and on a port the system picks, and handed to
        the store: a store left to bind by itself listens on every interface, and a free port
        looked up first and bound later (env://) can be taken by another process in between."""
        self._imported()
        import torch.distributed as dist

        host = _host_address()
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        listener.bind((host, 0))
        listener.listen()
        port = listener.getsockname()[1]
        self._store = dist.TCPStore(
            host, port, self.world_size, is_master=True, timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False, master_listen_fd=listener.detach(),
        )  # fmt: skip
        return port

    def request_stop(self, at_checkpoint: bool = False) -> None:
        """Stop after the current step (saving a checkpoint of it when checkpoints are on), or with
        `at_checkpoint` after the next step that saves one anyway (none extra is written)."""
        self._at_checkpoint = at_checkpoint
        self._stop.set()

    def _beat(self, phase: str) -> None:
        """Enter `phase` and say so now (`train` means: whatever the trainer is doing)."""
        self.phase = phase
        self._send_beat()

    def _send_beat(self) -> None:
        trainer = self.trainer
        phase = trainer.phase if trainer is not None and self.phase == "train" else self.phase
        step = trainer.step if trainer is not None else self.step
        self.report({"kind": "heartbeat", "rank": self.rank, "step": step, "phase": phase, "time": time.time()})

    def _beat_every(self, interval_s: float) -> None:
        while not self._done.wait(interval_s):
            try:
                self._send_beat()
            except Exception:  # the driver's queue is gone; the job is being torn down
                return

    def run(
        self,
        spec: dict[str, Any],
        master_addr: str,
        master_port: int,
        env: dict[str, str] | None = None,
        storage: dict[str, Any] | None = None,
        recovery: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Train the job to its end (or a requested stop); returns a summary. With `storage` (a
        `workers.confine.Grant` as a dict) the spec's paths are checked against it first. With
        `recovery` (a `parallel.peer.RecoveryPlan` as a dict) this process replaces a dead rank."""
        os.environ.update(env or {})
        os.environ.update(
            MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(self.local_rank),
        )  # fmt: skip
        self._imported()
        import torch

        from parallel.config import build_config
        from parallel.peer import capture
        from workers.confine import Grant, recheck

        marks = {"imported": time.time()}
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        hang_timeout_s = float(spec.get("restart", {}).get("hang_timeout_s", 300))
        beats = threading.Thread(target=self._beat_every, args=(min(2.0, hang_timeout_s / 5),), daemon=True)
        self._beat("starting")
        beats.start()
        stopped, kept, snaps = False, None, None
        try:
            cfg = build_config(spec, world_size=self.world_size)
            if storage is not None:  # a symlink swapped since the submission fails here, before any open
                recheck(spec, Grant.from_dict(storage))
            while True:  # one pass per process-group generation: the first, then one per in-place recovery
                try:
                    self._join(cfg, master_addr, master_port, recovery, kept, marks, snaps)
                    kept = snaps = None
                    self._train(cfg)
                    break
                except StopRequested:
                    raise
                except Exception as err:
                    self._report_error(err)
                    if not cfg.restart.in_place or self._stop.is_set() or not _peer_failure(err):
                        raise  # an error of the rank's own ends the job at once: retrying in place would repeat it
                    kept = capture(self.trainer) or kept  # a pass that failed before its state was whole keeps the last
                    snaps = getattr(self.trainer, "snapshots", None) or snaps  # likewise its in-memory snapshots
                    self._leave()
                    self.report({"kind": "lost", "rank": self.rank, "clean_step": kept.step if kept else None,
                                 "snapshots": snaps.report() if snaps else None, "time": time.time()})  # fmt: skip
                    recovery = self._await_rejoin(max(60.0, hang_timeout_s))
                    if recovery is None:  # the driver gave the in-place recovery up: the job restarts
                        raise
                    master_addr, master_port = recovery["master"], recovery["port"]
                    marks = {"imported": time.time()}
        except StopRequested:
            stopped = True
            self._beat("stopping")
            trainer = self.trainer
            if trainer.checkpointer is not None and cfg.checkpoint.dir:
                trainer.checkpointer.finish()
                trainer.checkpointer.save(trainer.step, trainer.checkpoint_meta(), wait=True)  # no-op if saved
        except Exception as err:
            if not getattr(err, "_fourfold_reported", False):
                self._report_error(err)
            raise
        finally:
            self._done.set()
            self._leave()
        self.phase = "done"
        self._send_beat()
        return {"rank": self.rank, "step": self.step, "stopped": stopped}

    def _report_error(self, err: Exception) -> None:
        # Said before this rank leaves the process group: its peers fail next ("connection
        # closed"), so the earliest error event is the cause.
        self.report({"kind": "error", "rank": self.rank, "error": f"{type(err).__name__}: {err}", "time": time.time()})
        err._fourfold_reported = True  # type: ignore[attr-defined]

    def _join(
        self, cfg: Any, master_addr: str, master_port: int, recovery: dict[str, Any] | None, kept: Any,
        marks: dict[str, float], snaps: Any = None,
    ) -> None:  # fmt: skip
        """Join this generation's process groups and build the trainer: from the spec's checkpoint
        (the first generation), from the kept and received state, or from the newest checkpoint."""
        import torch.distributed as dist

        from parallel.mesh import init_distributed
        from parallel.peer import RecoveryPlan, exchange
        from parallel.trainer import Trainer

        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.trainer = None
        self._beat("starting")
        if self._store is None:  # ranks > 0: clients of rank 0's store
            wait = timedelta(seconds=cfg.parallel.timeout_s)
            self._store = dist.TCPStore(master_addr, master_port, self.world_size, is_master=False, timeout=wait)
        init_distributed(cfg.parallel.timeout_s, store=self._store)
        marks["rendezvous"] = time.time()
        plan = RecoveryPlan.from_dict(recovery) if recovery is not None else None
        if plan is None:
            trainer = Trainer(cfg)
        elif plan.path in ("peer", "snapshot"):
            trainer = Trainer(cfg, resume=False)
            _peer_fail_hook(plan, self.rank)
            own, held = (snaps.own, snaps.held[1] if snaps.held else None) if snaps else (None, None)
            exchange(trainer, plan, kept, own, held)
        else:
            trainer = Trainer(cfg, resume="auto" if cfg.checkpoint.dir else False)
        marks["state"] = time.time()
        self.report({"kind": "marks", "rank": self.rank, "marks": marks})
        self.trainer, self.step = trainer, trainer.step

    def _train(self, cfg: Any) -> None:
        import torch
        import torch.distributed as dist

        trainer = self.trainer
        control = dist.new_group(backend="gloo")  # stop flags, on CPU whatever the training backend
        stall, hold = _stall_hook(self.rank), _hold_hook()

        def on_step(metrics: dict[str, Any]) -> None:
            self.step = metrics["step"]
            if stall is not None and self.step == stall:  # test hook: this rank hangs here, once
                _mark_stalled()
                self._beat("stalled-by-test-hook")
                time.sleep(3600)
            if self.rank == 0:
                self.report({"kind": "metrics", "rank": 0, "metrics": metrics})
            self._beat("train")
            if hold is not None and self.step >= hold[0]:  # test hook: wait for a file or a stop
                self._beat("held-by-test-hook")
                while not os.path.exists(hold[1]) and not self._stop.is_set():
                    time.sleep(0.2)
                self._beat("train")
            c = cfg.checkpoint
            saved_now = bool(c.dir) and c.every > 0 and self.step % c.every == 0  # the same on every rank
            stop_now = self._stop.is_set() and (saved_now or not self._at_checkpoint or not c.dir or not c.every)
            flag = torch.tensor([1.0 if stop_now else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
            if flag.item() > 0 and trainer.step < cfg.train.steps:
                raise StopRequested

        self._beat("train")
        trainer.run(on_step=on_step)

    def _leave(self) -> None:
        """Close the trainer and leave every process group of this generation (the state the trainer
        held stays wherever `capture` kept references to it)."""
        import torch.distributed as dist

        trainer, self.trainer = self.trainer, None
        if trainer is not None:
            self.step = trainer.step
            with contextlib.suppress(Exception):
                trainer.close()
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        self._store = None

    # -- in-place recovery: the driver's side is workers.group.WorkerGroup._recover -------------
    def rejoin(self, recovery: dict[str, Any] | None) -> None:
        """Go on in a new process-group generation (`recovery`: where, and the RecoveryPlan as a dict),
        or with None give up and end run() with the failure."""
        self._rejoin = recovery
        self._rejoin_event.set()

    def _await_rejoin(self, timeout_s: float) -> dict[str, Any] | None:
        self._beat("recovering")
        got = self._rejoin_event.wait(timeout_s)
        self._rejoin_event.clear()
        recovery, self._rejoin = self._rejoin, None
        return recovery if got else None

    def assume(self, rank: int, local_rank: int) -> int:
        """A warm spare takes a rank's place (before run()); returns its process id."""
        self.rank, self.local_rank = rank, local_rank
        return os.getpid()

    def prepare(self, spec: dict[str, Any]) -> None:
        """A warm spare's work ahead of time: the engine imported and the model built on the meta
        device once, so what run() repeats is cached or quick."""
        self._imported()
        from parallel.config import build_config
        from parallel.parallelize import build_model
        from parallel.pipeline_parallel import stage_ids

        cfg = build_config(spec, world_size=self.world_size)
        build_model(cfg, stage_ids(0, cfg.parallel))


def _warm_imports() -> None:
    try:
        import torch.distributed  # noqa: F401

        import parallel.trainer  # noqa: F401
    except Exception:  # run() imports them again and reports what fails there
        pass


def _peer_failure(err: BaseException) -> bool:
    """Whether a step failed because of a peer (a dead process, a collective or store cut off), which
    an in-place recovery can mend, rather than because of this rank's own error."""
    import torch.distributed as dist

    text = str(err)
    markers = ("gloo/transport", "Connection closed", "Connection reset", "Broken pipe", "NCCL", "TCPStore")
    return isinstance(err, dist.DistError) or type(err).__name__ == "CommTimeout" or any(m in text for m in markers)


def _peer_fail_hook(plan: Any, rank: int) -> None:
    """FOURFOLD_TEST_PEER_FAIL=MARKER: the first rank to send state in a peer recovery dies there,
    once (it creates MARKER): a failure during the recovery itself (fault-tolerance tests)."""
    marker = os.environ.get("FOURFOLD_TEST_PEER_FAIL")
    if marker and not os.path.exists(marker) and plan.transfers and plan.transfers[0][0] == rank:
        with open(marker, "w") as f:
            f.write(str(time.time()))
        os._exit(9)


def _stall_hook(rank: int) -> int | None:
    """FOURFOLD_TEST_STALL=RANK:STEP:MARKER makes that rank hang after that step, once: it creates
    MARKER when it stalls, and a restarted job (MARKER there) runs through (fault-tolerance tests)."""
    parts = os.environ.get("FOURFOLD_TEST_STALL", "").split(":", 2)
    if len(parts) != 3 or int(parts[0]) != rank or os.path.exists(parts[2]):
        return None
    return int(parts[1])


def _mark_stalled() -> None:
    with open(os.environ["FOURFOLD_TEST_STALL"].split(":", 2)[2], "w") as f:
        f.write(str(time.time()))


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
