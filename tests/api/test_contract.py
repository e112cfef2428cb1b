"""The API's contract: /openapi.json says exactly what the server answers.

Fast, without Ray: every operation documents the statuses it can return (and no others), every error
body is the one model, `{"detail": "<field>: <what is wrong>"}`, and the document is valid OpenAPI.

Marked `ray`, on a real `fourfold up` (127.0.0.1, a free port, a Ray head with no CPUs, so the jobs
the fuzzer submits are refused placement at once and nothing trains): schemathesis over the live
/openapi.json with every check and every phase, the stateful one included, a fixed seed and a bounded
number of examples, once without authentication and once with tokens; and a client that
openapi-python-client generates from the live document submits, lists, follows and cancels a job.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/api/test_contract.py -m "not ray"   # seconds
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/api/test_contract.py                # ~4 minutes
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from api.errors import ErrorBody, validation_detail
from service.settings import Settings
from service.store import Store

# Before Ray is imported (by the fixtures below): Ray uses 127.0.0.1 for every address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOKENS = {"FOURFOLD_TOKENS": "tok-alice:alice,tok-bob:bob", "FOURFOLD_ADMIN_TOKEN": "tok-admin"}
ALICE, BOB, ADMIN = ({"Authorization": f"Bearer tok-{who}"} for who in ("alice", "bob", "admin"))
SPEC = {"name": "contract", "model": {"preset": "tiny"}, "train": {"steps": 3, "global_batch": 8, "micro_batch": 2}}
SEED, EXAMPLES = 42, 100  # ~1 minute a run here

# Every operation and the statuses it answers with on a server without tokens; `WITH_TOKENS` adds
# to those. A new route fails test_every_operation_documents_its_statuses until it is listed here.
ABOUT_A_JOB = {"200", "404", "422"}
STATUSES = {
    "POST /v1/jobs": {"200", "201", "413", "422", "429"},
    "GET /v1/jobs": {"200", "422"},
    "GET /v1/jobs/{job_id}": ABOUT_A_JOB,
    "POST /v1/jobs/{job_id}/cancel": ABOUT_A_JOB | {"409"},
    "GET /v1/jobs/{job_id}/metrics": ABOUT_A_JOB,
    "GET /v1/jobs/{job_id}/events": ABOUT_A_JOB,
    "GET /v1/jobs/{job_id}/logs": ABOUT_A_JOB,
    "GET /v1/jobs/{job_id}/attempts": ABOUT_A_JOB,
    "POST /v1/jobs/{job_id}/stream-ticket": ABOUT_A_JOB | {"503"},
    "GET /v1/jobs/{job_id}/stream": ABOUT_A_JOB | {"401"},  # a bad ticket is a 401 even without tokens
    "GET /v1/audit": {"200", "422"},
    "GET /healthz": {"200"},
    "GET /metrics": {"200"},
    "GET /v1/cluster": {"200"},
    "POST /v1/plan": {"200", "422"},
    "GET /v1/jobs/{job_id}/prediction": ABOUT_A_JOB,
}
WITH_TOKENS = {op: {"401"} for op in STATUSES if op not in ("GET /healthz", "GET /metrics")}
WITH_TOKENS["GET /v1/audit"] = {"401", "403"}  # admins only, and without tokens every caller is one


def _operations(schema: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{m.upper()} {path}": op for path, item in schema["paths"].items() for m, op in item.items()}


def _app(tmp_path: Path, **settings: Any) -> FastAPI:
    return create_app(Settings(data_dir=tmp_path, **settings), store=Store(f"sqlite:///{tmp_path / 'store.db'}"))


@pytest.mark.parametrize("tokens", [False, True], ids=["no-tokens", "tokens"])
def test_every_operation_documents_its_statuses(tmp_path: Path, tokens: bool) -> None:
    app = _app(tmp_path, **({"tokens": TOKENS["FOURFOLD_TOKENS"]} if tokens else {}))
    schema = app.openapi()
    operations = _operations(schema)
    assert set(operations) == set(STATUSES)
    for label, op in operations.items():
        expected = STATUSES[label] | (WITH_TOKENS.get(label, set()) if tokens else set())
        assert set(op["responses"]) == expected, label
        for code, response in op["responses"].items():
            if int(code) >= 400:  # every error is the one model
                assert response["content"] == {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                }
            assert not any(key.startswith("x-fourfold") for key in response), label
        # The bearer scheme where a token is asked for, and nowhere on a server without tokens.
        assert ("security" in op) == (tokens and "401" in WITH_TOKENS.get(label, set())), label
    assert ("securitySchemes" in schema["components"]) == tokens
    submit = operations["POST /v1/jobs"]
    assert submit["responses"]["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}
    body = submit["requestBody"]["content"]
    assert body == {
        t: {"schema": {"$ref": "#/components/schemas/JobSpec"}} for t in ("application/json", "application/yaml")
    }
    ids = {op["operationId"] for op in operations.values()}
    for code in ("200", "201"):
        links = submit["responses"][code]["links"]
        assert {link["operationId"] for link in links.values()} <= ids and len(links) == 7
    assert set(operations["GET /metrics"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(operations["GET /v1/jobs/{job_id}/stream"]["responses"]["200"]["content"]) == {"text/event-stream"}
    if tokens:
        assert operations["GET /v1/jobs/{job_id}/stream"]["security"] == [{"HTTPBearer": []}, {"StreamTicket": []}]


def test_the_first_token_in_the_store_turns_the_documented_auth_on(tmp_path: Path) -> None:
    from service.tokens import Tokens

    with TestClient(_app(tmp_path)) as client:
        before = _operations(client.get("/openapi.json").json())["GET /v1/jobs"]
        assert "security" not in before and "401" not in before["responses"]
        token, _ = Tokens(client.app.state.store).create("carol")
        after = _operations(client.get("/openapi.json").json())["GET /v1/jobs"]
        assert after["security"] == [{"HTTPBearer": []}] and "401" in after["responses"]
        assert client.get("/v1/jobs").status_code == 401  # as the document now says
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_document_is_valid_openapi_and_the_spec_schema_is_the_engines(tmp_path: Path) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    from parallel.config import Config

    for tokens in ("", TOKENS["FOURFOLD_TOKENS"]):
        schema = _app(tmp_path, tokens=tokens).openapi()
        validator.validate(schema)
    spec = schema["components"]["schemas"]["JobSpec"]
    assert set(spec["properties"]) == set(Config.model_fields) | {"priority"}
    assert spec["additionalProperties"] is False
    assert spec["properties"]["priority"] == {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0,
                                               "title": "Priority", "description": spec["properties"]["priority"]["description"]}  # fmt: skip
    checkpoint = schema["components"]["schemas"]["CheckpointConfig"]
    assert "async" in checkpoint["properties"]  # by alias, as a spec spells it


@pytest.fixture
def authed(tmp_path: Path) -> Iterator[TestClient]:
    app = _app(tmp_path, tokens=TOKENS["FOURFOLD_TOKENS"], admin_token="tok-admin", quota_submits_per_minute=3)
    with TestClient(app) as client:
        yield client


def test_error_bodies_are_the_one_model_and_documented(authed: TestClient) -> None:
    job = authed.post("/v1/jobs", json=SPEC, headers=ALICE).json()["id"]
    assert authed.post(f"/v1/jobs/{job}/cancel", headers=ALICE).status_code == 200
    unknown = "0" * 32
    # (operation, method, url, request arguments, status, what `detail` starts with)
    cases: list[tuple[str | None, str, str, dict[str, Any], int, str]] = [
        (None, "GET", "/nope", {}, 404, "path: no route /nope"),
        (None, "DELETE", "/v1/jobs", {}, 405, "method: DELETE is not allowed on /v1/jobs; allowed: GET, POST"),
        ("GET /v1/jobs", "GET", "/v1/jobs?limit=0", {}, 422, "query.limit: Input should be greater than or equal to 1"),
        ("GET /v1/jobs", "GET", "/v1/jobs?status=RUNNING", {}, 422, "query: unknown parameter status"),
        ("GET /v1/jobs", "GET", "/v1/jobs", {"headers": {}}, 401, "missing or unknown bearer token"),
        ("GET /v1/jobs", "GET", "/v1/jobs", {"headers": {"Authorization": "Bearer nope"}}, 401, "missing or unknown"),
        ("POST /v1/jobs", "POST", "/v1/jobs", {"json": {"train": {"lr": -1}}}, 422, "train.lr: Input should be greater than 0"),
        ("POST /v1/jobs", "POST", "/v1/jobs", {"json": {"train": {"steps": "3"}}}, 422, "train.steps: Input should be a valid integer"),
        ("POST /v1/jobs", "POST", "/v1/jobs", {"json": {"parallel": {"zero": True}}}, 422, "parallel.zero: Input should be 0, 1, 2 or 3"),
        ("POST /v1/jobs", "POST", "/v1/jobs", {"json": SPEC, "headers": {**ALICE, "Idempotency-Key": ""}}, 422,
         "header.idempotency-key: String should have at least 1 character"),
        ("POST /v1/jobs", "POST", "/v1/jobs", {"content": b"{" + b" " * (1 << 20) + b"}"}, 413, "body: "),
        ("GET /v1/jobs/{job_id}", "GET", f"/v1/jobs/{unknown}", {}, 404, f"no job {unknown}"),
        ("GET /v1/jobs/{job_id}", "GET", f"/v1/jobs/{job}", {"headers": BOB}, 404, f"no job {job}"),
        ("GET /v1/jobs/{job_id}/events", "GET", f"/v1/jobs/{job}/events?after_id=-1", {}, 422, "query.after_id: Input should be greater than or equal to 0"),
        ("POST /v1/jobs/{job_id}/cancel", "POST", f"/v1/jobs/{job}/cancel", {}, 409, f"job {job} already ended"),
        ("GET /v1/jobs/{job_id}/stream", "GET", f"/v1/jobs/{job}/stream?ticket=bogus", {"headers": {}}, 401, "ticket: unknown"),
        ("GET /v1/audit", "GET", "/v1/audit", {}, 403, "audit: admins only"),
        ("GET /v1/cluster", "GET", "/v1/cluster", {"headers": {}}, 401, "missing or unknown bearer token"),
    ]  # fmt: skip
    for _ in range(3):  # alice's third submission in a minute, the quota, made the fourth a 429
        last = authed.post("/v1/jobs", json=SPEC, headers=ALICE)
    cases.append(("POST /v1/jobs", "POST", "/v1/jobs", {"json": SPEC}, 429, ""))
    operations = _operations(authed.app.openapi())
    for op, method, url, kwargs, code, start in cases:
        kwargs.setdefault("headers", ALICE)
        r = authed.request(method, url, **kwargs)
        assert r.status_code == code, (method, url, r.text)
        body = ErrorBody.model_validate(r.json())  # exactly {"detail": str}: no other key
        assert body.detail.startswith(start) and "\n" not in body.detail, (url, body.detail)
        if op is not None:
            assert str(code) in operations[op]["responses"], (op, code)
        if code == 401:
            assert r.headers["WWW-Authenticate"] == "Bearer"
        if code == 405:
            assert r.headers["Allow"] == "GET, POST"
        if code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and last.status_code in (201, 429)


def test_a_bug_is_still_the_model_and_names_no_internals(tmp_path: Path) -> None:
    app = _app(tmp_path)

    @app.get("/boom", include_in_schema=False)
    def boom() -> None:
        raise RuntimeError("secret internals")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500 and "secret" not in r.text
    assert ErrorBody.model_validate(r.json()).detail.startswith("server: internal error (RuntimeError)")


def test_validation_errors_read_as_one_line() -> None:
    errors = [
        {"type": "less_than_equal", "loc": ("query", "limit"), "msg": "Input should be less than or equal to 500", "input": "501"},
        {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None},
        {"type": "value_error", "loc": ("query", "state"), "msg": "Value error, not a state", "input": ["x"]},
    ]  # fmt: skip
    assert validation_detail(errors) == (
        "query.limit: Input should be less than or equal to 500 (got '501'); body: Field required; query.state: not a state"
    )


def test_yaml_and_json_specs_hold_the_types_the_schema_says(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path)) as client:
        yaml_body = "name: floats\nmodel: {preset: tiny}\ntrain: {lr: 1e-3, steps: 2}\n"
        made = client.post("/v1/jobs", content=yaml_body, headers={"Content-Type": "application/yaml"})
        assert made.status_code == 201, made.text
        assert made.json()["spec"]["train"]["lr"] == 0.001  # YAML 1.2's float, not the string '1e-3'
        for section, value, message in [
            ("restart", {"backoff_s": False}, "restart.backoff_s: Input should be a valid number"),
            ("train", {"lr": "0.1"}, "train.lr: Input should be a valid number"),
            ("checkpoint", {"async": 1}, "checkpoint.async: Input should be a valid boolean"),
        ]:
            r = client.post("/v1/jobs", json={**SPEC, section: value})
            assert r.status_code == 422 and r.json()["detail"].startswith(message), r.text


# -- on a real `fourfold up` --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Any]:
    """A Ray head on 127.0.0.1 with no CPUs: every job the services below accept is refused placement
    (FAILED at once), so the fuzzer's submissions train nothing."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    yield cluster
    cluster.shutdown()


@pytest.fixture
def fourfold_up(ray_head: Any, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts `fourfold up` on a free port with the given environment; its base URL. Stopped with
    `fourfold down`, or by its pid if that fails."""
    started: list[tuple[subprocess.Popen, Path, dict[str, str]]] = []

    def up(**env: str) -> str:
        port, data = _free_port(), tmp_path / f"svc{len(started)}"
        drop = ("RAY_ADDRESS", "FOURFOLD_TOKENS", "FOURFOLD_ADMIN_TOKEN", "FOURFOLD_TEST_HOLD", "FOURFOLD_TEST_STALL")
        full = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("FOURFOLD_QUOTA")}
        full |= {"RAY_ADDRESS": ray_head.address, "OMP_NUM_THREADS": "1", **env}
        args = [sys.executable, "-m", "api.cli", "up", "--port", str(port), "--data-dir", str(data)]
        data.mkdir()
        with open(data / "service.log", "ab") as log:
            proc = subprocess.Popen(args, env=full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        started.append((proc, data, full))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (data / "service.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (data / "service.log").read_text()[-3000:]
            time.sleep(0.5)

    yield up
    for proc, data, env in started:
        down = [sys.executable, "-m", "api.cli", "down", "--data-dir", str(data)]
        subprocess.run(down, env=env, cwd=ROOT, capture_output=True, timeout=120)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log = (data / "service.log").read_text()
        assert "Traceback" not in log, log[-3000:]  # nothing failed inside, even where the answer was fine


# Schema-valid specs that the server refuses, rightly, with a 422 naming the field: rules across fields
# that a JSON schema cannot state (tp must divide the heads, the global batch split over dp x
# micro_batch, pp_virtual with its schedule, a preset-less model's dimensions, ...), a fractional
# cpus_per_rank above 1, paths outside what the service lets jobs read and write, the operator's
# limits (train.steps, the world size), and an Idempotency-Key used before for another spec. The
# planner (POST /v1/plan) takes the same spec, and a cluster string naming an accelerator in its table.
# Only these operations expect a 422 for schema-valid data; every other check stays as schemathesis has it.
SCHEMATHESIS_TOML = """
request-timeout = 30

[[operations]]
include-operation-id = "submit_job"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "413", "422", "429"]

[[operations]]
include-operation-id = "plan"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "422"]
"""


def _schemathesis(base: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """Run schemathesis over the live document: every check, every phase. What it found."""
    (tmp_path / "schemathesis.toml").write_text(SCHEMATHESIS_TOML)
    report = tmp_path / "schemathesis.ndjson"
    args = [str(BIN / "schemathesis"), "--config-file", "schemathesis.toml", "run", f"{base}/openapi.json",
            "--checks", "all", "--seed", str(SEED), "--max-examples", str(EXAMPLES), "--workers", "1",
            "--generation-database", "none", "--no-color", "--report", "ndjson",
            "--report-ndjson-path", str(report), *extra]  # fmt: skip
    start = time.monotonic()
    run = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=480)
    failures, statuses, phases = [], Counter(), {}
    for line in report.read_text().splitlines():
        event = json.loads(line)
        if (phase := event.get("PhaseFinished")) is not None:
            phases[phase["phase"]["name"]] = phase["status"]
        recorder = (event.get("ScenarioFinished") or {}).get("recorder") or {}
        for checks in (recorder.get("checks") or {}).values():
            failures += [f"{recorder['label']}: {c['name']}" for c in checks if c["status"] == "failure"]
        for interaction in (recorder.get("interactions") or {}).values():
            if interaction.get("response"):
                statuses[interaction["response"]["status_code"]] += 1
    out = run.stdout[-6000:] + run.stderr[-2000:]
    return {"rc": run.returncode, "out": out, "failures": failures, "statuses": statuses, "phases": phases,
            "seconds": time.monotonic() - start}  # fmt: skip


def _assert_clean(found: dict[str, Any]) -> None:
    assert found["failures"] == [] and found["rc"] == 0, found["out"]
    assert not [s for s in found["statuses"] if s >= 500], (found["statuses"], found["out"])
    assert found["phases"].get("stateful") == "success" and found["phases"].get("fuzzing") == "success", found
    assert found["statuses"][201] > 0 and found["statuses"][404] > 0 and found["statuses"][422] > 0, found


@pytest.mark.ray
def test_schemathesis_without_tokens(fourfold_up: Callable[..., str], tmp_path: Path) -> None:
    found = _schemathesis(fourfold_up(), tmp_path)
    _assert_clean(found)
    print(f"schemathesis without tokens: {found['seconds']:.0f} s, {sum(found['statuses'].values())} requests")


@pytest.mark.ray
def test_schemathesis_with_tokens(fourfold_up: Callable[..., str], tmp_path: Path) -> None:
    # Three identities (Web Fuzzing Commons auth file): schemathesis also checks that one user cannot
    # read another's job, and that each route refuses a missing or made-up token.
    auth = {"auth": [{"name": who, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer tok-{who}"}]}
                     for who in ("alice", "bob", "admin")]}  # fmt: skip
    (tmp_path / "auth.json").write_text(json.dumps(auth))
    base = fourfold_up(**TOKENS, FOURFOLD_QUOTA_SUBMITS_PER_MINUTE="200")
    found = _schemathesis(base, tmp_path, "--auth-wfc", str(tmp_path / "auth.json"))
    _assert_clean(found)
    assert found["statuses"][401] > 0, found["statuses"]
    print(f"schemathesis with tokens: {found['seconds']:.0f} s, {sum(found['statuses'].values())} requests")


@pytest.fixture
def one_cpu(ray_head: Any) -> Iterator[None]:
    """A worker node with one CPU, for as long as a test needs a job to run."""
    node = ray_head.add_node(num_cpus=1)
    ray_head.wait_for_nodes()
    yield
    ray_head.remove_node(node)


@pytest.mark.ray
def test_a_generated_client_submits_lists_follows_and_cancels(
    one_cpu: None, fourfold_up: Callable[..., str], tmp_path: Path
) -> None:
    # From step 2 on the ranks wait after each step until a file that never comes exists, or a stop
    # is requested: the job is still running when the client cancels it, however fast the machine.
    base = fourfold_up(**TOKENS, FOURFOLD_TEST_HOLD=f"2:{tmp_path / 'never'}")
    (tmp_path / "openapi.json").write_text(httpx.get(f"{base}/openapi.json").text)
    package = tmp_path / "fourfold_contract_client"
    gen = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
         "--output-path", str(package)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # It warns that it cannot send YAML (it sends the spec as JSON); the client is made all the same.
    assert gen.returncode == 0 and (package / "api" / "jobs" / "submit_job.py").is_file(), gen.stdout + gen.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        _drive_a_job(base, "fourfold_contract_client")
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m.split(".")[0] == "fourfold_contract_client"]:
            del sys.modules[name]


def _drive_a_job(base: str, package: str) -> None:
    client_mod = importlib.import_module(package)
    jobs = importlib.import_module(f"{package}.api.jobs")
    models = importlib.import_module(f"{package}.models")
    for name in ("submit_job", "list_jobs", "get_job", "cancel_job", "job_events", "job_logs", "job_metrics"):
        importlib.import_module(f"{package}.api.jobs.{name}")
    alice = client_mod.AuthenticatedClient(base_url=base, token="tok-alice", raise_on_unexpected_status=True)
    nobody = client_mod.Client(base_url=base, raise_on_unexpected_status=True)

    spec = models.JobSpec(
        name="generated-client",
        model=models.ModelConfig(preset=models.ModelConfigPresetType0.TINY),
        parallel=models.ParallelConfig(dp=1),
        train=models.TrainConfig(steps=50, global_batch=2, micro_batch=2, seq_len=32),
        priority=5,
    )
    job = jobs.submit_job.sync(client=alice, body=spec)
    assert isinstance(job, models.JobPublic) and job.state == models.JobState.QUEUED and job.priority == 5
    listed = jobs.list_jobs.sync(client=alice, state=models.JobState.QUEUED)
    assert job.id in [j.id for j in listed.items]

    deadline = time.monotonic() + 240  # the rank starts on Ray, trains two steps, and holds
    while not (metrics := jobs.job_metrics.sync(job.id, client=alice)) or metrics[-1].step < 2:
        state = jobs.get_job.sync(job.id, client=alice)
        assert state.state not in (models.JobState.FAILED, models.JobState.CANCELLED), state.failure_reason
        assert time.monotonic() < deadline, f"still {state.state} without two steps"
        time.sleep(1)
    assert [m.step for m in metrics][:2] == [1, 2] and all(m.loss > 0 for m in metrics)
    assert any(line.line.startswith("step 2/50") for line in jobs.job_logs.sync(job.id, client=alice))

    cancelled = jobs.cancel_job.sync(job.id, client=alice)
    assert cancelled.cancel_requested
    while (now := jobs.get_job.sync(job.id, client=alice)).state != models.JobState.CANCELLED:
        assert now.state not in (models.JobState.FAILED, models.JobState.SUCCEEDED), now.failure_reason
        assert time.monotonic() < deadline + 120, now.state
        time.sleep(1)
    states = [e.to_state for e in jobs.job_events.sync(job.id, client=alice)]
    assert models.JobState.RUNNING in states and states[-1] == models.JobState.CANCELLED

    # Errors arrive as the one model, parsed by the client like any other answer.
    again = jobs.cancel_job.sync(job.id, client=alice)
    assert isinstance(again, models.ErrorBody) and again.detail.startswith(f"job {job.id} already ended")
    missing = jobs.get_job.sync("0" * 32, client=alice)
    assert isinstance(missing, models.ErrorBody) and missing.detail == f"no job {'0' * 32}"
    refused = jobs.list_jobs.sync(client=nobody)
    assert isinstance(refused, models.ErrorBody) and "bearer token" in refused.detail
