"""The whole service on a simulated 2-node Ray cluster: REST -> store -> scheduler -> Ray workers.

Four CPU slots in all (two nodes of two). Two-rank jobs: D (long) and A run at once; C waits
and is cancelled while queued; L (priority 0) then H (priority 10) wait; when A finishes H
starts first; D is cancelled while running (and saves a checkpoint); then L runs.
"""

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from service.store import Store

pytestmark = pytest.mark.ray
NODE_CPUS = 2


def _spec(name: str, steps: int, **extra) -> dict:
    return {
        "name": name,
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "seq_len": 32, "warmup_steps": 1},
        "metrics": {"peak_tflops": 1.0},
        **extra,
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    tmp = tmp_path_factory.mktemp("svc")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    with TestClient(create_app(Settings(data_dir=tmp, poll_s=0.2), supervise=True, store=store)) as client:
        yield client
    store.close()
    ray.shutdown()
    cluster.shutdown()


def _wait(api: TestClient, job_id: str, states: set[str], timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        assert time.monotonic() < deadline, f"job {job['name']} still {job['state']}: {job['failure_reason']}"
        time.sleep(0.3)


def test_jobs_run_queue_by_priority_and_cancel(api: TestClient, tmp_path: Path) -> None:
    import ray

    submit = lambda spec, prio=0: api.post("/v1/jobs", json={**spec, "priority": prio}).json()["id"]  # noqa: E731
    # The test hook FOURFOLD_TEST_HOLD=STEP:FILE, read when a job's ranks launch, makes them wait after
    # each step from STEP on until FILE exists or a stop is requested: D until it is cancelled, A until
    # the test releases it, so neither can finish early however fast the machine.
    release_a = tmp_path / "release-a"
    os.environ["FOURFOLD_TEST_HOLD"] = f"2:{tmp_path / 'never'}"
    d = submit(_spec("long", 400, checkpoint={"dir": "ckpt-d", "every": 1000}))  # under the job's directory
    _wait(api, d, {"RUNNING"})
    os.environ["FOURFOLD_TEST_HOLD"] = f"2:{release_a}"
    a = submit(_spec("short", 30))
    _wait(api, a, {"RUNNING"})
    del os.environ["FOURFOLD_TEST_HOLD"]
    c = submit(_spec("waits", 3))
    time.sleep(1)
    assert api.get(f"/v1/jobs/{c}").json()["state"] == "QUEUED"  # no room: the gang waits whole
    assert api.post(f"/v1/jobs/{c}/cancel").json()["state"] == "CANCELLED"
    low = submit(_spec("low", 3), 0)
    high = submit(_spec("high", 3), 10)
    time.sleep(1)
    assert api.get(f"/v1/jobs/{high}").json()["state"] == "QUEUED"
    release_high = tmp_path / "release-high"
    os.environ["FOURFOLD_TEST_HOLD"] = f"2:{release_high}"  # H (and L, once released) hold after step 2
    release_a.touch()

    assert _wait(api, a, {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"
    # Where its first step's seconds went since submission (it waited for release_a, in `first step`).
    start = [e["message"] for e in api.get(f"/v1/jobs/{a}/events").json() if e["kind"] == "start"]
    assert len(start) == 1 and start[0].startswith("first step ") and "s after submission: queued " in start[0]
    assert all(f"{phase} " in start[0] for phase in ("actors", "imports", "rendezvous", "state", "first step"))
    _wait(api, high, {"RUNNING"})
    time.sleep(1)
    assert api.get(f"/v1/jobs/{low}").json()["state"] == "QUEUED"  # submitted first, but lower priority
    release_high.touch()
    del os.environ["FOURFOLD_TEST_HOLD"]

    api.post(f"/v1/jobs/{d}/cancel")
    long_job = _wait(api, d, {"CANCELLED", "FAILED"})
    assert long_job["state"] == "CANCELLED", long_job["failure_reason"]
    for job_id in (high, low):
        assert _wait(api, job_id, {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"

    jobs = {j["id"]: j for j in api.get("/v1/jobs", params={"limit": 50}).json()["items"]}
    assert jobs[high]["started_at"] < jobs[low]["started_at"]
    for job_id, n in ((a, 30), (high, 3), (low, 3)):
        steps = [m["step"] for m in api.get(f"/v1/jobs/{job_id}/metrics").json()]
        assert steps == list(range(1, n + 1))
        assert any("loss" in line["line"] for line in api.get(f"/v1/jobs/{job_id}/logs").json())
    assert jobs[c]["attempts"] == 0
    stopped_at = api.get(f"/v1/jobs/{d}/metrics").json()[-1]["step"]
    ckpt_d = Path(api.get(f"/v1/jobs/{d}").json()["spec"]["checkpoint"]["dir"])
    assert ckpt_d.name == "ckpt-d" and ckpt_d.parent.name == d
    assert (ckpt_d / f"step-{stopped_at:08d}" / "meta.json").exists()  # the cancel lost nothing
    states = [e["to_state"] for e in api.get(f"/v1/jobs/{d}/events").json() if e["to_state"]]
    assert states == ["QUEUED", "STARTING", "RUNNING", "CANCELLED"]
    text = api.get("/metrics").text
    assert 'fourfold_jobs{state="SUCCEEDED"} 3.0' in text and 'fourfold_jobs{state="CANCELLED"} 2.0' in text

    cluster = api.get("/v1/cluster").json()  # what the scheduler sees: every node, nothing held now
    assert cluster["connected"] and cluster["running_jobs"] == []
    workers = [n for n in cluster["nodes"] if n["total"].get("CPU", 0) > 0]
    assert len(workers) == 2 and all(n["free"]["CPU"] == n["total"]["CPU"] == NODE_CPUS for n in workers)

    deadline = time.monotonic() + 30
    while True:  # nothing of ours left on the cluster
        actors = [x for x in ray.util.list_named_actors(all_namespaces=True) if x["namespace"] == "fourfold"]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not actors and not groups and ray.available_resources().get("CPU", 0) == 2 * NODE_CPUS:
            break
        assert time.monotonic() < deadline, (actors, groups)
        time.sleep(0.5)


def test_an_auto_layout_is_planned_on_the_live_cluster_and_trains(api: TestClient) -> None:
    spec = {**_spec("auto", 3), "parallel": "auto"}
    job = api.post("/v1/jobs", json=spec).json()
    assert job["spec"]["plan"]["ranks"] == 2 * NODE_CPUS  # every slot of the cluster at submit
    done = _wait(api, job["id"], {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    planned = [e for e in api.get(f"/v1/jobs/{job['id']}/events").json() if e["kind"] == "plan"]
    assert len(planned) == 1 and " on 2x2xcpu: fits with " in planned[0]["message"], planned
    p = done["spec"]["parallel"]
    assert done["spec"]["plan"]["auto"] == [] and p["dp"] * p["tp"] * p["pp"] * p["cp"] == 4 and p["tp"] <= 2
    assert planned[0]["message"].startswith(f"planned dp{p['dp']}")
    assert [m["step"] for m in api.get(f"/v1/jobs/{job['id']}/metrics").json()] == [1, 2, 3]
    seen = api.get(f"/v1/jobs/{job['id']}/prediction").json()
    assert seen["predicted"]["cluster"] == "2x2xcpu" and seen["predicted"]["tokens_per_s"] > 0
    assert seen["measured"]["steps"] == 3 and seen["measured"]["tokens_per_s"] > 0
