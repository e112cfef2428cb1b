"""Static checks of the deployment: the Dockerfile, the compose files, the Kustomize overlays, the
Prometheus configs and alert rules, the Grafana dashboard. Nothing is built or started: no Docker
engine, no cluster. Each file goes through the real validator (run without network, see
checks.offline_prefix), and each validator is also given a broken copy that it must refuse, so that
a validator passing everything silently would fail here.

    .venv/bin/python -m pytest -q tests/deploy          # about 30 s (test_static.py); test_topology.py adds about 70 s

Needs pyproject's `deploy` extra (in `dev`), kubectl, Debian's `prometheus` (promtool) and KubeRay's
CRDs in ../shared/kuberay-v1.7.0/.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy import checks
from tests.deploy.checks import DEPLOY, ROOT, run, tool
from tests.deploy.layout import compose_problems, head_problems, ray_auth_problems

pytestmark = pytest.mark.deploy

KUSTOMIZATIONS = {
    "base": DEPLOY / "k8s" / "base",
    "cpu-dev": DEPLOY / "k8s" / "overlays" / "cpu-dev",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
    "rayjob": DEPLOY / "k8s" / "examples" / "rayjob",
}
COMPOSE = {"cpu": [ROOT / "docker-compose.yml"], "gpu": [ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"]}
# What .env would hold: recognisable values, so that the rendered config can be searched for them.
SECRETS = {
    "FOURFOLD_TOKENS": "tok-alice-0001:alice",
    "FOURFOLD_ADMIN_TOKEN": "tok-admin-0002",
    "POSTGRES_PASSWORD": "pgpass0003",
    "RAY_AUTH_TOKEN": "raytok0004",
    "GRAFANA_ADMIN_PASSWORD": "gfpass0005",
}


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict]]:
    out = {}
    for name, path in KUSTOMIZATIONS.items():
        docs, err = checks.kustomize(path)
        assert docs, f"kubectl kustomize {path.relative_to(ROOT)} failed: {err}"
        out[name] = docs
    return out


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose") / "test.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    return path


@pytest.fixture(scope="module")
def composed(env_file: Path) -> dict[str, dict]:
    out = {}
    for name, files in COMPOSE.items():
        config, err = checks.compose_config(files, {}, env_file)
        assert config is not None, f"docker compose config ({name}) refused: {err}"
        out[name] = config
    return out


@pytest.fixture(scope="module")
def exposed_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The sample names GET /metrics serves once a request was answered and a job has reported a
    step, restarted and recovered."""
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=tmp_path_factory.mktemp("svc")))
    with TestClient(app) as client:
        metrics = app.state.metrics
        metrics.observe_step("j1", {"step": 3, "loss": 4.5, "tokens_per_s": 1e3, "mfu": 0.3, "step_time_s": 0.5})
        metrics.restarts.labels(job="j1").inc()
        metrics.observe_recovery("j1", 7.5)
        client.get("/healthz")  # a request for the latency histogram
        text = client.get("/metrics").text
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def broken_copy(tmp_path: Path, src: Path, edit: dict[str, str]) -> Path:
    """A copy of the directory `src` with `edit`'s files (relative paths) replaced by new text."""
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for rel, text in edit.items():
        (dst / rel).write_text(text)
    return dst


# -- the validators, each on the real files and on a broken copy --------------------------------


def test_validators_run_offline() -> None:
    if not checks.offline_prefix():
        pytest.skip("unshare --net is not allowed here: the validators ran with the network")
    assert run("python3", "-c", "import socket; socket.create_connection(('pypi.org', 443), 3)").returncode != 0


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_kustomization_renders(renders: dict, name: str, tmp_path: Path) -> None:
    assert renders[name]
    kustomization = (KUSTOMIZATIONS[name] / "kustomization.yaml").read_text()
    broken = broken_copy(tmp_path, KUSTOMIZATIONS[name], {"kustomization.yaml": kustomization + "nameSuffx: -x\n"})
    docs, err = checks.kustomize(broken)
    assert not docs and "nameSuffx" in err


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_builtin_kinds_pass_kubernetes_validate_strict(renders: dict, name: str, tmp_path: Path) -> None:
    docs = checks.builtin(renders[name])
    assert any(d["kind"] == "PodTemplate" for d in docs)  # the Ray pod templates are in
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    for version in checks.K8S_VERSIONS:
        out = run(sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count(" passed for resource ") == len(docs), out.stdout  # none skipped
    bad = copy.deepcopy(docs)
    bad[-1]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    path.write_text(yaml.safe_dump_all(bad))
    out = run(sys.executable, "-m", "kubernetes_validate", "--strict", path)
    assert out.returncode != 0 and "imagePullPolicyy" in out.stdout + out.stderr


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ray_resources_pass_kuberay_crds_strictly(renders: dict, name: str) -> None:
    """Against the openAPIV3Schema of KubeRay v1.7.0's own CRDs, unknown fields refused."""
    rays = [d for d in renders[name] if d["apiVersion"] == "ray.io/v1"]
    assert rays and {d["kind"] for d in rays} <= set(checks.CRDS)
    for doc in rays:
        assert checks.crd_problems(doc) == []
        # A misspelt field, which the API server would drop without a word, and a rayStartParams
        # value that is not a string (KubeRay wants "0", not 0).
        misspelt, numeric = copy.deepcopy(doc), copy.deepcopy(doc)
        head = misspelt["spec"].get("rayClusterSpec", misspelt["spec"])["headGroupSpec"]
        head["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
        assert any("'imagePulPolicy' was unexpected" in p for p in checks.crd_problems(misspelt))
        numeric["spec"].get("rayClusterSpec", numeric["spec"])["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
        assert any("0 is not of type 'string'" in p for p in checks.crd_problems(numeric))


@pytest.mark.parametrize("name", COMPOSE)
def test_compose_files_pass_docker_compose_config(composed: dict, name: str, env_file: Path, tmp_path: Path) -> None:
    assert set(composed[name]["services"]) == {"ray-head", "api", "ray-worker", "postgres", "prometheus", "grafana"}
    # The API listens on 0.0.0.0, so Compose itself refuses to start it without tokens.
    env_file.with_name("no-tokens.env").write_text(env_file.read_text().replace("FOURFOLD_TOKENS", "#"))
    config, err = checks.compose_config(COMPOSE[name], {}, env_file.with_name("no-tokens.env"))
    assert config is None and "FOURFOLD_TOKENS" in err
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE[name][0].read_text().replace("    shm_size: 1gb", "    shm_sise: 1gb"))
    config, err = checks.compose_config([broken, *COMPOSE[name][1:]], {}, env_file)
    assert config is None and "shm_sise" in err


@pytest.mark.parametrize("path", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_pass_the_compose_spec_schema(path: str, tmp_path: Path) -> None:
    schema = ("-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec")
    out = run(sys.executable, *schema, ROOT / path)
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / path
    broken.write_text((ROOT / path).read_text().replace("ray-worker:\n", "ray-worker:\n    replica_count: 2\n", 1))
    out = run(sys.executable, *schema, broken)
    assert out.returncode != 0 and "replica_count" in out.stdout + out.stderr


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    out = run(tool("hadolint"), ROOT / "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr
    broken = tmp_path / "Dockerfile"
    text = (ROOT / "Dockerfile").read_text()
    broken.write_text(text.replace("RUN pip install --no-cache-dir --no-deps", "RUN pip install --no-deps"))
    out = run(tool("hadolint"), broken)
    assert out.returncode != 0 and "DL3042" in out.stdout  # pip's cache left in the image


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-local.yml"])
def test_prometheus_configs_pass_promtool(config: str, tmp_path: Path) -> None:
    out = run(tool("promtool"), "check", "config", DEPLOY / "prometheus" / config)
    assert out.returncode == 0 and "SUCCESS: 1 rule files found" in out.stdout, out.stdout + out.stderr
    text = (DEPLOY / "prometheus" / config).read_text().replace("scrape_interval: ", "scrape_interval: x")
    broken = broken_copy(tmp_path, DEPLOY / "prometheus", {config: text})
    out = run(tool("promtool"), "check", "config", broken / config)
    assert out.returncode != 0 and "not a valid duration" in out.stdout + out.stderr


def test_local_targets_are_checked_too(tmp_path: Path) -> None:
    """prometheus-local.yml reads its targets from files; promtool checks those as well."""
    broken = broken_copy(tmp_path, DEPLOY / "prometheus", {"targets/api.json": '[{"targets": "127.0.0.1:8000"}]'})
    out = run(tool("promtool"), "check", "config", broken / "prometheus-local.yml")
    assert out.returncode != 0 and "SD file" in out.stdout + out.stderr


def test_alert_rules_pass_their_unit_tests(tmp_path: Path) -> None:
    tests = Path("tests") / "fourfold.rules.test.yml"
    out = run(tool("promtool"), "test", "rules", tests, cwd=DEPLOY / "prometheus")
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    # A wrong expectation fails...
    text = (DEPLOY / "prometheus" / tests).read_text()
    broken = broken_copy(tmp_path, DEPLOY / "prometheus", {str(tests): text.replace("still at step 50", "at step 49")})
    assert run(tool("promtool"), "test", "rules", tests, cwd=broken).returncode != 0


@pytest.mark.parametrize(
    "cut",
    [
        "          and fourfold_job_step offset 15m\n",  # a job younger than 15 minutes would fire
        "          or (fourfold_job_restarts_total > 0 unless fourfold_job_restarts_total offset 1h)\n",  # first restart
        "        for: 15m\n",  # one slow step would fire the MFU alert
    ],
)
def test_each_rule_term_is_needed_by_a_unit_test(cut: str, tmp_path: Path) -> None:
    """...and so does each rule with one of its guards removed: the unit tests cover them."""
    rules = (DEPLOY / "prometheus" / "rules" / "fourfold.rules.yml").read_text()
    assert cut in rules
    broken = broken_copy(tmp_path, DEPLOY / "prometheus", {"rules/fourfold.rules.yml": rules.replace(cut, "", 1)})
    assert run(tool("promtool"), "check", "rules", broken / "rules" / "fourfold.rules.yml").returncode == 0
    assert run(tool("promtool"), "test", "rules", "tests/fourfold.rules.test.yml", cwd=broken).returncode != 0


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables filled in) as a recording rule."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fourfold.json").read_text())

    def rules_of(exprs: list[str]) -> str:
        fill = {"$job": ".*", "$__rate_interval": "1m", "label_values(fourfold_job_step, job)": "fourfold_job_step"}
        rules = []
        for i, expr in enumerate(exprs):
            for var, value in fill.items():
                expr = expr.replace(var, value)
            rules.append({"record": f"dashboard:query_{i}", "expr": expr})
        return yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})

    path = tmp_path / "dashboard.rules.yml"
    path.write_text(rules_of(checks.dashboard_exprs(dashboard)))
    out = run(tool("promtool"), "check", "rules", path)
    assert out.returncode == 0, out.stdout + out.stderr
    path.write_text(rules_of([*checks.dashboard_exprs(dashboard), "rate(fourfold_job_step[5m]"]))
    assert run(tool("promtool"), "check", "rules", path).returncode != 0


# -- invariants of the rendered output ----------------------------------------------------------


def test_versions_match_pyproject(renders: dict, composed: dict) -> None:
    import ray
    from packaging.specifiers import SpecifierSet

    pin, version = checks.ray_pin(), checks.pyproject()["project"]["version"]
    assert ray.__version__ == pin, f"the venv's Ray {ray.__version__} is not pyproject's {pin}"
    for docs in renders.values():
        assert checks.version_problems(docs, [], pin, version) == []
    for config in composed.values():
        assert checks.version_problems([], [s["image"] for s in config["services"].values()], pin, version) == []
    # The image takes Ray from pyproject's own list (no pin of its own) and a torch inside its range.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY pyproject.toml" in dockerfile and "['optional-dependencies']['cluster']" in dockerfile
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "ray==" not in instructions and "ray[" not in instructions
    torch_range = next(r for r in checks.pyproject()["project"]["dependencies"] if r.startswith("torch"))
    torch_default = dockerfile.split("ARG TORCH_VERSION=")[1].split()[0]
    assert torch_default in SpecifierSet(torch_range.removeprefix("torch"))
    stale = copy.deepcopy(renders["gpu"])
    next(d for d in stale if d["kind"] == "RayCluster")["spec"]["rayVersion"] = "2.59.0"
    assert len(checks.version_problems(stale, ["fourfold:0.0.9"], pin, version)) == 2


def test_only_the_gpu_overlay_asks_for_gpus(renders: dict, composed: dict) -> None:
    for name, docs in renders.items():
        asks = checks.gpu_asks(docs)
        if name == "gpu":
            assert any("toleration" in a for a in asks) and any("nvidia.com/gpu" in a for a in asks)
            assert all("/workerGroupSpecs/" in a for a in asks), asks  # the workers, never the head
        else:
            assert asks == [], f"{name} asks for GPUs: {asks}"
    assert checks.compose_gpu_asks(composed["cpu"]) == [] and checks.compose_gpu_asks(composed["gpu"]) == ["ray-worker"]
    leaky = copy.deepcopy(renders["cpu-dev"])
    worker = next(d for d in leaky if d["kind"] == "RayCluster")["spec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "1"
    assert checks.gpu_asks(leaky)


def test_no_secret_values_in_plain_text(renders: dict, composed: dict) -> None:
    for docs in renders.values():
        assert checks.k8s_secret_problems(docs) == []
    raw = {p: yaml.safe_load((ROOT / p).read_text()) for p in ("docker-compose.yml", "docker-compose.gpu.yml")}
    for doc in raw.values():
        assert checks.compose_secret_problems(doc) == []
    for config in composed.values():  # the secrets reach containers as files, never as environment
        environment = json.dumps({n: s.get("environment", {}) for n, s in config["services"].items()})
        assert SECRETS["RAY_AUTH_TOKEN"] not in environment and SECRETS["GRAFANA_ADMIN_PASSWORD"] not in environment
    example = (DEPLOY / "compose.env.example").read_text()
    assert checks.env_file_problems(example) == [] and all(f"\n{k}=" in example for k in SECRETS)
    assert checks.dockerfile_problems((ROOT / "Dockerfile").read_text()) == []
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*" and not any(".env" in line or "secret" in line for line in ignore)  # an allow-list
    # Each check finds a credential written in.
    leaky = copy.deepcopy(renders["gpu"])
    fourfold = next(c for _, c in checks.containers(leaky) if c["name"] == "fourfold")
    next(e for e in fourfold["env"] if e["name"] == "FOURFOLD_TOKENS").update(value="tok:alice", valueFrom={})
    leaky.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "b"}})
    assert len(checks.k8s_secret_problems(leaky)) == 2
    leaky_compose = copy.deepcopy(raw["docker-compose.yml"])
    leaky_compose["services"]["api"]["environment"]["DATABASE_URL"] = "postgresql://fourfold:hunter2@postgres/fourfold"
    assert checks.compose_secret_problems(leaky_compose)
    assert checks.env_file_problems(example.replace("\nRAY_AUTH_TOKEN=", "\nRAY_AUTH_TOKEN=abc"))
    assert checks.dockerfile_problems("FROM x\nARG HF_TOKEN\n")


def test_every_fourfold_variable_set_is_one_fourfold_reads(renders: dict, composed: dict) -> None:
    names = {name for docs in renders.values() for _, c in checks.containers(docs) for name in checks.env_of(c)}
    services = [svc for config in composed.values() for svc in config["services"].values()]
    names |= {name for svc in services for name in svc.get("environment", {})}
    names |= set(checks.dockerfile_variables((ROOT / "Dockerfile").read_text()))
    assert {"FOURFOLD_TOKENS", "FOURFOLD_HOST", "FOURFOLD_DATA_DIR"} <= names  # not vacuous
    known = checks.fourfold_variables_read()
    assert checks.unknown_fourfold_variables(names, known) == []
    assert checks.unknown_fourfold_variables(names | {"FOURFOLD_WORKERS"}, known) == ["FOURFOLD_WORKERS"]


def test_ray_auth_agrees_everywhere(renders: dict, composed: dict) -> None:
    for docs in renders.values():
        assert ray_auth_problems(docs, None) == []
    for config in composed.values():
        assert ray_auth_problems([], config) == []
    broken = copy.deepcopy(composed["cpu"])
    del broken["services"]["ray-worker"]["environment"]["RAY_AUTH_MODE"]
    assert ray_auth_problems([], broken) == ["compose ray-worker: not in token mode with the mounted ray_auth_token"]


@pytest.mark.parametrize("name", ["base", "cpu-dev", "gpu"])
def test_head_pod_and_its_neighbours(renders: dict, name: str) -> None:
    assert head_problems(renders[name]) == []
    broken = copy.deepcopy(renders[name])
    cluster = next(d for d in broken if d["kind"] == "RayCluster")
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = "1"
    cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]["volumeMounts"].pop(0)  # /tmp/ray
    assert head_problems(broken) == [
        "the head takes ranks (num-cpus is not 0)",
        "the control plane does not share the head's /tmp/ray",
    ]


@pytest.mark.parametrize("name", COMPOSE)
def test_compose_layout_and_scrape_targets(composed: dict, name: str, env_file: Path) -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert compose_problems(composed[name], prometheus, source) == []
    # The worker count is FOURFOLD_WORKERS's (2 by default; GPU: one worker holding every GPU).
    assert composed[name]["services"]["ray-worker"]["deploy"]["replicas"] == {"cpu": 2, "gpu": 1}[name]
    scaled, err = checks.compose_config(COMPOSE["cpu"], {"FOURFOLD_WORKERS": "5"}, env_file)
    assert scaled is not None and scaled["services"]["ray-worker"]["deploy"]["replicas"] == 5, err
    broken = copy.deepcopy(composed[name])
    del broken["services"]["api"]["network_mode"]
    broken["services"]["ray-worker"]["shm_size"] = "1000"
    assert compose_problems(broken, prometheus, source) == [
        "the control plane does not run `fourfold up` in the head's network",
        "the workers' /dev/shm cannot hold their object store",
    ]


# -- the dashboard and the alerts show what /metrics serves ------------------------------------


def test_every_metric_the_rules_and_dashboard_name_is_served(exposed_metrics: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "fourfold.rules.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fourfold.json").read_text())
    unit_tests = yaml.safe_load((DEPLOY / "prometheus" / "tests" / "fourfold.rules.test.yml").read_text())
    series = [s["series"].split("{")[0] for t in unit_tests["tests"] for s in t["input_series"]]
    assert {"fourfold_job_step", "fourfold_job_mfu", "fourfold_queue_oldest_wait_seconds"} <= exposed_metrics
    assert checks.missing_metrics(checks.rule_exprs(rules), exposed_metrics) == []
    assert checks.missing_metrics(checks.dashboard_exprs(dashboard), exposed_metrics) == []
    assert checks.missing_metrics([s for s in series if s != "up"], exposed_metrics) == []
    assert checks.missing_metrics(["fourfold_job_stepz > 0", "up == 0"], exposed_metrics) == [
        "names no fourfold metric: up == 0",
        "fourfold_job_stepz",
    ]


def test_dashboard_has_the_panels_asked_for() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fourfold.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    assert {"Loss", "Tokens/s", "MFU", "Step time", "Restarts", "Queue length", "Recovery time per job"} <= titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # Any Grafana's Prometheus: the data source is a variable, never compose's uid.
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in [p, *p["targets"]])
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and variables["job"]["includeAll"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "fourfold.yml").read_text())
    grafana = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['providers'][0]['options']['path']}:ro" in grafana["volumes"]


def test_the_rules_wrap_into_a_prometheus_rule_as_docs_say() -> None:
    """docs/deploy.md loads the rules on Kubernetes by indenting the file under a PrometheusRule's spec."""
    rules = (DEPLOY / "prometheus" / "rules" / "fourfold.rules.yml").read_text()
    header = "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata: {name: fourfold}\nspec:\n"
    assert header.replace("\n", "\\n") in (ROOT / "docs" / "deploy.md").read_text()
    wrapped = yaml.safe_load(header + "".join(f"  {line}" for line in rules.splitlines(keepends=True)))
    assert wrapped["spec"] == yaml.safe_load(rules)
