"""Run the engine in N local processes (gloo on loopback, one thread each) and collect results.

Each rank builds a `Trainer` exactly as `python -m parallel.train` would; rank 0
saves the per-step metrics and the full (gathered) weights for the test to compare.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

BASE: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "train": {
        "steps": 5,
        "global_batch": 8,
        "micro_batch": 2,
        "seq_len": 32,
        "lr": 1e-3,
        "warmup_steps": 1,
        "seed": 0,
        "grad_clip": 1.0,
        # AdamW divides by sqrt(v) + eps: for a gradient element that is ~0 up to rounding, the
        # default 1e-8 turns rounding noise (different summation order under TP) into an update
        # of up to lr (seen: one element of 12,288 off by 1.4e-5 on an AMD EPYC). 1e-6 damps
        # that noise without touching the math the layouts must agree on.
        "eps": 1e-6,
    },
    "data": {"source": "synthetic"},
    "metrics": {"peak_tflops": 1.0},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Stop(Exception):
    pass


def _stop_after(step: int):  # noqa: ANN202
    def check(metrics: dict) -> None:
        if metrics["step"] >= step:
            raise _Stop

    return check


def _memory_probe(trainer: Any) -> dict[str, int]:
    """Wrap the optimizer so the bytes of parameters, gradients and optimizer states are sampled
    inside the step: after each micro-batch's backward (before its gradients are reduced, so
    ZeRO-2's whole gradients are seen), after each reduction, and around the update itself.
    Returns the dict that will hold each kind's peak; bytes count each storage once (slices and
    views of one buffer share it)."""
    from parallel.data_parallel import _local

    opt, peak = trainer.optimizer, {"params": 0, "grads": 0, "optimizer": 0}

    def unique_bytes(ts: list[torch.Tensor]) -> int:
        seen = {_local(t).untyped_storage().data_ptr(): _local(t).untyped_storage().nbytes() for t in ts}
        return sum(seen.values())

    def sample() -> None:
        held = {
            "params": unique_bytes([p for m in trainer.parts for p in m.parameters()]),
            "grads": unique_bytes(opt.grad_tensors()),
            "optimizer": unique_bytes(opt.state_tensors()),
        }
        for kind, n in held.items():
            peak[kind] = max(peak[kind], n)

    def sampled(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sample()
            try:
                return fn(*args, **kwargs)
            finally:
                sample()

        return wrapper

    opt.after_backward = sampled(opt.after_backward)
    opt.opt.step = sampled(opt.opt.step)  # gradients attached and clipped; states after the update
    return peak


def _worker(rank: int, world: int, port: int, jobs: list[tuple[list[str], str, str | None, int | None]]) -> None:
    """Run each (overrides, out, extra, stop_after) job in turn on one process group: a batch of
    layouts of one world size pays the processes' start and torch's import once."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    for overrides, out, extra, stop_after in jobs:
        _run_one(rank, world, overrides, out, extra, stop_after)
    dist.destroy_process_group()


def _run_one(rank: int, world: int, overrides: list[str], out: str, extra: str | None, stop_after: int | None) -> None:
    import copy

    import torch.distributed as dist

    from parallel.config import build_config
    from parallel.spec_files import apply_overrides
    from parallel.trainer import Trainer

    cfg = build_config(apply_overrides(copy.deepcopy(BASE), overrides), world_size=world)
    stop = _stop_after(stop_after) if stop_after else None
    trainer = Trainer(cfg)  # joins the process group on the first job, reuses it after
    initial = trainer.full_state_dict() if extra == "initial" else None  # the weights before step 1
    peak = _memory_probe(trainer) if extra == "memory" else None
    history: list[dict] = []
    # _Stop: an interruption after a step (and its checkpoint), as a killed job would see it
    with contextlib.suppress(_Stop):
        trainer.run(on_step=lambda m: (history.append(m), stop and stop(m)))
    if trainer.checkpointer is not None:
        trainer.checkpointer.finish()  # a background save of the last step lands, as at a graceful stop
    result: dict[str, Any] = {"history": history, "weights": trainer.full_state_dict(), "initial": initial}
    if peak is not None:
        all_mem: list[Any] = [None] * world
        dist.all_gather_object(all_mem, peak)
        result["memory"], result["memory_all"] = peak, all_mem
    if rank == 0:
        torch.save(result, out)
    trainer.close()


def run_layout(
    world: int, overrides: list[str], tmp: Path, extra: str | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """Train BASE + overrides on `world` ranks; return rank 0's history and full weights.
    stop_after=N interrupts the run after step N (its checkpoint, if due, is written).
    extra="initial" adds the weights before step 1; extra="memory" the peak bytes of
    parameters, gradients and optimizer states inside the step, per rank."""
    return run_layouts(world, {"one": overrides}, tmp, extra, stop_after)["one"]


def run_layouts(
    world: int, layouts: dict[str, list[str]], tmp: Path, extra: str | None = None, stop_after: int | None = None
) -> dict[str, dict[str, Any]]:
    """run_layout for several layouts of one world size, one after another in one set of processes."""
    outs = {
        name: str(tmp / f"result-{world}-{abs(hash(tuple(o)))}-{extra}-{stop_after}.pt") for name, o in layouts.items()
    }
    jobs = [(o, outs[name], extra, stop_after) for name, o in layouts.items()]
    mp.start_processes(_worker, args=(world, free_port(), jobs), nprocs=world, start_method="spawn")
    return {name: torch.load(out, weights_only=False) for name, out in outs.items()}


class LayoutResults:
    """Results of a table {name: (world, overrides)}, computed on first use a whole world size at
    a time (one set of processes per world size instead of one per layout)."""

    def __init__(self, table: dict[str, tuple[int, list[str]]], tmp: Path) -> None:
        self.table, self.tmp, self.done = table, tmp, {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self.done:
            world = self.table[name][0]
            todo = {n: o for n, (w, o) in self.table.items() if w == world and n not in self.done}
            self.done |= run_layouts(world, todo, self.tmp)
        return self.done[name]


def compare(ref: dict[str, Any], got: dict[str, Any], loss_rtol: float = 1e-4, weight_atol: float = 1e-5) -> None:
    """Assert the per-step losses and the final weights match the single-process run."""
    ref_losses = [m["loss"] for m in ref["history"]]
    got_losses = [m["loss"] for m in got["history"]]
    assert len(ref_losses) == len(got_losses)
    for step, (a, b) in enumerate(zip(ref_losses, got_losses, strict=True), start=1):
        assert abs(a - b) <= loss_rtol * abs(a), f"step {step}: loss {b} vs single-process {a}"
    assert ref["weights"].keys() == got["weights"].keys()
    for name, w in ref["weights"].items():
        diff = (w - got["weights"][name]).abs().max().item()
        assert diff <= weight_atol, f"{name}: max abs weight difference {diff:.2e} > {weight_atol}"


def _call(rank: int, world: int, port: int, fn: Any, args: tuple, out: str, timeout_s: float) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    try:
        torch.save(fn(rank, world, *args), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(fn: Any, world: int, tmp: Path, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Run fn(rank, world, *args) on `world` gloo ranks; return each rank's return value."""
    out = str(tmp / f"spawn-{fn.__name__}-{world}-{free_port()}")
    mp.start_processes(_call, args=(world, free_port(), fn, args, out, timeout_s), nprocs=world, start_method="spawn")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
