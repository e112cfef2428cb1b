"""Multi-user safety through the REST API (no Ray): storage confinement (422), quotas (429), request
limits (413/422) and the audit trail. Each refusal stores nothing."""

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
TOKENS = {"tokens": "a-token:alice,b-token:bob", "admin_token": "root-token"}
SPEC = {"name": "tiny", "model": {"preset": "tiny"}, "train": {"steps": 3, "global_batch": 8, "micro_batch": 2}}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'elsewhere' / 'store.db'}"
    return request.getfixturevalue("pg_url")


def _client(db_url: str, data_dir: Path, **settings) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, **settings), store=Store(db_url)))


@pytest.fixture
def svc(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    data_dir = tmp_path / "svc"
    (data_dir / "data").mkdir(parents=True)
    (data_dir / "data" / "corpus.txt").write_text("some text\n" * 50)
    with _client(db_url, data_dir, **TOKENS) as client:
        yield client, data_dir


def _total(client: TestClient) -> int:
    return client.get("/v1/jobs", headers=ADMIN).json()["total"]


def test_a_job_gets_its_own_directory_and_reads_the_data_root(svc) -> None:
    client, data_dir = svc
    spec = {**SPEC, "data": {"source": "text", "path": str(data_dir / "data" / "corpus.txt")}}
    job = client.post("/v1/jobs", json=spec, headers=ALICE).json()
    job_dir = data_dir / "workspace" / "alice" / job["id"]
    assert job["spec"]["checkpoint"]["dir"] == str(job_dir)  # the default checkpoint.dir
    rel = client.post("/v1/jobs", json={**SPEC, "checkpoint": {"dir": "ckpt", "every": 2}}, headers=ALICE).json()
    assert rel["spec"]["checkpoint"]["dir"] == str(data_dir / "workspace" / "alice" / rel["id"] / "ckpt")
    none = client.post("/v1/jobs", json={**SPEC, "checkpoint": {"dir": None}}, headers=ALICE).json()
    assert none["spec"]["checkpoint"]["dir"] is None  # an explicit null: no checkpoints
    stdlib = client.post("/v1/jobs", json={**SPEC, "data": {"source": "text", "path": "stdlib"}}, headers=BOB)
    assert stdlib.status_code == 201 and stdlib.json()["spec"]["data"]["path"] == "stdlib"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        (
            "data",
            "path",
            "/etc/shadow",
            "data.path=/etc/shadow: outside this job's storage; it reads only under {data}",
        ),
        ("data", "path", "{data}/../fourfold.db", "data.path={data}/../fourfold.db (resolves to"),
        ("data", "path", "file:///etc/passwd", "outside this job's storage"),
        ("data", "path", "file://{data}/%2e%2e/x", "percent-encoding"),
        ("data", "path", "~/.bashrc", "outside this job's storage"),
        (
            "checkpoint",
            "dir",
            "/tmp/anywhere",
            "checkpoint.dir=/tmp/anywhere: outside this job's storage; it writes only under",
        ),
        ("checkpoint", "dir", "../../bob/x", "outside this job's storage"),
        ("checkpoint", "resume", "{ws}/bob/somejob", "checkpoint.resume={ws}/bob/somejob: outside"),
        ("model", "init_from", "{ws}/bob/somejob/hf", "model.init_from={ws}/bob/somejob/hf: outside"),
        ("model", "init_from", "s3://bucket/hf", "model.init_from=s3://bucket/hf: outside"),
    ],
    ids=[
        "abs",
        "dotdot-to-store",
        "file-url",
        "percent",
        "home",
        "ckpt-abs",
        "ckpt-rel-other-user",
        "resume-other",
        "init-other",
        "s3-not-allowed",
    ],
)
def test_paths_outside_the_job_storage_are_422_and_nothing_is_stored(svc, section, key, value, message) -> None:
    client, data_dir = svc
    fill = {"data": data_dir / "data", "ws": data_dir / "workspace"}
    before = _total(client)
    body = {**SPEC, section: {key: value.format(**fill)}}
    if section == "data":
        body["data"]["source"] = "text"
    r = client.post("/v1/jobs", json=body, headers=ALICE)
    assert r.status_code == 422, r.text
    assert message.format(**fill) in r.json()["detail"]
    assert _total(client) == before


def test_a_symlink_planted_in_a_data_root_is_refused(svc, tmp_path: Path) -> None:
    client, data_dir = svc
    secret = tmp_path / "secret.txt"
    secret.write_text("not for jobs")
    (data_dir / "data" / "link.txt").symlink_to(secret)
    r = client.post("/v1/jobs", json={**SPEC, "data": {"source": "text", "path": str(data_dir / "data" / "link.txt")}},
                    headers=ALICE)  # fmt: skip
    assert r.status_code == 422 and f"(resolves to {secret})" in r.json()["detail"]


def test_an_admin_reads_any_users_directory(svc) -> None:
    client, data_dir = svc
    bobs = data_dir / "workspace" / "bob" / "somejob"
    r = client.post("/v1/jobs", json={**SPEC, "checkpoint": {"resume": str(bobs)}}, headers=ADMIN)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["checkpoint"]["resume"] == str(bobs)


def test_operator_roots_widen_reads(db_url: str, tmp_path: Path) -> None:
    corpora = tmp_path / "corpora"
    corpora.mkdir()
    (corpora / "a.txt").write_text("text")
    with _client(db_url, tmp_path / "svc", data_roots=f"{corpora},s3://team-data/text") as client:
        for path in (str(corpora / "a.txt"), "s3://team-data/text/wiki"):
            r = client.post("/v1/jobs", json={**SPEC, "data": {"source": "text", "path": path}})
            assert r.status_code == 201, r.text
        r = client.post("/v1/jobs", json={**SPEC, "data": {"source": "text", "path": "s3://team-data/other"}})
        assert r.status_code == 422 and f"reads only under {corpora}, s3://team-data/text" in r.json()["detail"]


def test_quotas_give_429_with_retry_after_and_store_nothing(db_url: str, tmp_path: Path) -> None:
    limits = {"quota_ranks": 4, "quota_queued": 3, "quota_submits_per_minute": 6}
    # Users of this test alone: the PostgreSQL database is shared by the module's tests.
    tokens = {"tokens": "a-token:alice-q,b-token:bob-q", "admin_token": "root-token"}
    with _client(db_url, tmp_path / "svc", **tokens, **limits) as client:
        before = _total(client)
        two = {**SPEC, "parallel": {"dp": 2}}
        assert client.post("/v1/jobs", json=two, headers=ALICE).status_code == 201
        assert client.post("/v1/jobs", json=two, headers=ALICE).status_code == 201
        over = client.post("/v1/jobs", json=SPEC, headers=ALICE)  # 4 ranks held, this needs 1 more
        assert over.status_code == 429 and int(over.headers["Retry-After"]) > 0
        assert (
            "alice-q's queued and running jobs hold 4 ranks and this one needs 1; the limit is 4 (ranks)"
            in over.json()["detail"]
        )
        assert client.post("/v1/jobs", json=SPEC, headers=BOB).status_code == 201  # bob's own quota
        assert _total(client) == before + 3
        # Cancelled jobs hold nothing: alice's ranks come back, then the queued-jobs limit bites.
        for job in client.get("/v1/jobs", headers=ALICE).json()["items"]:
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
        for _ in range(3):
            assert client.post("/v1/jobs", json=SPEC, headers=ALICE).status_code == 201
        queued = client.post("/v1/jobs", json=SPEC, headers=ALICE)
        assert (
            queued.status_code == 429 and "has 3 queued jobs; the limit is 3 (queued_jobs)" in queued.json()["detail"]
        )
        # Five submissions in the minute so far: one more, then the rate limit, whatever else is free.
        for job in client.get("/v1/jobs", headers=ALICE).json()["items"]:
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=ALICE)
        assert client.post("/v1/jobs", json=SPEC, headers=ALICE).status_code == 201
        rate = client.post("/v1/jobs", json=SPEC, headers=ALICE)
        assert rate.status_code == 429 and "(submissions_per_minute)" in rate.json()["detail"]
        assert 1 <= int(rate.headers["Retry-After"]) <= 60
        assert _total(client) == before + 7


def test_request_and_spec_size_limits(svc) -> None:
    client, _ = svc
    before = _total(client)
    big = b'{"name": "x", "pad": "' + b"a" * (2 << 20) + b'"}'
    r = client.post("/v1/jobs", content=big, headers={**ALICE, "Content-Type": "application/json"})
    assert r.status_code == 413 and "a job spec is under 1 MiB" in r.json()["detail"]

    def chunks():  # no Content-Length: the stream is cut off once past the limit
        for _ in range(40):
            yield b"a" * 65536

    r = client.post("/v1/jobs", content=chunks(), headers={**ALICE, "Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/jobs", json={**SPEC, "train": {**SPEC["train"], "steps": 10**9}}, headers=ALICE)
    assert r.status_code == 422 and "train.steps=1000000000: at most 10000000 on this service" in r.json()["detail"]
    r = client.post("/v1/jobs", json={**SPEC, "name": "n" * 201}, headers=ALICE)
    assert r.status_code == 422 and "name" in r.json()["detail"]
    huge = {
        **SPEC,
        "parallel": {"dp": 4096, "tp": 2},
        "train": {**SPEC["train"], "global_batch": 8192, "micro_batch": 1},
    }
    r = client.post("/v1/jobs", json=huge, headers=ALICE)
    assert r.status_code == 422 and "= 8192 ranks; at most 4096" in r.json()["detail"]
    assert _total(client) == before


def test_audit_lists_who_did_what_from_where_for_admins_only(svc) -> None:
    client, _ = svc
    job = client.post("/v1/jobs", json=SPEC, headers=ALICE).json()["id"]
    client.post(f"/v1/jobs/{job}/cancel", headers=ADMIN)
    page = client.get("/v1/audit", headers=ADMIN).json()
    mine = [e for e in page["items"] if e["job_id"] == job]
    assert [(e["kind"], e["actor"]) for e in mine] == [("cancel", "admin"), ("state", "alice")]
    assert all(e["address"] == "testclient" for e in mine)  # TestClient's client address
    assert "cancel requested by admin" in mine[0]["message"]
    only_alice = client.get("/v1/audit", params={"actor": "alice"}, headers=ADMIN).json()
    assert only_alice["total"] >= 1 and {e["actor"] for e in only_alice["items"]} == {"alice"}
    denied = client.get("/v1/audit", headers=ALICE)
    assert denied.status_code == 403 and "admins only" in denied.json()["detail"]
    events = client.get(f"/v1/jobs/{job}/events", headers=ALICE).json()  # the owner sees them on the job too
    assert [e["actor"] for e in events if e["kind"] == "cancel"] == ["admin"]


def test_the_services_spares_apply_where_a_spec_does_not_say(tmp_path: Path) -> None:
    """FOURFOLD_SPARES: the default of restart.spares for specs that leave it out, never over one that sets it."""
    with _client(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "svc", spares=2, **TOKENS) as client:
        left_out = client.post("/v1/jobs", json=SPEC, headers=ALICE).json()
        assert left_out["spec"]["restart"]["spares"] == 2
        said = client.post("/v1/jobs", json={**SPEC, "restart": {"spares": 0}}, headers=ALICE).json()
        assert said["spec"]["restart"]["spares"] == 0
        bad = client.post("/v1/jobs", json={**SPEC, "restart": {"spares": -1}}, headers=ALICE)
        assert bad.status_code == 422 and "restart.spares" in bad.text
