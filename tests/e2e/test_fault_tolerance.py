"""Failures on a simulated 2-node Ray cluster (2 CPUs each): killed worker, stalled rank, a job that
always fails, and the service itself killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from service.store import Store

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]


def spec(name: str, steps: int, ckpt: Path | None = None, every: int = 3, **restart) -> dict:
    out = {
        "name": name,
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "seq_len": 32, "warmup_steps": 1},
        "metrics": {"peak_tflops": 1.0},
        "restart": {"max_failures": 2, "backoff_s": 1, **restart},
    }
    if ckpt is not None:
        out["checkpoint"] = {"dir": str(ckpt), "every": every}
    return out


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        c.add_node(num_cpus=2)
    ray.init(address=c.address, log_to_driver=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def api(cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Store]]:
    tmp = tmp_path_factory.mktemp("ft")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    with TestClient(create_app(Settings(data_dir=tmp, poll_s=0.2), supervise=True, store=store)) as client:
        yield client, store
    store.close()


def wait(client, job_id: str, states: set[str], timeout_s: float = 240, step: int | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and (step is None or (job["step"] or 0) >= step):
            return job
        assert time.monotonic() < deadline, (
            f"{job['name']}: {job['state']} at step {job['step']} ({job['failure_reason']})"
        )
        time.sleep(0.2)


def losses(client, job_id: str) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in client.get(f"/v1/jobs/{job_id}/metrics").json()}


def test_killed_worker_restarts_from_checkpoint(api, tmp_path: Path) -> None:
    import ray

    client, store = api
    ref = client.post("/v1/jobs", json=spec("reference", 12)).json()["id"]
    job = client.post("/v1/jobs", json=spec("killed", 12, tmp_path / "ckpt", every=3)).json()["id"]
    wait(client, job, {"RUNNING"}, step=5)
    victim = ray.get_actor(f"fourfold:{job}:1", namespace="fourfold")
    os.kill(ray.get(victim.where.remote())["pid"], signal.SIGKILL)
    done = wait(client, job, {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    assert wait(client, ref, {"SUCCEEDED", "FAILED"})["state"] == "SUCCEEDED"
    events = client.get(f"/v1/jobs/{job}/events").json()
    failure = next(e for e in events if e["kind"] == "failure")
    assert "worker process died: rank 1 on node" in failure["message"]
    assert any(e["kind"] == "recovery" and "training resumed" in e["message"] for e in events)
    assert [e["to_state"] for e in events if e["to_state"]][-4:] == ["RESTARTING", "STARTING", "RUNNING", "SUCCEEDED"]
    attempts = store.attempts(job)
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]
    # At most checkpoint.every steps were trained twice; the redone ones match the first attempt's.
    lines = [x["line"] for x in client.get(f"/v1/jobs/{job}/logs").json()]
    before = lines[: next(i for i, x in enumerate(lines) if x.startswith("failure:"))]
    first_last = max(int(x.split()[1].split("/")[0]) for x in before if x.startswith("step "))  # last step trained
    resumed_at = min(m.step for m in store.metrics(job) if m.attempt == 2) - 1
    assert 0 <= first_last - resumed_at <= 3, (first_last, resumed_at)
    ref_losses, got = losses(client, ref), losses(client, job)
    assert sorted(got) == list(range(1, 13))
    assert abs(got[12] - ref_losses[12]) <= 1e-4
    assert "fourfold_recovery_seconds_count 1.0" in client.get("/metrics").text
    recovery = store.attempts(job)[1].recovery_s  # stored with the attempt that recovered, shown on the job page
    assert recovery is not None and 0 < recovery < 120
    assert client.get(f"/v1/jobs/{job}/attempts").json()[1]["recovery_s"] == recovery


def test_stalled_rank_is_detected_and_the_job_restarts(api, tmp_path: Path, monkeypatch) -> None:
    client, _ = api
    marker = tmp_path / "stalled"
    monkeypatch.setenv("FOURFOLD_TEST_STALL", f"1:3:{marker}")  # rank 1 hangs after step 3, once
    job = client.post("/v1/jobs", json=spec("stall", 6, tmp_path / "ckpt", every=2, hang_timeout_s=15)).json()["id"]
    done = wait(client, job, {"SUCCEEDED", "FAILED"}, timeout_s=300)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    failure = next(e for e in client.get(f"/v1/jobs/{job}/events").json() if e["kind"] == "failure")
    assert failure["message"].startswith("hang: no progress for")
    assert "rank 1 (last phase stalled-by-test-hook, step 3" in failure["message"]
    stalled_at = float(marker.read_text())  # written by the rank as it stalled
    from datetime import datetime

    detected = datetime.fromisoformat(failure["time"]).timestamp()
    assert 15 <= detected - stalled_at <= 15 + 10, detected - stalled_at  # within hang_timeout_s + 10 s


def test_a_job_that_always_fails_ends_failed_with_the_cause(api) -> None:
    client, store = api
    bad = {**spec("broken", 3), "data": {"source": "text", "path": "/nonexistent/corpus"}}
    bad["restart"] = {"max_failures": 1, "backoff_s": 0}
    job = client.post("/v1/jobs", json=bad).json()["id"]
    done = wait(client, job, {"FAILED", "SUCCEEDED"})
    assert done["state"] == "FAILED"
    assert "/nonexistent/corpus" in done["failure_reason"] and "failed 2 times" in done["failure_reason"]
    assert [a.outcome for a in store.attempts(job)] == ["failed", "failed"]


def test_service_killed_and_started_again_finishes_the_job_once(cluster, tmp_path: Path) -> None:
    port = 18000 + os.getpid() % 1000
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "FOURFOLD_URL": f"http://127.0.0.1:{port}"}
    env.pop("FOURFOLD_TEST_STALL", None)
    # From step 6 on the ranks wait after each step until `release` exists: the first attempt is
    # still mid-run when the service dies, however fast the machine, and the second one resumes.
    release = tmp_path / "release"
    env["FOURFOLD_TEST_HOLD"] = f"6:{release}"
    up = [sys.executable, "-m", "api.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "svc")]
    log = open(tmp_path / "svc.log", "ab")  # noqa: SIM115
    service = subprocess.Popen(up, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        client = httpx.Client(base_url=base, timeout=10)
        _until(lambda: client.get("/healthz").status_code == 200)
        job = client.post("/v1/jobs", json=spec("survivor", 14, tmp_path / "ckpt", every=3)).json()["id"]
        wait(client, job, {"RUNNING"}, step=6)
        import ray

        old_pids = [ray.get(ray.get_actor(f"fourfold:{job}:{r}", namespace="fourfold").where.remote())["pid"]
                    for r in range(2)]  # fmt: skip
        service.send_signal(signal.SIGKILL)
        service.wait(timeout=30)
        service = subprocess.Popen(up, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _until(lambda: client.get("/healthz").status_code == 200)
        _until(lambda: client.get(f"/v1/jobs/{job}").json()["attempts"] == 2)
        wait(client, job, {"RUNNING"}, step=7)  # the new attempt trains (and holds after its first step)
        release.touch()
        done = wait(client, job, {"SUCCEEDED", "FAILED"}, timeout_s=300)
        assert done["state"] == "SUCCEEDED", done["failure_reason"]
        events = client.get(f"/v1/jobs/{job}/events").json()
        assert [e["to_state"] for e in events].count("SUCCEEDED") == 1
        assert any("the service restarted" in e["message"] for e in events)
        assert sorted(m["step"] for m in client.get(f"/v1/jobs/{job}/metrics").json()) == list(range(1, 15))
        for pid in old_pids:  # the first attempt's ranks are gone: nothing ran twice
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        attempts = client.get(f"/v1/jobs/{job}/attempts").json()
        assert [a["outcome"] for a in attempts] == ["interrupted", "succeeded"]
        resumed = min(m["step"] for m in client.get(f"/v1/jobs/{job}/metrics").json() if m["attempt"] == 2)
        assert resumed == 7  # from the checkpoint of step 6, not from the start
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
        log.close()


def _until(check, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.3)
