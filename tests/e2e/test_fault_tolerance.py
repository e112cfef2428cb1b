"""Failures on a simulated 2-node Ray cluster (2 CPUs each): killed worker, stalled rank, a job that
always fails, and the service itself killed with SIGKILL. A job that recovers trains every step to
the loss an uninterrupted run of its spec gives, the steps it trained twice included."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from service.store import Store

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
# The jobs run at dp=2, the uninterrupted reference in one process: for this spec both add the same two
# micro-batch gradients and scale them by 1/2, so their losses are bitwise equal (as measured). The bar
# is tight on purpose: these synthetic tokens leave the loss near ln(256) whatever the weights, so even
# a 1% error in the learning rate moves a step's loss by only 2e-6 to 6e-6 relative.
RTOL = 1e-6


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
        # Relative: under the job's own directory, the only place a job of the service may write.
        out["checkpoint"] = {"dir": ckpt.name, "every": every}
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


@pytest.fixture
def uninterrupted(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Callable[[], dict[int, float]]]]:
    """start(spec) trains the spec straight through with the engine's own CLI in one process (no
    service, no Ray, no checkpoint) in the background; the function it returns waits for the run and
    gives its loss by step. Started while a job is held, it uses CPU time the job's ranks leave idle."""
    procs: list[subprocess.Popen] = []

    def start(job_spec: dict[str, Any]) -> Callable[[], dict[int, float]]:
        run_dir = tmp_path / f"uninterrupted-{len(procs)}"
        run_dir.mkdir()
        config, metrics = run_dir / "config.json", run_dir / "metrics.jsonl"
        config.write_text(json.dumps({k: v for k, v in job_spec.items() if k != "checkpoint"}))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if not k.startswith("FOURFOLD_TEST_")}
        env.setdefault("OMP_NUM_THREADS", "1")  # the threads a job's rank uses when the driver sets none
        cmd = [sys.executable, "-m", "parallel.train", "--config", str(config), "--set", "parallel.dp=1",
               "--metrics-file", str(metrics)]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)

        def result() -> dict[int, float]:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out[-3000:]
            rows = [json.loads(line) for line in metrics.read_text().splitlines()]
            assert [r["step"] for r in rows] == list(range(1, job_spec["train"]["steps"] + 1)), out[-3000:]
            return {r["step"]: r["loss"] for r in rows}

        return result

    yield start
    for proc in procs:  # a test that failed before it read the result leaves nothing running
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_losses_match(got: dict[int, float], want: dict[int, float], what: str) -> None:
    for step, loss in sorted(got.items()):
        assert abs(loss - want[step]) <= RTOL * abs(want[step]), (
            f"{what}, step {step}: loss {loss!r} vs {want[step]!r} uninterrupted "
            f"(relative difference {abs(loss - want[step]) / abs(want[step]):.2e} > {RTOL})"
        )


def test_killed_worker_restarts_from_checkpoint(api, uninterrupted, tmp_path: Path, monkeypatch) -> None:
    import ray

    client, store = api
    # Every rank waits after each step from step 5 on until `release` exists, so the kill lands
    # after step 5 (checkpointed at 3) however fast or slow the machine: steps 4 and 5 are redone.
    release = tmp_path / "release"
    monkeypatch.setenv("FOURFOLD_TEST_HOLD", f"5:{release}")
    killed = spec("killed", 12, tmp_path / "ckpt", every=3, in_place=False)  # the whole job restarts
    job = client.post("/v1/jobs", json=killed).json()["id"]
    wait(client, job, {"RUNNING"}, step=5)
    reference = uninterrupted(killed)  # trains while the job's ranks wait
    first = client.get(f"/v1/jobs/{job}/metrics").json()  # the first attempt's steps, before a restart replaces any
    assert [(m["step"], m["attempt"]) for m in first] == [(s, 1) for s in range(1, 6)]
    victim = ray.get_actor(f"fourfold:{job}:1", namespace="fourfold")
    os.kill(ray.get(victim.where.remote())["pid"], signal.SIGKILL)
    # Released once the failure is recorded: rank 0, let go earlier, would fail on its dead peer and
    # could be reported as the cause instead of the killed worker.
    _until(lambda: client.get(f"/v1/jobs/{job}").json()["attempts"] == 2)
    release.touch()
    done = wait(client, job, {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    events = client.get(f"/v1/jobs/{job}/events").json()
    failure = next(e for e in events if e["kind"] == "failure")
    assert "worker process died: rank 1 on node" in failure["message"]
    assert any(e["kind"] == "recovery" and "training resumed" in e["message"] for e in events)
    assert [e["to_state"] for e in events if e["to_state"]][-4:] == ["RESTARTING", "STARTING", "RUNNING", "SUCCEEDED"]
    attempts = store.attempts(job)
    assert [a.outcome for a in attempts] == ["failed", "succeeded"]
    # The first attempt trained to step 5 and no further; the second resumed from step 3's checkpoint.
    lines = [x["line"] for x in client.get(f"/v1/jobs/{job}/logs").json()]
    before = lines[: next(i for i, x in enumerate(lines) if x.startswith("failure:"))]
    assert max(int(x.split()[1].split("/")[0]) for x in before if x.startswith("step ")) == 5
    final = client.get(f"/v1/jobs/{job}/metrics").json()  # a step trained twice: the newest attempt's
    assert [(m["step"], m["attempt"]) for m in final] == [(s, 1 if s <= 3 else 2) for s in range(1, 13)]
    # Every step as each attempt trained it, the redone steps 4 and 5 from both attempts, against
    # an uninterrupted run of the same spec.
    want = reference()
    assert_losses_match({m["step"]: m["loss"] for m in first}, want, "first attempt")
    assert_losses_match({m["step"]: m["loss"] for m in final}, want, "after the restart")
    assert "fourfold_recovery_seconds_count 1.0" in client.get("/metrics").text
    recovery = store.attempts(job)[1].recovery_s  # stored with the attempt that recovered, shown on the job page
    assert recovery is not None and 0 < recovery < 120
    assert client.get(f"/v1/jobs/{job}/attempts").json()[1]["recovery_s"] == recovery
    split = client.get(f"/v1/jobs/{job}/attempts").json()[1]["recovery_phases"]  # where the seconds went
    assert list(split) == ["teardown", "backoff", "reservation", "actors", "imports", "rendezvous", "state",
                           "first_step"] and all(s >= 0 for s in split.values())  # fmt: skip
    assert split["imports"] > 0 and split["state"] > 0 and sum(split.values()) == pytest.approx(recovery, abs=0.5)
    assert 'fourfold_recovery_phase_seconds_count{phase="imports"} 1.0' in client.get("/metrics").text


def _pid(job: str, rank: int) -> int:
    import ray

    return ray.get(ray.get_actor(f"fourfold:{job}:{rank}", namespace="fourfold").where.remote())["pid"]


def test_killed_worker_recovers_in_place_from_its_replica(api, uninterrupted, tmp_path: Path, monkeypatch) -> None:
    """restart.in_place (the default): rank 1 is SIGKILLed after step 5 (checkpointed at 3); rank 0's
    process stays, rank 1's replacement gets step 5's state from it, and no step is trained twice."""
    client, store = api
    release = tmp_path / "release"
    monkeypatch.setenv("FOURFOLD_TEST_HOLD", f"5:{release}")
    inplace = spec("inplace", 10, tmp_path / "ckpt", every=3)
    job = client.post("/v1/jobs", json=inplace).json()["id"]
    wait(client, job, {"RUNNING"}, step=5)
    reference = uninterrupted(inplace)
    os.kill(_pid(job, 1), signal.SIGKILL)
    release.touch()  # rank 0 goes on, fails on its dead peer, and waits for the recovery
    done = wait(client, job, {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    events = client.get(f"/v1/jobs/{job}/events").json()
    failure = next(e for e in events if e["kind"] == "failure")
    assert "worker process died: rank 1 on node" in failure["message"]
    recovery = next(e for e in events if e["kind"] == "recovery")
    assert "in place, from live replicas at step 5, no step before the failure redone" in recovery["message"]
    assert [e["to_state"] for e in events if e["to_state"]][-4:] == ["RESTARTING", "STARTING", "RUNNING", "SUCCEEDED"]
    assert [a.outcome for a in store.attempts(job)] == ["failed", "succeeded"]
    final = client.get(f"/v1/jobs/{job}/metrics").json()
    assert [(m["step"], m["attempt"]) for m in final] == [(s, 1 if s <= 5 else 2) for s in range(1, 11)]
    assert_losses_match({m["step"]: m["loss"] for m in final}, reference(), "recovered in place")
    split = client.get(f"/v1/jobs/{job}/attempts").json()[1]["recovery_phases"]
    assert split["reservation"] == 0 and split["state"] > 0, split  # nothing reserved again; state from the peer


def test_a_failure_during_the_peer_recovery_restarts_the_job_from_its_checkpoint(
    api, uninterrupted, tmp_path: Path, monkeypatch
) -> None:
    """The replica sending the state dies while it sends: the job then restarts whole from step 3's
    checkpoint, and finishes with every step as an uninterrupted run gives it."""
    client, store = api
    release, marker = tmp_path / "release", tmp_path / "peer-failed"
    monkeypatch.setenv("FOURFOLD_TEST_HOLD", f"5:{release}")
    monkeypatch.setenv("FOURFOLD_TEST_PEER_FAIL", str(marker))
    twice = spec("peerfail", 8, tmp_path / "ckpt", every=3)
    job = client.post("/v1/jobs", json=twice).json()["id"]
    wait(client, job, {"RUNNING"}, step=5)
    reference = uninterrupted(twice)
    os.kill(_pid(job, 1), signal.SIGKILL)
    release.touch()
    done = wait(client, job, {"SUCCEEDED", "FAILED"})
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    assert marker.exists()  # rank 0 did die while sending
    failures = [e["message"] for e in client.get(f"/v1/jobs/{job}/events").json() if e["kind"] == "failure"]
    assert len(failures) == 2 and "rank 1" in failures[0] and "worker process died: rank 0" in failures[1], failures
    assert [a.outcome for a in store.attempts(job)] == ["failed", "failed", "succeeded"]
    final = client.get(f"/v1/jobs/{job}/metrics").json()
    assert [(m["step"], m["attempt"]) for m in final] == [(s, 1 if s <= 3 else 3) for s in range(1, 9)]
    assert_losses_match({m["step"]: m["loss"] for m in final}, reference(), "after the fallback")


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
    # Relative: inside the job's own directory (readable), where no corpus will ever be.
    bad = {**spec("broken", 3), "data": {"source": "text", "path": "nonexistent/corpus"}}
    bad["restart"] = {"max_failures": 1, "backoff_s": 0}
    job = client.post("/v1/jobs", json=bad).json()["id"]
    done = wait(client, job, {"FAILED", "SUCCEEDED"})
    assert done["state"] == "FAILED"
    assert f"{job}/nonexistent/corpus" in done["failure_reason"] and "failed 2 times" in done["failure_reason"]
    assert [a.outcome for a in store.attempts(job)] == ["failed", "failed"]


def test_a_data_file_swapped_for_a_link_after_submission_fails_the_job_at_once(api, tmp_path: Path) -> None:
    """Confinement checks the path at submission and each rank again before it opens anything: a file
    replaced by a link to a secret in between ends the job FAILED on its first attempt, unread."""
    client, _ = api
    root = client.app.state.settings.data_dir / "data"
    root.mkdir(exist_ok=True)
    corpus = root / "swapped.txt"
    corpus.write_text("plain training text\n" * 200)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for jobs\n" * 200)
    job_spec = {**spec("swapped", 3), "data": {"source": "text", "path": str(corpus)}}
    made = client.post("/v1/jobs", json=job_spec)
    assert made.status_code == 201, made.text
    corpus.unlink()
    corpus.symlink_to(secret)  # before the ranks start: they take seconds to launch
    done = wait(client, made.json()["id"], {"FAILED", "SUCCEEDED"})
    assert done["state"] == "FAILED" and done["attempts"] == 1, done  # no restart: it would fail the same way
    assert f"StorageRefused: data.path={corpus}: now resolves to {secret}" in done["failure_reason"]


def test_service_killed_and_started_again_finishes_the_job_once(cluster, uninterrupted, tmp_path: Path) -> None:
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
        survivor = spec("survivor", 14, tmp_path / "ckpt", every=3)
        job = client.post("/v1/jobs", json=survivor).json()["id"]
        wait(client, job, {"RUNNING"}, step=6)
        reference = uninterrupted(survivor)  # trains while the job's ranks wait and the service restarts
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
        for pid in old_pids:  # the first attempt's ranks are gone: nothing ran twice
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        attempts = client.get(f"/v1/jobs/{job}/attempts").json()
        assert [a["outcome"] for a in attempts] == ["interrupted", "succeeded"]
        final = client.get(f"/v1/jobs/{job}/metrics").json()
        # Resumed from the checkpoint of step 6, not from the start: steps 1-6 are the first attempt's.
        assert [(m["step"], m["attempt"]) for m in final] == [(s, 1 if s <= 6 else 2) for s in range(1, 15)]
        assert_losses_match({m["step"]: m["loss"] for m in final}, reference(), "after the service restarted")
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
