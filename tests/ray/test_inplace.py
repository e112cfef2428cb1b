"""In-place recovery on a simulated 3-node Ray cluster (workers/inplace.py): a rank's process is
SIGKILLed while its job trains; the other ranks' processes stay, the lost state comes from a live
replica (or the newest checkpoint where none holds it), warm spares take the dead rank's place and
are replenished, and nothing is left on the cluster afterwards. A failure during the recovery itself is
tested through the service (tests/e2e/test_fault_tolerance.py), which then restarts the job whole."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from parallel.config import build_config
from tests.dist.harness import BASE, run_layout
from tests.ray.cluster import local_cluster
from workers.group import NAMESPACE, WorkerGroup

pytestmark = pytest.mark.ray
NODE_CPUS = 2
STEPS = 8


@pytest.fixture(scope="module")
def cluster():
    with local_cluster(3, num_cpus=NODE_CPUS) as c:
        yield c


def _cfg(*overrides: str, tmp: Path | None = None) -> Any:
    spec = json.loads(json.dumps(BASE))
    spec["train"]["steps"] = STEPS
    spec["parallel"] = {"dp": 2}
    if tmp is not None:
        spec["checkpoint"] = {"dir": str(tmp / "ckpt"), "every": 2}
    for item in overrides:
        key, _, value = item.partition("=")
        section, field = key.split(".")
        spec.setdefault(section, {})[field] = json.loads(value)
    return build_config(spec)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[int, float]]:
    """Losses of uninterrupted runs of the same layouts (the engine in local processes, no Ray)."""
    tmp = tmp_path_factory.mktemp("ref")
    out = {}
    for name, layout in {"zero0": [], "zero1": ["parallel.zero=1"]}.items():
        result = run_layout(2, [f"train.steps={STEPS}", "parallel.dp=2", *layout], tmp)
        out[name] = {m["step"]: m["loss"] for m in result["history"]}
    return out


def _killed_run(
    cfg: Any, job_id: str, step: int, tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[dict], list[dict], list[dict], dict[int, int], dict[int, int], list[int], list[int]]:
    """Run the job; once `step`'s metrics arrived (every rank then waits on the hold hook) SIGKILL
    rank 1's process and let the others go on, then poll to the end. Returns (last status, metrics
    before the kill, metrics after, in-place recovery records, pids before, pids after, the spares'
    pids at the start, the spares' pids at the end)."""
    release = tmp / "release"
    monkeypatch.setenv("FOURFOLD_TEST_HOLD", f"{step}:{release}")
    group = WorkerGroup(cfg, job_id=job_id)
    before, after, records = [], [], []
    try:
        group.start()
        spares = _spare_pids(group)
        deadline = time.monotonic() + 180
        while not any(m["step"] >= step for m in before):
            status = group.poll(timeout_s=0.5)
            assert status.state == "running", status.error
            before += status.metrics
            assert time.monotonic() < deadline, "the job did not reach the step to kill at"
        pids = {w["rank"]: w["pid"] for w in group.where()}
        os.kill(pids[1], signal.SIGKILL)
        release.touch()
        deadline = time.monotonic() + 240
        while True:
            status = group.poll(timeout_s=0.5)
            after += status.metrics
            records += [status.recovered] if status.recovered is not None else []
            if status.state != "running":
                break
            assert time.monotonic() < deadline, "the job did not finish"
        pids_after = {w["rank"]: w["pid"] for w in group.where()}
        spares_after = _spare_pids(group)
    finally:
        group.teardown()
    assert status.state == "succeeded", status.error
    _assert_nothing_left()
    return status, before, after, records, pids, pids_after, spares, spares_after


def _assert_nothing_left(timeout_s: float = 30.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        cpus = ray.available_resources().get("CPU", 0)
        if not actors and not groups and cpus == 3 * NODE_CPUS:
            return
        assert time.monotonic() < deadline, f"left behind: actors {actors}, placement groups {groups}, CPUs {cpus}"
        time.sleep(0.5)


def _assert_losses(metrics: list[dict], want: dict[int, float]) -> None:
    for m in metrics:
        assert abs(m["loss"] - want[m["step"]]) <= 1e-6 * abs(want[m["step"]]), (m["step"], m["loss"], want)


def test_killed_rank_recovers_from_its_replica_and_the_survivor_keeps_its_process(
    cluster, reference, tmp_path: Path, monkeypatch
) -> None:
    _, before, after, records, pids, pids_after, _, _ = _killed_run(_cfg(), "peer", 4, tmp_path, monkeypatch)
    (record,) = records
    assert record["path"] == "peer" and record["step"] == 4 and record["ranks"] == [1], record
    assert "worker process died: rank 1" in record["cause"]
    steps = [m["step"] for m in before + after]
    assert steps == list(range(1, STEPS + 1)), steps  # every step once: none redone, none lost
    assert pids_after[0] == pids[0] and pids_after[1] != pids[1]  # the survivor is the same process
    _assert_losses(before + after, reference["zero0"])


def test_no_replica_of_the_lost_share_falls_back_to_the_checkpoint_in_place(
    cluster, reference, tmp_path: Path, monkeypatch
) -> None:
    """ZeRO-1 over both dp ranks: rank 1's optimizer share exists nowhere else, so every rank reloads
    step 4's checkpoint (the processes still stay) and step 5 is trained again."""
    cfg = _cfg("parallel.zero=1", tmp=tmp_path)
    _, before, after, records, pids, pids_after, _, _ = _killed_run(cfg, "ckpt", 5, tmp_path, monkeypatch)
    (record,) = records
    assert record["path"] == "checkpoint" and "rank 1" in record["reason"] and "ZeRO 1" in record["reason"]
    assert [m["step"] for m in after] == list(range(5, STEPS + 1))  # resumed from step 4's checkpoint
    assert pids_after[0] == pids[0]
    _assert_losses(before + after, reference["zero1"])


def test_no_replica_but_in_memory_snapshots_goes_back_to_the_snapshot_without_storage(
    cluster, reference, tmp_path: Path, monkeypatch
) -> None:
    """The same ZeRO-1 job without checkpoints, with a snapshot every 2 steps (each rank's copy on the
    other rank's node): rank 1 comes back from the copy rank 0 holds, both at step 4, step 5 again."""
    cfg = _cfg("parallel.zero=1", "checkpoint.memory_every=2")
    assert cfg.checkpoint.dir is None
    _, before, after, records, pids, pids_after, _, _ = _killed_run(cfg, "snap", 5, tmp_path, monkeypatch)
    (record,) = records
    assert record["path"] == "snapshot" and record["step"] == 4, record
    assert [m["step"] for m in after] == list(range(5, STEPS + 1))
    assert pids_after[0] == pids[0]
    _assert_losses(before + after, reference["zero1"])


def test_a_warm_spare_takes_the_place_and_is_replenished(cluster, reference, tmp_path: Path, monkeypatch) -> None:
    cfg = _cfg("restart.spares=1")
    status, before, after, records, pids, pids_after, spares, spares_after = _killed_run(
        cfg, "spare", 3, tmp_path, monkeypatch
    )
    (record,) = records
    assert record["spares_used"] == 1 and record["path"] == "peer"
    assert len(spares) == 1 and pids_after[1] == spares[0] and pids_after[0] == pids[0]  # the spare became rank 1
    assert len(spares_after) == 1 and spares_after[0] not in (pids[1], spares[0])  # a new one waits
    _assert_losses(before + after, reference["zero0"])


def _spare_pids(group: WorkerGroup) -> list[int]:
    import ray

    return [ray.get(actor.where.remote(), timeout=60)["pid"] for actor, _, _ in group.spares]
