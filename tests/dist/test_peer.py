"""Recovery from a live replica (parallel/peer.py), on real process groups: after step 3 every rank
leaves its process group, one rank loses everything (a fresh process would hold only the seeded
weights), all join a new group on another port, the lost rank receives its state from a replica, and
steps 4-6 and the final weights equal one process's uninterrupted run."""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from parallel.config import build_config
from parallel.peer import plan_recovery
from parallel.spec_files import apply_overrides
from tests.dist.harness import BASE, _Stop, _stop_after, compare, free_port, run_layout

pytestmark = pytest.mark.dist

SIX = ["train.steps=6"]


def _worker(rank: int, world: int, ports: tuple[int, int], overrides: list[str], lose: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
    )  # fmt: skip
    torch.set_num_threads(1)
    import torch.distributed as dist

    from parallel.peer import capture, exchange
    from parallel.trainer import Trainer

    cfg = build_config(apply_overrides(copy.deepcopy(BASE), [*SIX, *overrides]), world_size=world)
    history: list[dict] = []
    trainer = Trainer(cfg)
    with contextlib.suppress(_Stop):
        trainer.run(on_step=lambda m: (history.append(m), _stop_after(3)(m)))
    kept = None if rank == lose else capture(trainer)
    snaps = trainer.snapshots
    reports: list = [None] * world
    dist.all_gather_object(reports, snaps.report() if snaps else None)  # what the driver would collect
    trainer.close()
    dist.destroy_process_group()  # the old generation's groups are gone, as after a peer died
    os.environ["MASTER_PORT"] = str(ports[1])
    trainer = Trainer(cfg, resume=False)  # the seeded weights: what a new process starts from
    survivors = [r for r in range(world) if r != lose]
    plan = plan_recovery(
        cfg.parallel, dict.fromkeys(survivors, 3), {r: reports[r] for r in survivors} if snaps else None
    )
    assert plan.path == ("snapshot" if snaps else "peer"), plan.reason
    own, held = (snaps.own, snaps.held[1]) if snaps else (None, None)
    exchange(trainer, plan, kept, own, held)
    trainer.run(on_step=history.append)
    weights = trainer.full_state_dict()
    if rank == 0:
        torch.save({"history": history, "weights": weights, "transfers": plan.transfers}, out)
    trainer.close()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_layout(1, SIX, tmp_path_factory.mktemp("ref"))


@pytest.mark.parametrize(
    ("world", "layout", "lose"),
    [
        (2, ["parallel.dp=2"], 1),
        (4, ["parallel.dp=2", "parallel.tp=2", "parallel.zero=0"], 0),
        (4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero=3"], 1),
        (4, ["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"], 3),
    ],
    ids=["dp2", "dp2-tp2", "hsdp-zero3", "pp2-dp2"],
)
def test_lost_rank_recovers_from_replica(
    world: int, layout: list[str], lose: int, reference: dict, tmp_path: Path
) -> None:
    out = str(tmp_path / "peer.pt")
    mp.start_processes(
        _worker, args=(world, (free_port(), free_port()), layout, lose, out), nprocs=world, start_method="spawn"
    )
    got = torch.load(out, weights_only=False)
    assert [m["step"] for m in got["history"]] == [1, 2, 3, 4, 5, 6]
    assert any(dst == lose for _, dst in got["transfers"])
    compare(reference, got)


def test_lost_rank_recovers_its_experts_from_a_replica(tmp_path: Path) -> None:
    """dp=4, ep=2, ZeRO 0: rank 1's experts live on rank 3 only; the dense part on every rank."""
    moe = ["model.preset=tiny-moe"]
    reference = run_layout(1, [*SIX, *moe], tmp_path)
    out = str(tmp_path / "peer.pt")
    layout = [*moe, "parallel.dp=4", "parallel.ep=2"]
    mp.start_processes(_worker, args=(4, (free_port(), free_port()), layout, 1, out), nprocs=4, start_method="spawn")
    got = torch.load(out, weights_only=False)
    assert got["transfers"] == [(3, 1)]
    compare(reference, got)


def test_lost_share_without_replica_comes_back_from_the_in_memory_snapshots(reference: dict, tmp_path: Path) -> None:
    """ZeRO-1 over both dp ranks, snapshots every 2 steps: rank 1 loses everything after step 3; rank 0
    holds rank 1's snapshot of step 2, both go back to it and train steps 3-6 again."""
    out = str(tmp_path / "snap.pt")
    layout = ["parallel.dp=2", "parallel.zero=1", "checkpoint.memory_every=2"]
    mp.start_processes(_worker, args=(2, (free_port(), free_port()), layout, 1, out), nprocs=2, start_method="spawn")
    got = torch.load(out, weights_only=False)
    assert [m["step"] for m in got["history"]] == [1, 2, 3, 3, 4, 5, 6]
    assert got["transfers"] == [(0, 1)]
    got["history"] = [m for i, m in enumerate(got["history"]) if i != 2]  # the first step 3, trained again
    compare(reference, got)


def test_plan_names_the_rank_without_replica() -> None:
    """ZeRO-1 over every dp rank: rank 1's optimizer share lives nowhere else -> checkpoint."""
    spec = apply_overrides(copy.deepcopy(BASE), ["parallel.dp=2", "parallel.zero=1"])
    plan = plan_recovery(build_config(spec, world_size=2).parallel, {0: 3})
    assert plan.path == "checkpoint"
    assert "rank 1" in plan.reason and "ZeRO 1" in plan.reason
