"""Elastic data parallelism: a node is removed mid-run from a 2-node cluster (1 CPU each); the job
(dp=2, dp_min=1) restarts at dp=1 from its checkpoint; a node is added back and the job grows to
dp=2 again; its losses stay those of an uninterrupted run throughout."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from service.store import Store
from tests.e2e.test_fault_tolerance import losses, spec, wait


def _until(check, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.3)


pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    tmp = tmp_path_factory.mktemp("elastic")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    with TestClient(create_app(Settings(data_dir=tmp, poll_s=0.2), supervise=True, store=store)) as client:
        yield cluster, client, store
    store.close()
    ray.shutdown()
    cluster.shutdown()


def test_node_lost_job_shrinks_then_grows_back(env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    cluster, client, store = env
    ref = client.post("/v1/jobs", json=spec("uninterrupted", 16)).json()["id"]
    assert wait(client, ref, {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"

    # From step 6 on the ranks wait after every step until `release` exists or a stop is requested:
    # the shrunk attempt cannot finish before the supervisor grows it back, however fast it runs.
    release = tmp_path / "release"
    monkeypatch.setenv("FOURFOLD_TEST_HOLD", f"6:{release}")
    elastic = spec("elastic", 16, tmp_path / "ckpt", every=2)
    elastic["parallel"]["dp_min"] = 1
    job = client.post("/v1/jobs", json=elastic).json()["id"]
    wait(client, job, {"RUNNING"}, step=6)
    rank1 = ray.get_actor(f"fourfold:{job}:1", namespace="fourfold")
    node_id = ray.get(rank1.where.remote())["node_id"]
    node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
    cluster.remove_node(node)

    def shrunk():
        return any("(elastic; the spec asks dp=2)" in e["message"] for e in client.get(f"/v1/jobs/{job}/events").json())

    _until(shrunk)
    step_at_shrink = wait(client, job, {"RUNNING"})["step"] or 0
    cluster.add_node(num_cpus=1)  # room for dp=2 again

    def grew_back():
        return any("room for dp=2 again" in e["message"] for e in client.get(f"/v1/jobs/{job}/events").json())

    _until(grew_back)
    release.touch()
    done = wait(client, job, {"SUCCEEDED", "FAILED"}, timeout_s=300)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    events = client.get(f"/v1/jobs/{job}/events").json()
    assert any("at dp=1 (elastic; the spec asks dp=2)" in e["message"] for e in events)
    grew = [e for e in events if "room for dp=2 again" in e["message"]]
    assert grew, [e["message"] for e in events]
    assert step_at_shrink < 16
    assert [a.outcome for a in store.attempts(job)] == ["failed", "stopped", "succeeded"]
    want, got = losses(client, ref), losses(client, job)
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert abs(got[step] - want[step]) <= 1e-4, (step, got[step], want[step])
