"""The deployment's process topology, run natively: what docker-compose.yml starts as containers,
started here as local processes (there is no Docker engine to start the containers).

- a Ray head (`ray start --head --num-cpus=0`: no rank may land on it) and two Ray worker nodes of
  2 CPUs (`ray start --address ...`), each a raylet of its own with its own metrics port, all in
  Ray's token mode with one shared token file (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH), as in
  compose;
- the control plane, `fourfold up`, joining that cluster through RAY_ADDRESS, its store in a fresh
  PostgreSQL database, bearer tokens required (FOURFOLD_TOKENS);
- Debian's Prometheus with deploy/prometheus/prometheus-local.yml (a copy: its targets written for
  this test's ports, a 1 s scrape interval).

Then: the API is healthy and refuses calls without a token; Prometheus scrapes the API and every Ray
node; a 2-rank job submitted over REST runs one rank on each worker node (never the head), and its
step shows in Prometheus; one worker node is killed (its whole process group) mid-job, and the job
restarts from its checkpoint on the node that is left and ends SUCCEEDED.

    .venv/bin/python -m pytest -q tests/deploy/test_topology.py      # about 70 s on 2 idle cores

Needs pyproject's `test` extra (ray[default]: the metrics agent behind --metrics-export-port),
Debian's `prometheus` and PostgreSQL on 127.0.0.1:5432 (tests/conftest.py's pg_url).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.deploy, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = Path("/usr/bin/prometheus")
TOKEN = "topology-test-token"  # the API's bearer token (FOURFOLD_TOKENS=TOKEN:alice)
HOLD_STEP = 5  # the ranks wait after each step from this one on, until the test releases them
# Each Ray node on a loopback address of its own, as each compose container has an address of its
# own. Not 127.0.0.1: `ray start` swaps that (in --node-ip-address and in --address) for the host's
# outward address, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which a worker node refuses to start.
IPS = {"ray-head": "127.0.0.2", "ray-worker-1": "127.0.0.3", "ray-worker-2": "127.0.0.4"}
WORKERS = ("ray-worker-1", "ray-worker-2")
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))  # free on every address: Ray binds most of its ports on all of them
        return s.getsockname()[1]


def until(what: str, check: Callable[[], T | None], timeout_s: float = 60, detail: Callable[[], Any] = str) -> T:
    """check()'s first truthy value, polled; fails naming `what` (and saying detail()) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = check()
        except (httpx.HTTPError, OSError, KeyError, ValueError):  # not up yet
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what} {detail()}"
        time.sleep(0.5)


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, session id, command line) of every live process on the machine."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                state, _, _, sid = f.read().rsplit(")", 1)[1].split()[:4]
            if state != "Z":
                yield int(pid), int(sid), Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


class Processes:
    """Every process the test starts, each the leader of a session of its own (start_new_session):
    killing its process group ends whatever it started, and its session id finds those in /proc."""

    def __init__(self, logs: Path) -> None:
        self.logs, self.procs = logs, {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def members(self, name: str) -> dict[int, str]:
        """pid -> command line of every live process in `name`'s session."""
        return {pid: cmdline for pid, sid, cmdline in _processes() if sid == self.procs[name].pid}

    def node_id(self, name: str) -> str:
        """The Ray node id of the raylet that `name` started, from the raylet's command line."""
        for cmdline in self.members(name).values():
            if "/raylet " in cmdline:
                return cmdline.split("--node_id=", 1)[1].split()[0]
        raise AssertionError(f"{name}: no raylet running; see {self.logs / name}.log")

    def ranks(self) -> dict[str, int]:
        """How many rank processes (Ray titles them after the actor class) run in each session:
        where the ranks really are, whatever Ray reports."""
        count = {n: sum(c.startswith("ray::RankRunner") for c in self.members(n).values()) for n in self.procs}
        return {name: n for name, n in count.items() if n}

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.procs[name].pid, sig)

    def stop_all(self, grace_s: float = 60) -> None:
        """In compose's order: SIGTERM the control plane and Prometheus and wait for them, then
        SIGKILL the Ray nodes (`ray start --block` drains for up to 30 s on SIGTERM, which a test has
        no use for)."""
        for name in sorted(self.procs, key=lambda n: n.startswith("ray-")):
            self.kill(name, signal.SIGKILL if name.startswith("ray-") else signal.SIGTERM)
            try:
                self.procs[name].wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.kill(name)
                self.procs[name].wait(timeout=30)


@dataclass
class Topology:
    procs: Processes
    api: httpx.Client  # with the token
    prom: httpx.Client
    dashboard: httpx.Client  # Ray's dashboard, with Ray's token
    ports: dict[str, int]  # ports[node name]: that node's metrics port
    nodes: dict[str, str]  # process name -> Ray node id
    ray_tmp: Path  # Ray's --temp-dir
    release: Path  # the test creates it: held ranks go on
    ckpt: Path

    def query(self, promql: str) -> dict[tuple[str, ...], float]:
        """Prometheus' instant query: (job, instance) -> value for `up`, else (job,) -> value."""
        data = self.prom.get("/api/v1/query", params={"query": promql}).json()["data"]["result"]
        key = ("job", "instance") if promql.startswith("up") else ("job",)
        return {tuple(r["metric"].get(k, "") for k in key): float(r["value"][1]) for r in data}


def ray_env(base: dict[str, str], token_file: Path) -> dict[str, str]:
    # As docker-compose.yml's x-ray-auth: every Ray node and the control plane in token mode with one
    # token. Explicit, because Ray 2.60 turns token mode on by itself when ~/.ray/auth_token exists.
    return {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


@pytest.fixture(scope="module")
def topology(pg_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    from ray._private.utils import get_dashboard_dependency_error

    # Without ray[default] each node's agent starts --minimal: no metrics on --metrics-export-port.
    assert get_dashboard_dependency_error() is None, "needs ray[default]: pip install -e '.[test]'"
    assert PROMETHEUS.exists(), "needs Debian's prometheus: apt-get install prometheus (.ci/run does)"
    tmp = tmp_path_factory.mktemp("topology")
    # Ray's unix sockets live under --temp-dir, and their paths must stay under 108 bytes: a short
    # directory of our own, which leaves /tmp/ray of other tests alone.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ff", dir="/tmp"))
    token_file = tmp / "ray_auth_token"  # compose mounts a secret; here a file only we can read
    token_file.write_text(os.urandom(16).hex())
    token_file.chmod(0o600)
    ports = {name: free_port() for name in ("gcs", *IPS, "dashboard", "client", "api", "prometheus")}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "FOURFOLD_", "DATABASE_URL"))}
    # Worker ports 0 (any free one): the default range is shared by every raylet on this machine.
    ray = [str(Path(sys.executable).with_name("ray")), "start", "--block", f"--temp-dir={ray_tmp}",
           "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0"]  # fmt: skip
    # Every node's dashboard agent listens on 52365 unless told otherwise: a free port for each.
    agent = [f"--dashboard-agent-listen-port={free_port()}" for _ in IPS]
    procs = Processes(tmp)
    dashboard = httpx.Client(base_url=f"http://127.0.0.1:{ports['dashboard']}", timeout=10,
                             headers={"Authorization": f"Bearer {token_file.read_text()}"})  # fmt: skip

    def alive(count: int) -> dict[str, str] | None:
        """node id -> address once `count` nodes are alive (Ray's state API, on its dashboard)."""
        for name, p in procs.procs.items():
            assert p.poll() is None, f"{name} exited ({p.returncode}); see {tmp / name}.log"
        rows = dashboard.get("/api/v0/nodes").json()["data"]["result"]["result"]
        nodes = {n["node_id"]: n["node_ip"] for n in rows if n["state"] == "ALIVE"}
        return nodes if len(nodes) == count else None

    # The head's autoscaler and dashboard export metrics on fixed ports (44217, 44227) unless told
    # otherwise: free ones, so that another Ray head on this machine keeps its own.
    head_env = {**ray_env(base, token_file), "AUTOSCALER_METRIC_PORT": str(free_port()),
                "DASHBOARD_METRIC_PORT": str(free_port())}  # fmt: skip
    try:
        procs.start("ray-head", [*ray, "--head", "--num-cpus=0", f"--node-ip-address={IPS['ray-head']}",
                                 f"--port={ports['gcs']}", f"--metrics-export-port={ports['ray-head']}",
                                 "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
                                 f"--ray-client-server-port={ports['client']}", agent[0],
                                 "--object-store-memory=100000000"], head_env)  # fmt: skip
        # One node at a time, each once the one before is up: on 2 cores, starting all at once can
        # keep a raylet from registering within the 30 s that `ray start` gives it.
        until("the Ray head", lambda: alive(1), timeout_s=90)
        for i, name in enumerate(WORKERS, 1):
            procs.start(name, [*ray, f"--address={IPS['ray-head']}:{ports['gcs']}", "--num-cpus=2",
                               f"--node-ip-address={IPS[name]}", f"--metrics-export-port={ports[name]}",
                               agent[i], "--object-store-memory=200000000"], ray_env(base, token_file))  # fmt: skip
            addresses = until(f"{name} to join", lambda i=i: alive(1 + i), timeout_s=90)
        release = tmp / "release"
        service_env = {
            **ray_env(base, token_file),
            "RAY_ADDRESS": f"{IPS['ray-head']}:{ports['gcs']}",
            "DATABASE_URL": pg_url,
            "FOURFOLD_TOKENS": f"{TOKEN}:alice",
            "FOURFOLD_HOST": "127.0.0.1",
            "FOURFOLD_PORT": str(ports["api"]),
            "FOURFOLD_DATA_DIR": str(tmp / "service"),
            "FOURFOLD_TEST_HOLD": f"{HOLD_STEP}:{release}",
        }
        procs.start("api", [sys.executable, "-m", "api.cli", "up"], service_env)
        procs.start("prometheus", prometheus_command(tmp / "prometheus", ports), base)
        api = httpx.Client(base_url=f"http://127.0.0.1:{ports['api']}", timeout=10,
                           headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        prom = httpx.Client(base_url=f"http://127.0.0.1:{ports['prometheus']}", timeout=10)
        until("the control plane", lambda: api.get("/healthz").json()["ok"], timeout_s=90)
        nodes = {name: procs.node_id(name) for name in IPS}
        assert {nodes[name]: ip for name, ip in IPS.items()} == addresses  # each process is the node we think
        yield Topology(procs, api, prom, dashboard, ports, nodes, ray_tmp, release, tmp / "ckpt")
    finally:
        procs.stop_all()
        with contextlib.suppress(OSError):  # Ray's own logs next to ours, to read after a failure
            shutil.copytree(ray_tmp / "session_latest", tmp / "ray", ignore=shutil.ignore_patterns("sockets", "events"))

        def left() -> dict[int, str]:  # in the sessions we started, or anything with our Ray's temp dir
            sids = {p.pid for p in procs.procs.values()}
            return {pid: cmd for pid, sid, cmd in _processes() if sid in sids or str(ray_tmp) in cmd}

        with contextlib.suppress(AssertionError):
            until("the orphans to exit", lambda: not left(), timeout_s=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left(), f"processes the test started are still running: {left()}"


def prometheus_command(path: Path, ports: dict[str, int]) -> list[str]:
    """deploy/prometheus copied to `path` (the rules with it), its local config's targets written for
    this test's ports, and scraped every second so that the test need not wait long."""
    shutil.copytree(ROOT / "deploy" / "prometheus", path, ignore=shutil.ignore_patterns("tests"))
    config_file = path / "prometheus-local.yml"
    config = yaml.safe_load(config_file.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        for sd in job["file_sd_configs"]:
            sd["refresh_interval"] = "1s"
    config_file.write_text(yaml.safe_dump(config))
    ray_targets = [f"{ip}:{ports[node]}" for node, ip in IPS.items()]
    (path / "targets" / "api.json").write_text(json.dumps([{"targets": [f"127.0.0.1:{ports['api']}"]}]))
    (path / "targets" / "ray.json").write_text(json.dumps([{"targets": ray_targets}]))
    return [str(PROMETHEUS), f"--config.file={config_file}", f"--storage.tsdb.path={path / 'data'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}"]  # fmt: skip


def test_api_ray_and_prometheus_are_up(topology: Topology) -> None:
    t = topology
    assert t.api.get("/healthz").json()["ok"] is True
    assert httpx.get(t.api.base_url.join("/v1/jobs"), timeout=10).status_code == 401  # tokens required
    # The head takes no ranks (0 CPUs); each worker has 2.
    cpus = {n["id"]: n["total"].get("CPU", 0) for n in t.api.get("/v1/cluster").json()["nodes"]}
    assert cpus == {t.nodes["ray-head"]: 0, t.nodes["ray-worker-1"]: 2, t.nodes["ray-worker-2"]: 2}
    # Ray's dashboard wants Ray's token too.
    assert t.dashboard.get("/api/v0/nodes").status_code == 200
    assert httpx.get(t.dashboard.base_url.join("/api/v0/nodes"), timeout=10).status_code == 401

    ray_targets = {f"{ip}:{t.ports[node]}" for node, ip in IPS.items()}
    # docs/deploy.md: the head itself lists every node's metrics port, in file_sd's format.
    discovery = t.ray_tmp / "prom_metrics_service_discovery.json"
    listed = lambda: ray_targets <= set(json.loads(discovery.read_text())[0]["targets"])  # noqa: E731
    until("the head's list of metrics ports", listed)
    want = {("fourfold-api", f"127.0.0.1:{t.ports['api']}"), *(("ray", target) for target in ray_targets)}
    until("Prometheus to scrape the API and every Ray node", lambda: t.query("up") == dict.fromkeys(want, 1.0))
    # Ray's own metrics, from ray[default]'s metrics agent, not just a port that answers.
    assert until("Ray node metrics", lambda: t.query("count by (job) (ray_node_cpu_count)"))[("ray",)] == 3
    groups = t.prom.get("/api/v1/rules").json()["data"]["groups"]
    assert "FourfoldMetricsAbsent" in {r["name"] for g in groups for r in g["rules"]}


def spec(ckpt: Path) -> dict[str, Any]:
    """Two ranks of one CPU each, spread over the two workers; either worker alone holds both, so the
    job can finish on the one that is left (dp_min=1 would let it shrink if it could not).

    backoff_s is 1 s, far shorter than the time Ray takes to declare a lost node dead (its health
    checks: 9-11 s here): the supervisor sees the rank fail within a second or two, and must not plan
    the restart on the lost node before Ray's verdict (it would wait 60 s for a placement group that
    cannot become ready and count a second failure); the test asserts exactly one failure."""
    return {
        "name": "topology",
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2, "dp_min": 1},
        "train": {"steps": 8, "global_batch": 4, "micro_batch": 2, "seq_len": 32, "warmup_steps": 1},
        "checkpoint": {"dir": ckpt.name, "every": 2},  # relative: under the job's own directory
        "resources": {"cpus_per_rank": 1},
        "restart": {"max_failures": 2, "backoff_s": 1},
    }


def test_job_runs_on_the_workers_and_survives_a_lost_worker(topology: Topology) -> None:
    t = topology
    job_id = t.api.post("/v1/jobs", json=spec(t.ckpt)).json()["id"]

    def job() -> dict[str, Any]:
        return t.api.get(f"/v1/jobs/{job_id}").json()

    def history() -> list[str]:  # for a failure message
        return [f"{e['time'][11:19]} {e['kind']} {e['to_state']}: {e['message']}"
                for e in t.api.get(f"/v1/jobs/{job_id}/events").json()]  # fmt: skip

    def at(step: int, attempts: int) -> dict[str, Any] | None:
        j = job()
        assert j["state"] not in ("FAILED", "CANCELLED"), j["failure_reason"]
        return j if j["state"] == "RUNNING" and j["attempts"] == attempts and (j["step"] or 0) >= step else None

    # Held after step HOLD_STEP: the ranks stay where they are while the test looks at them.
    until(f"the job at step {HOLD_STEP}", lambda: at(HOLD_STEP, 1), timeout_s=120, detail=history)
    ranks = t.procs.ranks()
    assert ranks == {"ray-worker-1": 1, "ray-worker-2": 1}, f"one rank on each worker, none elsewhere: {ranks}"
    step = f'fourfold_job_step{{job="{job_id}"}}'
    until(f"Prometheus to have the job at step {HOLD_STEP}", lambda: t.query(step) == {(job_id,): HOLD_STEP})

    # Rank 0's node also holds the job's event queue (a Ray actor): kill the other worker, rank 1's,
    # as a lost machine: its raylet, its agents and the rank at once.
    [survivor] = [n for n in ranks if any("_QueueActor" in c for c in t.procs.members(n).values())]
    [victim] = [n for n in ranks if n != survivor]
    t.procs.kill(victim)
    until("the failure and a new attempt", lambda: at(HOLD_STEP, 2), timeout_s=120, detail=history)
    assert t.procs.ranks() == {survivor: 2}, "the new attempt runs both ranks on the worker that is left"
    assert {n["id"] for n in t.api.get("/v1/cluster").json()["nodes"]} == {t.nodes["ray-head"], t.nodes[survivor]}
    lost = ("ray", f"{IPS[victim]}:{t.ports[victim]}")
    until("Prometheus to see the lost node down", lambda: t.query("up")[lost] == 0)
    assert t.query(f'fourfold_job_restarts_total{{job="{job_id}"}}') == {(job_id,): 1.0}

    t.release.touch()
    done = until("the job to end", lambda: (j := job())["state"] in ("SUCCEEDED", "FAILED") and j, timeout_s=120)
    assert done["state"] == "SUCCEEDED", done["failure_reason"]
    events = t.api.get(f"/v1/jobs/{job_id}/events").json()
    failures = [e["message"] for e in events if e["kind"] == "failure"]
    # One failure, naming rank 1 and the lost node: Ray reports the rank's actor unavailable (its
    # node does not answer) before it knows it dead, and the worker group counts both as a death.
    cause = rf"worker process died: rank 1 on node {t.nodes[victim][:12]}\b"
    assert len(failures) == 1 and re.match(cause, failures[0]), failures
    assert any(e["kind"] == "recovery" and "training resumed" in e["message"] for e in events)
    states = [e["to_state"] for e in events if e["to_state"]]
    assert states[-4:] == ["RESTARTING", "STARTING", "RUNNING", "SUCCEEDED"], states
    assert [a["outcome"] for a in t.api.get(f"/v1/jobs/{job_id}/attempts").json()] == ["failed", "succeeded"]
    # Resumed from a checkpoint (step 2 or 4), not from the start: the steps before are the first attempt's.
    metrics = [(m["step"], m["attempt"]) for m in t.api.get(f"/v1/jobs/{job_id}/metrics").json()]
    assert [s for s, _ in metrics] == list(range(1, 9))
    resumed = min(s for s, a in metrics if a == 2)
    assert resumed in (3, 5) and all(a == (1 if s < resumed else 2) for s, a in metrics), metrics
