"""The dashboard in Debian's headless Chromium: the jobs table shows a finished job, and its page
draws the loss chart. The screenshot is kept under test-artifacts/."""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from api.app import create_app
from service.settings import Settings
from service.states import JobState
from service.store import Store

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A service on 127.0.0.1 whose store holds one job that ran 3 steps and succeeded."""
    tmp = tmp_path_factory.mktemp("dash")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    spec = {"name": "dashboard-demo", "train": {"steps": 3}}
    job, _ = store.create_job(spec, owner="local", name="dashboard-demo")
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition(job.id, state, "test")
    failed = store.start_attempt(job.id)  # a first attempt that failed, then a restart that recovered
    store.finish_attempt(job.id, failed, "failed", "worker process died: rank 1 on node 0a1b2c3d4e5f")
    for state in (JobState.RESTARTING, JobState.STARTING, JobState.RUNNING):
        store.transition(job.id, state, "test")
    attempt = store.start_attempt(job.id)
    store.set_recovery(job.id, attempt, 3.21)
    rows = [
        {"step": s, "loss": 5.5 - 0.4 * s, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 1000.0 + s, "tflops": 0.1,
         "mfu": 0.3, "step_time_s": 0.2, "peak_mem_bytes": 1}
        for s in (1, 2, 3)
    ]  # fmt: skip
    store.add_metrics(job.id, rows, attempt)
    store.append_logs(job.id, ["step 3/3 | loss 4.3000"])
    store.finish_attempt(job.id, attempt, "succeeded", "finished 3 steps")
    store.transition(job.id, JobState.SUCCEEDED, "finished 3 steps")
    port = _port()
    server = uvicorn.Server(uvicorn.Config(create_app(Settings(data_dir=tmp), store=store), host="127.0.0.1",
                                           port=port, log_level="warning"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    yield url, job.id
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def _chromium(*args: str) -> str:
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--window-size=1200,900", "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_jobs_table_lists_the_finished_job(served: tuple[str, str]) -> None:
    url, job_id = served
    dom = _chromium("--dump-dom", url + "/")
    assert job_id[:12] in dom and "dashboard-demo" in dom
    assert 'class="state SUCCEEDED"' in dom
    assert "4.3000" in dom  # latest loss in the table


def test_job_page_draws_the_loss_chart(served: tuple[str, str]) -> None:
    url, job_id = served
    dom = _chromium("--dump-dom", f"{url}/?job={job_id}")
    assert 'data-points="3"' in dom and 'data-state="SUCCEEDED"' in dom
    loss_chart = dom[dom.index('id="chart-loss"') :]
    assert "main-svg" in loss_chart[:20000]  # plotly rendered an SVG inside the loss chart
    assert "finished 3 steps" in dom and "step 3/3 | loss 4.3000" in dom
    attempts = dom[dom.index('id="attempts"') :]
    assert "worker process died: rank 1 on node 0a1b2c3d4e5f" in attempts and "recovered in 3.2 s" in attempts
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "dashboard-job.png"
    shot.unlink(missing_ok=True)
    _chromium(f"--screenshot={shot}", f"{url}/?job={job_id}")
    assert shot.exists() and shot.stat().st_size > 10_000


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FOURFOLD_URL": url}
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, capture_output=True, text=True, timeout=60)


def test_cli_talks_to_the_service(served: tuple[str, str], tmp_path: Path) -> None:
    url, job_id = served
    assert job_id[:12] in _cli(url, "jobs").stdout
    status = _cli(url, "status", job_id)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "step 3/3  loss 4.3000" in status.stdout
    assert "step 3/3 | loss 4.3000" in _cli(url, "logs", job_id).stdout
    spec = tmp_path / "job.yaml"
    spec.write_text("name: from-cli\nmodel: {preset: tiny}\n")
    made = _cli(url, "submit", str(spec), "--priority", "3")
    assert made.returncode == 0, made.stderr
    new_id = made.stdout.strip()
    assert "QUEUED" in _cli(url, "status", new_id).stdout  # no supervisor here: it waits
    assert "CANCELLED" in _cli(url, "cancel", new_id).stdout
    spec.write_text("parallel: {tp: 3}\n")
    refused = _cli(url, "submit", str(spec))
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "fourfold: error: 422: parallel.tp=3: model.n_heads=8 is not divisible by it; valid tp: 1, 2, 4, 8"
    )
    missing = _cli(url, "submit", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and missing.stderr.strip().endswith("nope.yaml: no such file")
    unknown = _cli(url, "status", "no-such-job")
    assert unknown.returncode == 2 and "404: no job no-such-job" in unknown.stderr
    down = _cli("http://127.0.0.1:9", "jobs")
    assert down.returncode == 2 and "cannot reach the service" in down.stderr
