"""The REST API on a real store (SQLite and PostgreSQL), without Ray: jobs stay QUEUED here."""

import uuid
from collections.abc import Iterator
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
        ("model: {preset: [", "application/yaml", "body: not valid JSON or YAML"),
    ],
    ids=["tp-not-dividing-heads", "negative-lr", "unknown-field", "bad-priority", "not-a-mapping", "broken-yaml"],
)
def test_a_spec_the_engine_would_refuse_is_422(open_api: TestClient, body, content_type, message: str) -> None:
    if content_type is None:
        r = open_api.post("/v1/jobs", json=body)
    else:
        r = open_api.post("/v1/jobs", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert open_api.get("/v1/jobs").json()["total"] == 0 or all(
        j["name"] != "refused" for j in open_api.get("/v1/jobs").json()["items"]
    )


def test_unknown_ids_and_bad_queries(open_api: TestClient) -> None:
    assert open_api.get("/v1/jobs/nope").status_code == 404
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
    assert "fourfold_http_request_seconds_bucket" in text
    assert open_api.get("/v1/cluster").json() == {"connected": False, "nodes": []}
