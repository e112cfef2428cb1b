"""The engine on a simulated 3-node Ray cluster (127.0.0.1): placement, parity with torchrun, no leaks."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel.config import build_config
from tests.dist.harness import BASE
from tests.ray.cluster import local_cluster
from workers.group import NAMESPACE, WorkerGroup
from workers.worker import RankRunner

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
NODE_CPUS = 2
NODE_GPUS = 2


@pytest.fixture(scope="module")
def cluster():
    # Two GPUs per node stand in for accelerators: Ray hands out their ids, torch (a CPU build
    # here) finds no CUDA, so a "GPU" job places and accounts like one and trains on gloo.
    with local_cluster(3, num_cpus=NODE_CPUS, num_gpus=NODE_GPUS) as c:
        yield c


def _cfg(*overrides: str, steps: int = 3):
    spec = json.loads(json.dumps(BASE))
    spec["train"]["steps"] = steps
    for item in overrides:
        key, _, value = item.partition("=")
        section, field = key.split(".")
        spec.setdefault(section, {})[field] = json.loads(value) if value[:1].isdigit() else value
    return build_config(spec)


def _assert_nothing_left(timeout_s: float = 30.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        cpus, gpus = ray.available_resources().get("CPU", 0), ray.available_resources().get("GPU", 0)
        if not actors and not groups and cpus == 3 * NODE_CPUS and gpus == 3 * NODE_GPUS:
            return
        assert time.monotonic() < deadline, f"left behind: actors {actors}, placement groups {groups}, CPUs free {cpus}"
        time.sleep(0.5)


def test_tp_groups_share_a_node_and_pp_stages_spread(cluster) -> None:
    group = WorkerGroup(_cfg("parallel.pp=2", "parallel.tp=2", steps=2), job_id="placed")
    try:
        group.start()
        nodes = {w["rank"]: w["node_id"] for w in group.where()}
        status = group.wait(timeout_s=240)
    finally:
        group.teardown()
    assert status.state == "succeeded", status.error
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # each TP group on one node
    assert nodes[0] != nodes[2]  # the two pipeline stages on different nodes
    assert nodes == {r.rank: r.node for r in group.plan.ranks}  # every rank where the plan put it
    assert [m["step"] for m in status.metrics] == [1, 2]
    assert {hb["phase"] for hb in status.heartbeats.values()} == {"done"} and len(status.heartbeats) == 4
    _assert_nothing_left()


def test_metrics_arrive_while_the_job_runs_and_a_hard_teardown_leaves_nothing(cluster, tmp_path: Path) -> None:
    """Rank 0's metrics reach the driver step by step, not at the end; heartbeats keep coming from a
    rank that is busy; and tearing a running job down mid-step (a cancel past its grace) leaves nothing."""
    release = tmp_path / "release"
    os.environ["FOURFOLD_TEST_HOLD"] = f"2:{release}"  # every rank waits after step 2 until `release` exists
    group = WorkerGroup(_cfg("parallel.dp=2", steps=4), job_id="streaming")
    try:
        group.start()
        seen: list[int] = []
        deadline = time.monotonic() + 120
        while 2 not in seen:
            status = group.poll(timeout_s=0.2)
            assert status.state == "running" and time.monotonic() < deadline, status
            seen += [m["step"] for m in status.metrics]
        assert seen == [1, 2]
        first = {r: hb["time"] for r, hb in group.poll().heartbeats.items()}
        time.sleep(2.5)  # held: no step ends, yet each rank's own thread keeps beating
        later = group.poll().heartbeats
        assert all(later[r]["time"] > first[r] for r in first) and later[0]["phase"] == "held-by-test-hook"
        assert group.hang(timeout_s=60) is None
    finally:
        os.environ.pop("FOURFOLD_TEST_HOLD")
        group.teardown()
    _assert_nothing_left()


def test_a_gpu_job_takes_one_gpu_per_rank_and_tp_groups_share_a_node(cluster) -> None:
    """resources.accelerator=gpu: bundles ask for GPUs, each rank gets its own GPU id from Ray, and a
    TP group's ranks sit on one node (whose two GPUs they take)."""
    cfg = _cfg("parallel.dp=2", "parallel.tp=2", "resources.accelerator=gpu", steps=2)
    group = WorkerGroup(cfg, job_id="gpus")
    try:
        group.start()
        assert [b for _, b in group.bundles] == [{"CPU": 2, "GPU": 2}] * 2
        where = {w["rank"]: w for w in group.where()}
        status = group.wait(timeout_s=240)
    finally:
        group.teardown()
    assert status.state == "succeeded", status.error
    assert all(len(w["gpus"]) == 1 for w in where.values())
    for a, b in ((0, 1), (2, 3)):  # a TP group: one node, two different GPUs of it
        assert where[a]["node_id"] == where[b]["node_id"] and where[a]["gpus"] != where[b]["gpus"]
    assert where[0]["node_id"] != where[2]["node_id"]
    _assert_nothing_left()


def _metrics(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("layout", [["parallel.dp=2", "parallel.tp=2"], ["parallel.pp=2", "parallel.tp=2"]],
                         ids=["dp2-tp2", "pp2-tp2"])  # fmt: skip
def test_same_losses_as_torchrun(cluster, layout: list[str], tmp_path: Path) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({**BASE, "train": {**BASE["train"], "steps": 3}}))
    sets = [arg for item in layout for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    ray_run = subprocess.run(
        [sys.executable, "-m", "workers.run", "--config", str(spec), *sets, "--metrics-file", str(tmp_path / "ray.jsonl")],
        env={**env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert ray_run.returncode == 0, ray_run.stderr[-3000:]
    assert "4 ranks on " in ray_run.stdout  # the layout Ray ran is the one asked for
    torchrun = subprocess.run(
        [sys.executable, "-m", "parallel.train", "--nproc-per-node", "4", "--config", str(spec), *sets,
         "--metrics-file", str(tmp_path / "torchrun.jsonl")],
        env={**env, "MASTER_ADDR": "127.0.0.1"}, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    got, want = _metrics(tmp_path / "ray.jsonl"), _metrics(tmp_path / "torchrun.jsonl")
    assert len(got) == len(want) == 3
    for step, (a, b) in enumerate(zip(got, want, strict=True), start=1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: Ray {a} vs torchrun {b}"
    _assert_nothing_left()


def test_explain_json_starts_nothing(cluster) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "workers.run", "--set", "parallel.dp=2", "--set", "parallel.tp=2", "--explain", "--json"],
        env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert [set(r) for r in plan] == [{"rank", "node", "bundle", "pp", "dp", "cp", "tp"}] * 4
    assert plan[0]["node"] == plan[1]["node"] and plan[2]["node"] == plan[3]["node"]
    refused = subprocess.run(
        [sys.executable, "-m", "workers.run", "--set", "parallel.tp=4", "--explain"],
        env={**os.environ, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "parallel.tp=4 needs 4 CPU slots on one node; the largest node has 2" in refused.stderr
    _assert_nothing_left()


def test_bad_input_is_refused_before_the_cluster_is_asked(cluster, tmp_path: Path) -> None:
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    run = [sys.executable, "-m", "workers.run"]
    missing = subprocess.run([*run, "--set", "data.source=text", "--set", "data.path=/nonexistent/corpus"],
                             env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert missing.stderr.startswith("fourfold: config error: data.path") and "/nonexistent/corpus" in missing.stderr
    usage = subprocess.run([*run, "--json"], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert usage.returncode == 2 and "--json goes with --explain" in usage.stderr
    _assert_nothing_left()


def test_stopped_job_saves_a_checkpoint_and_leaves_nothing(cluster, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    group = WorkerGroup(_cfg("parallel.dp=2", f"checkpoint.dir={ckpt}", steps=200), job_id="cancelled")
    try:
        group.start()
        deadline = time.monotonic() + 120
        while not any(hb["step"] >= 1 for hb in group.poll().heartbeats.values()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        status = group.stop(timeout_s=120)
    finally:
        group.teardown()
    assert status.state == "stopped"
    steps = {r["step"] for r in group.results}
    assert len(steps) == 1 and 1 <= min(steps) < 200  # every rank stopped after the same step
    assert (ckpt / f"step-{min(steps):08d}" / "meta.json").exists()
    _assert_nothing_left()


def test_failed_worker_is_reported_and_cleaned_up(cluster) -> None:
    class FailingRunner(RankRunner):  # rank 1 raises after step 1; the others wait in a collective
        def _beat(self, phase: str) -> None:
            super()._beat(phase)
            if self.rank == 1 and phase == "train" and self.step == 1:
                raise RuntimeError("injected failure on rank 1")

    group = WorkerGroup(_cfg("parallel.dp=2", "parallel.tp=2", steps=5), job_id="failing", runner_cls=FailingRunner)
    try:
        group.start()
        status = group.wait(timeout_s=240)
    finally:
        group.teardown()
    assert status.state == "failed"
    assert "injected failure on rank 1" in status.error
    _assert_nothing_left()


def test_no_room_times_out_and_reserves_nothing(cluster) -> None:
    """The plan fits the cluster's totals, but 2 CPUs are taken: all or nothing, then a clear refusal."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from workers.placement import PlacementError

    other = placement_group([{"CPU": 2}], name="someone-else")
    ray.get(other.ready(), timeout=60)
    try:
        group = WorkerGroup(_cfg("parallel.dp=6", "train.global_batch=12"), job_id="no-room", ready_timeout_s=3)
        with pytest.raises(PlacementError, match=r"the cluster has no room for 3 node-sized blocks .* within 3 s"):
            group.start()
        assert ray.available_resources().get("CPU", 0) == 3 * NODE_CPUS - 2  # nothing of ours held
    finally:
        remove_placement_group(other)
    _assert_nothing_left()


def _listening() -> list[tuple[str, str]]:
    """(process name, local address) of every TCP socket in LISTEN state, read from /proc."""
    import glob

    owners: dict[str, str] = {}
    for fd in glob.glob("/proc/[0-9]*/fd/*"):
        try:
            target = os.readlink(fd)
            if target.startswith("socket:["):
                owners[target[8:-1]] = Path(fd).parents[1].joinpath("comm").read_text().strip()
        except OSError:
            continue
    out = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address = fields[1].split(":")[0]
            assert len(address) == width
            if fields[9] in owners:
                out.append((owners[fields[9]], address))
    return out


LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def test_ray_and_the_ranks_listen_on_loopback_only(cluster, tmp_path: Path) -> None:
    """Every server the simulated cluster started (GCS, raylets, workers), and every one a job's
    ranks opened (the rendezvous store, gloo), is bound to 127.0.0.1: checked while the ranks
    of a job are alive, held after their first step."""
    release = tmp_path / "release"
    os.environ["FOURFOLD_TEST_HOLD"] = f"1:{release}"
    group = WorkerGroup(_cfg("parallel.dp=2", steps=2), job_id="loopback")
    try:
        group.start()
        deadline = time.monotonic() + 120
        while not any(m["step"] == 1 for m in group.poll(timeout_s=0.2).metrics):
            assert time.monotonic() < deadline, "the job did not train its first step"
        ours = [(name, addr) for name, addr in _listening() if "ray" in name or name in ("gcs_server", "raylet")]
        assert any(name == "ray::RankRunner" for name, _ in ours), ours  # the rendezvous store, at least
        assert all(addr in LOOPBACK for _, addr in ours), [x for x in ours if x[1] not in LOOPBACK]
        release.touch()
        assert group.wait(timeout_s=120).state == "succeeded"
    finally:
        os.environ.pop("FOURFOLD_TEST_HOLD")
        group.teardown()
    _assert_nothing_left()
