"""The REST API on a real store (SQLite and PostgreSQL), without Ray: jobs stay QUEUED here."""

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from service.settings import Settings
from service.store import Store

ALICE, BOB, ADMIN = (
    {"Authorization": "Bearer a-token"},
    {"Authorization": "Bearer b-token"},
    {"Authorization": "Bearer root-token"},
)
SPEC = {"name": "tiny", "model": {"preset": "tiny"}, "train": {"steps": 3, "global_batch": 8, "micro_batch": 2}}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('api') / 'store.db'}"
    return request.getfixturevalue("pg_url")


def _client(db_url: str, tmp_path: Path, **settings: str) -> TestClient:
    store = Store(db_url)
    app = create_app(Settings(data_dir=tmp_path, **settings), store=store)
    return TestClient(app)


@pytest.fixture
def open_api(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with _client(db_url, tmp_path) as client:
        yield client


@pytest.fixture
def authed(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with _client(db_url, tmp_path, tokens="a-token:alice,b-token:bob", admin_token="root-token") as client:
        yield client


def test_submit_json_and_yaml_then_read_back(open_api: TestClient) -> None:
    made = open_api.post("/v1/jobs", json=SPEC)
    assert made.status_code == 201, made.text
    job = made.json()
    assert job["state"] == "QUEUED" and job["name"] == "tiny" and job["steps"] == 3
    assert job["spec"]["parallel"]["dp"] == 1  # stored normalised, defaults filled in
    yaml_body = "name: from-yaml\nmodel: {preset: tiny}\npriority: 5\n"
    other = open_api.post("/v1/jobs", content=yaml_body, headers={"Content-Type": "application/yaml"})
    assert other.status_code == 201 and other.json()["priority"] == 5
    assert open_api.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    listed = open_api.get("/v1/jobs", params={"state": "QUEUED", "limit": 1})
    assert listed.status_code == 200 and listed.json()["total"] >= 2 and len(listed.json()["items"]) == 1
    events = open_api.get(f"/v1/jobs/{job['id']}/events").json()
    assert [e["to_state"] for e in events] == ["QUEUED"]


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        ({**SPEC, "parallel": {"tp": 3}}, None, "parallel.tp=3: model.n_heads=8 is not divisible by it"),
        ({**SPEC, "train": {"lr": -1}}, None, "train.lr: Input should be greater than 0"),
        ({**SPEC, "colour": "red"}, None, "colour: unknown field"),
        ({**SPEC, "priority": "high"}, None, "priority: must be an integer"),
        ("[1, 2]", "application/json", "body: a job spec must be a mapping"),
        ("model: {preset: [", "application/yaml", "body: not valid YAML (while parsing a flow node)"),
    ],
    ids=["tp-not-dividing-heads", "negative-lr", "unknown-field", "bad-priority", "not-a-mapping", "broken-yaml"],
)
def test_a_spec_the_engine_would_refuse_is_422(open_api: TestClient, body, content_type, message: str) -> None:
    before = open_api.get("/v1/jobs").json()["total"]
    if content_type is None:
        r = open_api.post("/v1/jobs", json=body)
    else:
        r = open_api.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert open_api.get("/v1/jobs").json()["total"] == before  # nothing was stored


# Inputs that once reached the database as they were: each must be a clear 4xx on both databases.
ODD_BODIES = {
    "empty": (b"", "application/json", 422, "body: empty"),
    "infinity": (b'{"train": {"lr": Infinity}}', "application/json", 422, "Infinity is not a number a job spec can hold"),
    "yaml-inf": (b"train: {lr: .inf}", "application/yaml", 422, "train.lr: Input should be a finite number"),
    "deep": (b"[" * 100_000 + b"]" * 100_000, "application/json", 422, "body:"),
    "long-name": (b'{"name": "' + b"x" * 201 + b'"}', "application/json", 422, "name: String should have at most 200"),
    "nul-in-name": (b'{"name": "a\\u0000b"}', "application/json", 422, "name: contains a NUL character"),
    "nul-in-path": (b'{"data": {"source": "text", "path": "/x\\u0000"}}', "application/json", 422,
                    "data.path: contains a NUL character"),
    "yaml-as-json": (b"name: x\n", "application/json", 422, "for YAML send Content-Type: application/yaml"),
    "huge": (b'{"name": "' + b"x" * (1 << 20) + b'"}', "application/json", 413, "a job spec is under 1 MiB"),
}  # fmt: skip


@pytest.mark.parametrize("case", ODD_BODIES)
def test_odd_bodies_are_refused_not_500(open_api: TestClient, case: str) -> None:
    body, content_type, code, message = ODD_BODIES[case]
    r = open_api.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
    assert r.status_code == code, r.text[:500]
    assert message in r.json()["detail"], r.json()["detail"][:500]


@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/v1/jobs", {"offset": 10**20}, "less than or equal to 2147483647"),
        ("/v1/jobs/{id}/metrics", {"after_step": 10**20}, "less than or equal to 2147483647"),
        ("/v1/jobs/{id}/events", {"after_id": 2**63}, "less than or equal to 2147483647"),
        ("/v1/jobs", {"status": "RUNNING"}, "query: unknown parameter status; valid: after, limit, offset, state"),
        ("/v1/jobs", [("state", "QUEUED"), ("state", "RUNNING")], "query: state given more than once"),
    ],
    ids=["huge-offset", "huge-step", "huge-id", "unknown-param", "repeated-param"],
)
def test_odd_queries_are_422(open_api: TestClient, path: str, params, message: str) -> None:
    job = open_api.post("/v1/jobs", json=SPEC).json()["id"]
    r = open_api.get(path.format(id=job), params=params)
    assert r.status_code == 422, r.text
    assert message in str(r.json()["detail"])


def test_unknown_ids_and_bad_queries(open_api: TestClient) -> None:
    assert open_api.get("/v1/jobs/nope").status_code == 404
    assert open_api.get("/v1/jobs/a%00b").status_code == 404
    assert open_api.get("/v1/jobs/" + "0" * 32 + "/attempts").status_code == 404
    assert open_api.post("/v1/jobs/nope/cancel").status_code == 404
    assert open_api.get("/v1/jobs/nope/metrics").status_code == 404
    assert open_api.get("/v1/jobs", params={"state": "SLEEPING"}).status_code == 422
    assert open_api.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_idempotency_key_gives_one_job(open_api: TestClient) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = open_api.post("/v1/jobs", json=SPEC, headers=key)
    again = open_api.post("/v1/jobs", json=SPEC, headers=key)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = open_api.post("/v1/jobs", json={**SPEC, "name": "another"}, headers=key)
    assert other.status_code == 422 and "was used for job " + first.json()["id"] in other.json()["detail"]
    empty = open_api.post("/v1/jobs", json=SPEC, headers={"Idempotency-Key": ""})
    assert empty.status_code == 422


def test_idempotency_key_race_gives_the_first_job(open_api: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two submissions with one key at once: both miss the key, the second's insert loses to the
    first's. It answers 200 with the first's job (whose paths name that job), not a 422."""
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = open_api.post("/v1/jobs", json=SPEC, headers=key).json()
    store = open_api.app.state.store
    real, misses = store.job_by_key, [None, None]  # the route's look-up and create_job's own miss it
    monkeypatch.setattr(store, "job_by_key", lambda *a: misses.pop() if misses else real(*a))
    raced = open_api.post("/v1/jobs", json=SPEC, headers=key)
    assert raced.status_code == 200, raced.text
    assert raced.json()["id"] == first["id"] and raced.json()["spec"] == first["spec"]
    assert open_api.get("/v1/jobs", params={"limit": 500}).json()["total"] == store.list_jobs()[1]


def test_list_pages_by_cursor_and_etag(open_api: TestClient) -> None:
    made = [open_api.post("/v1/jobs", json={**SPEC, "name": f"page-{i}"}).json()["id"] for i in range(5)]
    seen, after = [], None
    while True:
        page = open_api.get("/v1/jobs", params={"limit": 2, **({"after": after} if after else {})})
        assert page.status_code == 200 and page.headers["cache-control"] == "no-cache"
        seen += [j["id"] for j in page.json()["items"]]
        if not (after := page.json()["next"]):
            break
    total = page.json()["total"]
    assert len(seen) == len(set(seen)) == total and seen[:5] == made[::-1]  # newest first, each once
    assert open_api.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()["items"][0]["id"] == made[2]
    first = open_api.get("/v1/jobs", params={"limit": 2})
    tag = first.headers["etag"]
    again = open_api.get("/v1/jobs", params={"limit": 2}, headers={"If-None-Match": f'W/{tag}, "other"'})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == tag
    newer = open_api.post("/v1/jobs", json=SPEC).json()["id"]  # the page changed: a new tag and the page
    changed = open_api.get("/v1/jobs", params={"limit": 2}, headers={"If-None-Match": tag})
    assert changed.status_code == 200 and changed.json()["items"][0]["id"] == newer
    job = open_api.get(f"/v1/jobs/{newer}")
    assert open_api.get(f"/v1/jobs/{newer}", headers={"If-None-Match": job.headers["etag"]}).status_code == 304
    open_api.post(f"/v1/jobs/{newer}/cancel")
    assert open_api.get(f"/v1/jobs/{newer}", headers={"If-None-Match": job.headers["etag"]}).status_code == 200
    bad = open_api.get("/v1/jobs", params={"after": "not-a-cursor"})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("query.after:")


def test_list_shows_the_newest_metrics(open_api: TestClient) -> None:
    job = open_api.post("/v1/jobs", json=SPEC).json()["id"]
    store = open_api.app.state.store
    store.add_metrics(job, [{"step": s, "loss": 5.0 - s, "mfu": 0.1} for s in (1, 2, 3)], attempt=1)
    store.add_metrics(job, [{"step": 1, "loss": 9.0}], attempt=2)  # a restart trains step 1 again
    store.add_metrics(job, [{"step": 2, "loss": 7.0}], attempt=1)  # a late repeat of an old step: ignored
    item = next(j for j in open_api.get("/v1/jobs", params={"limit": 500}).json()["items"] if j["id"] == job)
    assert (item["step"], item["loss"], item["mfu"]) == (1, 9.0, None)
    assert open_api.get(f"/v1/jobs/{job}").json()["loss"] == 9.0


def test_router_statistics_are_stored_and_served(open_api: TestClient) -> None:
    job = open_api.post("/v1/jobs", json=SPEC).json()["id"]
    router = {"moe_aux_loss": 0.02, "moe_dropped_frac": 0.25, "moe_max_load": 4.0}
    open_api.app.state.store.add_metrics(job, [{"step": 1, "loss": 5.0, **router}, {"step": 2, "loss": 4.0}], 1)
    rows = open_api.get(f"/v1/jobs/{job}/metrics").json()
    assert {k: rows[0][k] for k in router} == router
    assert all(rows[1][k] is None for k in router)  # a dense model's rows (or a step without them)


def test_cancel_a_queued_job(open_api: TestClient) -> None:
    job = open_api.post("/v1/jobs", json=SPEC).json()
    done = open_api.post(f"/v1/jobs/{job['id']}/cancel")
    assert done.status_code == 200 and done.json()["state"] == "CANCELLED"
    assert open_api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409
    assert "cancelled while queued" in [e["message"] for e in open_api.get(f"/v1/jobs/{job['id']}/events").json()]


def test_auth_tokens_and_owners(authed: TestClient) -> None:
    assert authed.post("/v1/jobs", json=SPEC).status_code == 401
    assert authed.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    mine = authed.post("/v1/jobs", json=SPEC, headers=ALICE).json()
    assert mine["owner"] == "alice"
    assert authed.get(f"/v1/jobs/{mine['id']}", headers=BOB).status_code == 404
    assert authed.post(f"/v1/jobs/{mine['id']}/cancel", headers=BOB).status_code == 404
    assert all(j["owner"] == "bob" for j in authed.get("/v1/jobs", headers=BOB).json()["items"])
    assert authed.get(f"/v1/jobs/{mine['id']}", headers=ADMIN).status_code == 200
    assert authed.post(f"/v1/jobs/{mine['id']}/cancel", headers=ALICE).json()["state"] == "CANCELLED"


def test_health_and_prometheus(open_api: TestClient) -> None:
    open_api.post("/v1/jobs", json=SPEC)
    assert open_api.get("/healthz").json()["ok"] is True
    text = open_api.get("/metrics").text
    assert 'fourfold_jobs{state="QUEUED"}' in text and "fourfold_queue_length" in text
    waited = next(line for line in text.splitlines() if line.startswith("fourfold_queue_oldest_wait_seconds "))
    assert 0 < float(waited.split()[1]) < 60  # the job just submitted waits in the queue
    assert "fourfold_http_request_seconds_bucket" in text
    assert open_api.get("/v1/cluster").json() == {"connected": False, "nodes": [], "running_jobs": []}


def test_stream_replays_a_finished_job_then_ends(db_url: str, tmp_path: Path) -> None:
    """Server-sent events of a job: its metrics, events and log lines, then `end` with the state."""
    from service.states import JobState

    with _client(db_url, tmp_path, tokens="a-token:alice,b-token:bob") as client:
        job = client.post("/v1/jobs", json=SPEC, headers=ALICE).json()["id"]
        store = client.app.state.store
        for state in (JobState.STARTING, JobState.RUNNING):
            store.transition(job, state, "test")
        attempt = store.start_attempt(job)
        store.add_metrics(job, [{"step": s, "loss": 5.0 - s} for s in (1, 2)], attempt)
        store.append_logs(job, ["step 2/3 | loss 3.0000"])
        store.transition(job, JobState.FAILED, "boom")
        with client.stream("GET", f"/v1/jobs/{job}/stream", headers=ALICE) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            kinds = [line.removeprefix("event: ").strip() for line in r.iter_lines() if line.startswith("event:")]
        assert kinds == ["metrics", "metrics", "event", "event", "event", "event", "log", "end"]
        assert client.get(f"/v1/jobs/{job}/stream", headers=BOB).status_code == 404


def test_service_metrics_per_job() -> None:
    from service.metrics import ServiceMetrics

    m = ServiceMetrics()
    m.observe_step("j1", {"step": 3, "loss": 4.5, "tokens_per_s": 1000.0, "mfu": 0.25, "step_time_s": 0.5})
    m.restarts.labels(job="j1").inc()
    m.observe_recovery("j1", 7.5)
    text = m.render().decode()
    for line in ('fourfold_job_loss{job="j1"} 4.5', 'fourfold_job_tokens_per_second{job="j1"} 1000.0',
                 'fourfold_job_mfu{job="j1"} 0.25', 'fourfold_job_step_seconds{job="j1"} 0.5',
                 'fourfold_job_restarts_total{job="j1"} 1.0', 'fourfold_job_last_recovery_seconds{job="j1"} 7.5',
                 "fourfold_recovery_seconds_count 1.0"):  # fmt: skip
        assert line in text, line
    assert "fourfold_job_moe_max_load{" not in text  # a dense job has no router series
    m.observe_step("j2", {"step": 1, "loss": 4.0, "tokens_per_s": 1.0, "mfu": 0.1, "step_time_s": 0.5,
                          "moe_aux_loss": 0.02, "moe_dropped_frac": 0.125, "moe_max_load": 1.5})  # fmt: skip
    text = m.render().decode()
    for line in ('fourfold_job_moe_aux_loss{job="j2"} 0.02', 'fourfold_job_moe_dropped_fraction{job="j2"} 0.125',
                 'fourfold_job_moe_max_load{job="j2"} 1.5'):  # fmt: skip
        assert line in text, line
    m.forget("j1")
    m.forget("j2")
    assert 'fourfold_job_loss{job="j1"}' not in m.render().decode()  # an ended job's series go
    assert 'fourfold_job_moe_max_load{job="j2"}' not in m.render().decode()
    m.set_queue_wait(datetime(2026, 1, 1, 12, 0, tzinfo=UTC), now=datetime(2026, 1, 1, 12, 30, tzinfo=UTC))
    assert "fourfold_queue_oldest_wait_seconds 1800.0" in m.render().decode()
    m.set_queue_wait(None)
    assert "fourfold_queue_oldest_wait_seconds 0.0" in m.render().decode()


def test_malformed_tokens_setting_is_one_clear_error(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not token:user"):
        Settings(data_dir=tmp_path, tokens="alice-token")
