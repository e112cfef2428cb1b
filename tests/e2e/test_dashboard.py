"""The dashboard in Debian's headless Chromium: the jobs table shows a finished job, and its page
draws the loss chart. The screenshot is kept under test-artifacts/. With tokens on: the token leaves
the address bar, the stream opens with a ticket, markup from the server shows as text, and the
security headers hold with no CSP violation."""

import base64
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

from api import state as app_state
from api.app import create_app
from service.settings import Settings
from service.states import JobState
from service.store import Store
from service.supervisor import Supervisor
from tests.e2e.cdp import Chromium, Page
from tests.unit.test_supervisor import FakeGroup

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
         "mfu": 0.3, "step_time_s": 0.2, "peak_mem_bytes": 1, "moe_aux_loss": 0.01, "moe_dropped_frac": 0.0,
         "moe_max_load": 1.0 + s}
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
    router = dom[dom.index('id="chart-moe"') :]  # a mixture-of-experts job: the router's chart is shown
    assert not router[:40].split(">")[0].endswith("hidden") and "main-svg" in router[:20000]
    assert "busiest expert / mean" in router[:40000]
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


MARKUP_NAME = '<img src=x onerror="document.body.dataset.pwned=1"><b>bold</b>'
MARKUP_LOG = "<script>document.body.dataset.pwned=2</script><i>italic</i> step 1"
MARKUP_REASON = '<img src=y onerror="document.body.dataset.pwned=3">boom'


def _serve(app: object) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = _port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return url, server, thread
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(0.2)


@pytest.fixture(scope="module")
def with_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Store, str]]:
    """A service with tokens whose store holds alice's RUNNING job: a name and a log line with markup."""
    tmp = tmp_path_factory.mktemp("dash-tokens")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    job, _ = store.create_job({"name": MARKUP_NAME, "train": {"steps": 3}}, owner="alice", name=MARKUP_NAME)
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition(job.id, state, "test")
    attempt = store.start_attempt(job.id)
    rows = [
        {"step": s, "loss": 5.0 - s, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": 1000.0, "tflops": 0.1, "mfu": 0.3,
         "step_time_s": 0.2, "peak_mem_bytes": 1}
        for s in (1, 2, 3)
    ]  # fmt: skip
    store.add_metrics(job.id, rows, attempt)
    store.append_logs(job.id, [MARKUP_LOG])
    settings = Settings(data_dir=tmp, tokens="alice-token:alice")
    url, server, thread = _serve(create_app(settings, store=store))
    yield url, store, job.id
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def test_token_leaves_the_url_stream_uses_a_ticket_and_markup_stays_text(with_tokens: tuple[str, Store, str]) -> None:
    url, store, job_id = with_tokens
    with Chromium() as browser:
        page = browser.page()
        page.navigate(f"{url}/?token=alice-token")
        page.wait_for("document.querySelectorAll('#jobs tbody tr').length === 1")
        assert page.evaluate("location.href") == f"{url}/"  # the token left the address bar at once
        assert page.evaluate("document.querySelector('#jobs tbody td:nth-child(2)').textContent") == MARKUP_NAME
        assert page.evaluate("document.querySelectorAll('#jobs img, #jobs b').length") == 0
        # The job's page (the token now comes from localStorage): a live job's log arrives by the stream.
        page.navigate(f"{url}/?job={job_id}&token=alice-token")
        page.wait_for("document.getElementById('logs').textContent.includes('italic')")
        assert page.evaluate("location.href") == f"{url}/?job={job_id}"
        assert page.evaluate("document.body.dataset.points") == "3"
        assert page.evaluate("!!document.querySelector('#chart-loss .main-svg')")  # plotly drew under the CSP
        assert page.evaluate("document.getElementById('chart-moe').hidden")  # a dense model: no router chart
        store.append_logs(job_id, ["<b>live</b> line"])
        store.transition(job_id, JobState.FAILED, MARKUP_REASON)
        page.wait_for("document.body.dataset.state === 'FAILED'")
        page.wait_for("document.getElementById('events').textContent.includes('boom')")
        assert page.evaluate("document.getElementById('logs').textContent") == f"{MARKUP_LOG}\n<b>live</b> line\n"
        assert page.evaluate("document.getElementById('job-title').textContent") == f"{MARKUP_NAME} ({job_id})"
        assert MARKUP_REASON in page.evaluate("document.getElementById('job-summary').textContent")
        assert MARKUP_REASON in page.evaluate("document.getElementById('events').textContent")
        made = "document.querySelectorAll('#job-view img, #job-view b, #job-view i, #job-view script').length"
        assert page.evaluate(made) == 0 and page.evaluate("document.body.dataset.pwned") is None
        requests, responses, console = page.requests(), page.responses(), page.log_entries()
    # Only the two pages loaded carry the token in their URL; the API gets it in the header alone.
    urls = [r["url"] for r in requests]
    assert [u for u in urls if "alice-token" in u] == [
        f"{url}/?token=alice-token",
        f"{url}/?job={job_id}&token=alice-token",
    ]
    streams = [u for u in urls if "/stream?" in u]
    assert streams and all(u.startswith(f"{url}/v1/jobs/{job_id}/stream?ticket=") for u in streams)
    tickets = [r for r in requests if r["url"].endswith("/stream-ticket")]
    assert tickets and all(
        r["method"] == "POST" and r["headers"]["Authorization"] == "Bearer alice-token" for r in tickets
    )
    assert all(not r["headers"].get("Referer") for r in requests if r["url"].startswith(f"{url}/v1/"))
    pages = [r for r in responses if r["url"].startswith(f"{url}/?")]
    assert len(pages) == 2
    for response in pages:
        headers = {k.lower(): v for k, v in response["headers"].items()}
        assert headers["content-security-policy"].startswith("default-src 'self'; script-src 'self';")
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["referrer-policy"] == "no-referrer"
    # No CSP violation, no warning from plotly about one, no script error (a missing favicon is fine).
    problems = [e for e in console if "favicon.ico" not in e.get("url", "") and e["level"] in ("error", "warning")]
    assert not [e for e in console if e["source"] == "security" or "CSP" in e["text"]], console
    assert not problems, problems


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A service whose supervisor (never started, no Ray) sees one node of 4 CPUs, and whose store holds a
    finished dp=2 job of the tiny model that measured 3 steps."""
    tmp = tmp_path_factory.mktemp("dash-plan")
    store = Store(f"sqlite:///{tmp / 'store.db'}")
    spec = {"name": "planned", "model": {"preset": "tiny"}, "parallel": {"dp": 2}, "train": {"steps": 3}}
    job, _ = store.create_job(spec, owner="local", name="planned")
    for state in (JobState.STARTING, JobState.RUNNING):
        store.transition(job.id, state, "test")
    attempt = store.start_attempt(job.id)
    rows = [{"step": s, "loss": 5.0, "tokens_per_s": 2000.0, "step_time_s": 0.25, "peak_mem_bytes": 300 * 2**20}
            for s in (1, 2, 3)]  # fmt: skip
    store.add_metrics(job.id, rows, attempt)
    store.finish_attempt(job.id, attempt, "succeeded", "finished 3 steps")
    store.transition(job.id, JobState.SUCCEEDED, "finished 3 steps")
    app = create_app(Settings(data_dir=tmp), store=store)
    url, server, thread = _serve(app)
    nodes = {"node-a": {"CPU": 4.0, "memory": 16.0 * 2**30}}
    state = app_state.of(app)
    state.supervisor = Supervisor(state.store, group_factory=FakeGroup, resources=lambda: nodes, leftovers=lambda _: 0)
    yield url, job.id
    server.should_exit = True
    thread.join(timeout=10)
    store.close()


def _screenshot(page: Page, name: str) -> None:
    """The whole page as a PNG under test-artifacts/, for a person to look at."""
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = page.browser.send("Page.captureScreenshot", page.session, format="png", captureBeyondViewport=True)
    (artifacts / name).write_bytes(base64.b64decode(shot["data"]))


def test_plan_page_and_a_jobs_planner_block(planned: tuple[str, str], served: tuple[str, str]) -> None:
    url, job_id = planned
    fill = """(() => {
        const f = document.getElementById('plan-form');
        const values = %s;
        for (const [k, v] of Object.entries(values)) f.elements[k].value = v;
        f.requestSubmit();
        return true;
    })()"""
    done = "['done', 'error'].includes(document.body.dataset.plan)"
    with Chromium() as browser:
        page = browser.page()
        page.navigate(f"{url}/")
        page.wait_for("document.querySelectorAll('#jobs tbody tr').length === 1")
        page.evaluate("document.querySelector('header nav a[href=\"/?view=plan\"]').click()")
        page.wait_for("location.search === '?view=plan' && !document.getElementById('plan-view').hidden")
        assert page.evaluate("document.getElementById('jobs-view').hidden")
        # 8b on 8 nodes of 8 H100s: the ranked table, the best three's reasons, the stacked memory bars.
        page.evaluate(fill % '{preset: "8b", global_batch: "256", micro_batch: "", seq_len: "4096", cluster: '
                             '"8x8xh100-80gb", top: "5"}')  # fmt: skip
        assert page.wait_for(done) and page.evaluate("document.body.dataset.plan") == "done"
        assert page.evaluate("document.querySelectorAll('#plan-table tbody tr').length") == 5
        first = page.evaluate(
            "[...document.querySelectorAll('#plan-table tbody tr:first-child td')].map(t => t.textContent)"
        )
        assert first[0] == "1" and first[1].startswith("dp") and "GiB (" in first[2] and first[7] == "yes"
        assert "8x8xh100-80gb: 64 × H100 SXM 80GB" in page.evaluate(
            "document.getElementById('plan-cluster').textContent"
        )
        assert page.evaluate("document.getElementById('plan-nofit').hidden")
        assert page.evaluate("document.querySelectorAll('#plan-reasons > li').length") == 3
        assert "best predicted throughput" in page.evaluate("document.getElementById('plan-reasons').textContent")
        assert "fewest h100-80gb" in page.evaluate("document.getElementById('plan-min').textContent")
        chart = "document.querySelector('#chart-plan-memory')"
        assert page.wait_for(f"{chart}.querySelectorAll('.plot-container .barlayer .trace').length >= 4")
        names = page.evaluate(f"{chart}.data.map(t => t.name)")
        assert names[:4] == ["params", "grads", "optimizer", "activations"] and "total" not in names
        assert page.evaluate(f"{chart}.layout.barmode") == "stack"
        assert page.evaluate(f"{chart}.data.every(t => t.orientation === 'h' && t.y.length === 5)")
        assert page.evaluate(f"{chart}.layout.shapes[0].x0") == pytest.approx(85520809984 * 0.9 / 2**30, rel=1e-6)
        _screenshot(page, "dashboard-plan.png")
        # 70b on one GPU: nothing fits, and the banner says so.
        page.evaluate(fill % '{preset: "70b", cluster: "1x1xh100-80gb", top: "3"}')
        page.wait_for("!document.getElementById('plan-nofit').hidden")
        assert page.evaluate("document.querySelectorAll('#plan-table tbody tr.nofit').length") == 3
        # A bad cluster: the 422's detail, as text; the live cluster (empty): the fake's 4 CPU slots.
        page.evaluate("document.body.dataset.plan = ''")
        page.evaluate(fill % '{preset: "tiny", cluster: "2x4x<b>gpu</b>"}')
        page.wait_for(done)
        error = page.evaluate("document.getElementById('plan-error').textContent")
        assert error == "cluster 2x4x<b>gpu</b>: expected NODESxPER_NODExACCELERATOR, e.g. 8x8xh100-80gb"
        assert page.evaluate("document.getElementById('plan-result').hidden")
        assert page.evaluate("document.querySelectorAll('#plan-view b').length") == 0
        page.evaluate("document.body.dataset.plan = ''")
        page.evaluate(fill % '{preset: "tiny", global_batch: "8", seq_len: "64", cluster: "", top: "3"}')
        page.wait_for(done)
        assert page.evaluate("document.getElementById('plan-error').hidden")
        assert "on 1x4xcpu" in page.evaluate("document.getElementById('plan-cluster').textContent")
        assert "Ray: 1 node(s) of 4" in page.evaluate("document.getElementById('plan-notes').textContent")
        # A job's page: the planner's prediction for its layout next to what it measured.
        page.navigate(f"{url}/?job={job_id}")
        page.wait_for("document.body.dataset.prediction === 'predicted'")
        cells = page.evaluate(
            "[...document.querySelectorAll('#planner tbody tr')].map(r => [...r.cells].map(c => c.textContent))"
        )
        assert [r[0] for r in cells] == ["peak memory per rank", "tokens/s", "step time"]
        assert cells[0][2] == "300 MiB" and cells[1][2] == "2,000" and cells[2][2] == "250.0 ms"
        assert all(r[1] != "-" and r[3].startswith("×") for r in cells), cells
        assert page.evaluate("document.getElementById('planner-layout').textContent").startswith("dp2 tp1")
        assert page.evaluate("document.getElementById('planner-note').hidden")
        _screenshot(page, "dashboard-job-planner.png")
        # Without a Ray cluster the block says why there is no prediction, and shows what was measured.
        served_url, served_id = served
        page.navigate(f"{served_url}/?job={served_id}")
        page.wait_for("document.body.dataset.prediction === 'note'")
        note = page.evaluate("document.getElementById('planner-note').textContent")
        assert note == "No prediction: this API runs without a Ray cluster"
        assert (
            page.evaluate("document.querySelector('#planner tbody tr:nth-child(2)').textContent") == "tokens/s-1,003-"
        )
        console = page.log_entries()
    problems = [e for e in console if "favicon.ico" not in e.get("url", "") and e["level"] in ("error", "warning")]
    assert not [e for e in problems if "422" not in e["text"]], problems  # the 422 is the bad cluster's
