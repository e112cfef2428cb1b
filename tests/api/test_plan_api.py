"""The planner over HTTP: POST /v1/plan (the document `fourfold plan --json` prints), the memory check
and `auto` at submit, and GET /v1/jobs/{id}/prediction. The live cluster is a fake's resources behind a
real Supervisor that is never started (no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api import state as app_state
from api.app import create_app
from parallel.config import build_config
from service.planning import parse_cluster, plan
from service.settings import Settings
from service.store import Store
from service.supervisor import Supervisor
from tests.unit.test_supervisor import FakeGroup

GiB = 2**30
NODES = {"node-a": {"CPU": 4.0, "memory": 16.0 * GiB}}
SPEC_8B = {"model": {"preset": "8b"}, "train": {"global_batch": 256, "micro_batch": 1, "seq_len": 8192}}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    app = create_app(Settings(data_dir=tmp_path, max_world_size=64), store=store, supervise=False)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def live(client: TestClient) -> TestClient:
    """The same API with a supervisor whose cluster is `NODES` (ticked by hand, never started)."""
    state = app_state.of(client.app)  # type: ignore[arg-type]
    state.supervisor = Supervisor(state.store, group_factory=FakeGroup, resources=lambda: NODES, leftovers=lambda _: 0)
    return client


def test_plan_returns_what_the_cli_prints(client: TestClient) -> None:
    r = client.post("/v1/plan", json={"spec": SPEC_8B, "cluster": "8x8xh100-80gb", "top": 3})
    assert r.status_code == 200, r.text
    expected, _ = plan(build_config(SPEC_8B), parse_cluster("8x8xh100-80gb"), top=3)
    assert r.json() == expected  # the same document as `fourfold plan --json`
    assert r.json()["fits"] and len(r.json()["candidates"]) == 3 and r.json()["min_accelerators"]["count"] == 4


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"spec": {"parallel": {"tp": 3}}, "cluster": "8xh100"}, "spec.parallel.tp=3: model.n_heads=8 is not"),
        ({"spec": {"train": {"steps": "3"}}, "cluster": "8xh100"}, "spec.train.steps: Input should be a valid integer"),
        ({"cluster": "8x8xfoo"}, "cluster 8x8xfoo: unknown accelerator 'foo'; known: h100-80gb"),
        ({"cluster": "2000xh100"}, "cluster 2000xh100: 2000 devices; this service plans at most 1024"),
        ({}, "cluster: this API runs without a Ray cluster; name one, e.g. 8x8xh100-80gb"),
        ({"cluster": "h100", "top": 0}, "body.top: Input should be greater than or equal to 1"),
        ({"cluster": "h100", "accelerator": "h100"}, "body.accelerator: Extra inputs are not permitted"),
        ({"cluster": "4xv5p", "spec": {"train": {"dtype": "float32"}}}, "cluster 1x4xtpu-v5p: TPU v5p has no fp32"),
    ],
)
def test_plan_bad_input_is_a_422_naming_the_field(client: TestClient, body: dict, expected: str) -> None:
    r = client.post("/v1/plan", json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith(expected), r.text


def test_plan_on_the_live_cluster(live: TestClient) -> None:
    r = live.post("/v1/plan", json={"spec": {"model": {"preset": "tiny"}}, "top": 2})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["cluster"]["text"] == "1x4xcpu" and doc["notes"][0].startswith("Ray: 1 node(s) of 4 CPU slots")
    gpu = live.post("/v1/plan", json={"spec": {"resources": {"accelerator": "gpu"}}})
    assert gpu.status_code == 422 and gpu.json()["detail"].startswith("plan.accelerator: Ray does not say which GPU")


def test_submit_refuses_a_layout_predicted_not_to_fit(live: TestClient) -> None:
    r = live.post("/v1/jobs", json={"model": {"preset": "1b"}})
    assert r.status_code == 422
    assert r.json()["detail"].startswith("parallel: dp1 tp1 pp1 cp1 zero0 ac:none mb2 needs "), r.text
    assert live.get("/v1/jobs").json()["total"] == 0  # nothing stored
    forced = live.post("/v1/jobs", json={"model": {"preset": "1b"}, "plan": {"memory_check": False}})
    assert forced.status_code == 201, forced.text
    lines = [x["line"] for x in live.get(f"/v1/jobs/{forced.json()['id']}/logs").json()]
    assert lines == ["planner: memory check off (plan.memory_check: false)"]


def test_submit_auto_fills_the_ranks_and_counts_them_against_the_limits(live: TestClient) -> None:
    r = live.post("/v1/jobs", json={"model": {"preset": "tiny"}, "parallel": "auto"})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["plan"]["ranks"] == 4 and r.json()["spec"]["plan"]["auto"][:2] == ["dp", "tp"]
    over = live.post("/v1/jobs", json={"parallel": {"tp": "auto"}, "plan": {"ranks": 65}})
    assert over.status_code == 422 and over.json()["detail"] == "plan.ranks=65: at most 64 on this service"
    bad = live.post("/v1/jobs", json={"parallel": "auto", "plan": {"accelerator": "z100"}})
    assert bad.status_code == 422 and bad.json()["detail"].startswith("plan.accelerator z100: unknown accelerator")


def test_a_jobs_prediction_sits_next_to_what_it_measured(live: TestClient) -> None:
    job_id = live.post("/v1/jobs", json={"model": {"preset": "tiny"}, "parallel": {"dp": 2}}).json()["id"]
    store = app_state.of(live.app).store  # type: ignore[arg-type]
    steps = [{"step": s, "loss": 5.0, "tokens_per_s": t, "step_time_s": 1.0, "peak_mem_bytes": m}
             for s, t, m in ((1, 10.0, 100), (2, 200.0, 300), (3, 400.0, 200))]  # fmt: skip
    store.add_metrics(job_id, steps, 1)
    r = live.get(f"/v1/jobs/{job_id}/prediction")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["measured"] == {"peak_mem_bytes": 300.0, "tokens_per_s": 300.0, "step_time_s": 1.0, "steps": 3.0}
    assert doc["predicted"]["layout"].startswith("dp2 tp1") and doc["predicted"]["cluster"] == "1x2xcpu"
    assert doc["predicted"]["memory"]["total"] > 0 and doc["predicted"]["tokens_per_s"] > 0
    auto = live.post("/v1/jobs", json={"model": {"preset": "tiny"}, "parallel": "auto"}).json()["id"]
    assert live.get(f"/v1/jobs/{auto}/prediction").json()["note"].startswith("the planner chooses dp, tp, ")
    assert live.get("/v1/jobs/nope/prediction").status_code == 404
