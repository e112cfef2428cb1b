"""The shape the deployment must keep, as checks that return problems (empty: fine): Ray's auth
agreed everywhere, the head pod and its neighbours on Kubernetes, docker-compose.yml and the
addresses Prometheus and Grafana use to reach it. test_static.py runs them on the rendered files
and on broken copies."""

from __future__ import annotations

from tests.deploy.checks import env_of

FOURFOLD_IMAGE_SERVICES = ("ray-head", "api", "ray-worker")


def ray_auth_problems(docs: list[dict], config: dict | None) -> list[str]:
    """Every Ray process and the control plane (a Ray driver) in token mode with the one token."""
    problems = []
    for doc in docs:
        if doc["apiVersion"] != "ray.io/v1":
            continue
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        auth = spec.get("authOptions", {})
        if auth.get("mode") != "token":
            problems.append(f"{doc['metadata']['name']}: authOptions.mode is not token")
        wanted = {"name": auth.get("secretName"), "key": "auth_token"}
        for c in spec["headGroupSpec"]["template"]["spec"]["containers"][1:]:  # KubeRay covers [0]
            env = env_of(c)
            ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or ref != wanted:
                problems.append(f"{doc['metadata']['name']}/{c['name']}: not Ray's token mode with authOptions' Secret")
    for name in FOURFOLD_IMAGE_SERVICES if config else ():
        svc = config["services"][name]
        env, secrets = svc.get("environment", {}), svc.get("secrets", [])
        if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN_PATH") not in {s["target"] for s in secrets}:
            problems.append(f"compose {name}: not in token mode with the mounted ray_auth_token")
        if "ray_auth_token" not in {s["source"] for s in secrets}:
            problems.append(f"compose {name}: does not mount ray_auth_token")
    if config and config["secrets"]["ray_auth_token"].get("environment") != "RAY_AUTH_TOKEN":
        problems.append("compose: ray_auth_token does not come from RAY_AUTH_TOKEN")
    return problems


def _mounts(container: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def head_problems(docs: list[dict]) -> list[str]:
    """The RayCluster's shape: ranks on workers only, the control plane beside the Ray head sharing
    its /tmp/ray, checkpoints at one path everywhere, and a Service and monitors that find the pods."""
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head, workers = cluster["spec"]["headGroupSpec"], cluster["spec"].get("workerGroupSpecs", [])
    groups = [head, *workers]
    ray_containers = [g["template"]["spec"]["containers"][0] for g in groups]
    problems = [] if head["rayStartParams"].get("num-cpus") == "0" else ["the head takes ranks (num-cpus is not 0)"]
    names = [c["name"] for c in head["template"]["spec"]["containers"]]
    if names != ["ray-head", "fourfold"]:
        return [*problems, f"head containers {names}: the Ray container first, then the control plane"]
    control = head["template"]["spec"]["containers"][1]
    if (
        "fourfold up" not in " ".join(control.get("command", []))
        or env_of(control)["FOURFOLD_HOST"]["value"] != "0.0.0.0"
    ):
        problems.append("the control plane does not run `fourfold up` on 0.0.0.0")
    shared_tmp = _mounts(control).get("/tmp/ray")
    if shared_tmp is None or shared_tmp != _mounts(ray_containers[0]).get("/tmp/ray"):
        problems.append("the control plane does not share the head's /tmp/ray")
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for group, c in [(head, control), *zip(groups, ray_containers, strict=True)]:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        claim = volumes.get(_mounts(c).get("/checkpoints"), {}).get("persistentVolumeClaim", {}).get("claimName")
        if claim != "fourfold-checkpoints" or claim not in claims:
            problems.append(f"{c['name']}: /checkpoints is not the shared claim fourfold-checkpoints")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "fourfold-api")
    if not service["spec"]["selector"].items() <= head["template"]["metadata"]["labels"].items():
        problems.append("Service fourfold-api does not select the head pod")
    if {p["targetPort"] for p in service["spec"]["ports"]} - {p["name"] for p in control["ports"]}:
        problems.append("Service fourfold-api targets a port the control plane does not have")
    monitors = {d["kind"]: d["spec"] for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")}
    port = monitors["PodMonitor"]["podMetricsEndpoints"][0]["port"]
    for group, c in zip(groups, ray_containers, strict=True):
        ports = {p["name"]: str(p["containerPort"]) for p in c.get("ports", [])}
        if ports.get(port) != group["rayStartParams"].get("metrics-export-port"):
            problems.append(f"{c['name']}: the PodMonitor's port {port} is not Ray's metrics-export-port")
    if monitors["PodMonitor"]["selector"]["matchLabels"] != {"ray.io/cluster": cluster["metadata"]["name"]}:
        problems.append("the PodMonitor does not select this RayCluster's pods")
    if monitors["ServiceMonitor"]["endpoints"][0]["port"] not in {p["name"] for p in service["spec"]["ports"]}:
        problems.append("the ServiceMonitor names a port the Service does not have")
    return problems


def compose_problems(config: dict, prometheus: dict, grafana_source: dict) -> list[str]:
    """docker-compose.yml's shape, and Prometheus' and Grafana's addresses that must match it."""
    s = config["services"]
    problems = []
    if len({s[n]["image"] for n in FOURFOLD_IMAGE_SERVICES}) != 1:
        problems.append("head, control plane and workers do not run one image")
    if s["api"].get("network_mode") != "service:ray-head" or s["api"]["command"] != ["fourfold", "up"]:
        problems.append("the control plane does not run `fourfold up` in the head's network")
    waits = s["api"]["depends_on"].get("postgres", {}).get("condition") == "service_healthy"
    if not waits or "healthcheck" not in s["postgres"]:
        problems.append("the control plane does not wait for a healthy PostgreSQL")
    if not any(v["target"] == "/var/lib/postgresql/data" and v["type"] == "volume" for v in s["postgres"]["volumes"]):
        problems.append("PostgreSQL's data is not on a volume")
    if "--num-cpus=0" not in s["ray-head"]["command"]:
        problems.append("the head takes ranks")
    for name in FOURFOLD_IMAGE_SERVICES:
        if not any(v["target"] == "/checkpoints" and v.get("source") == "checkpoints" for v in s[name]["volumes"]):
            problems.append(f"{name}: the checkpoints volume is not at /checkpoints")
    tmp = {n: {v.get("source") for v in s[n]["volumes"] if v["target"] == "/tmp/ray"} for n in ("ray-head", "api")}
    if not tmp["api"] or tmp["api"] != tmp["ray-head"]:
        problems.append("the control plane does not share the head's /tmp/ray")
    worker = s["ray-worker"]
    store = int(next(a for a in worker["command"] if a.startswith("--object-store-memory=")).split("=")[1])
    if int(worker["shm_size"]) <= store:
        problems.append("the workers' /dev/shm cannot hold their object store")
    # Prometheus scrapes the API where it listens and Ray where every node exports its metrics.
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    api_target = jobs["fourfold-api"]["static_configs"][0]["targets"][0]
    if api_target != f"ray-head:{s['api']['environment']['FOURFOLD_PORT']}":
        problems.append(f"Prometheus scrapes the API at {api_target}")
    commands = s["ray-head"]["command"] + worker["command"]
    metrics_ports = {a.split("=")[1] for a in commands if a.startswith("--metrics-export-port=")}
    dns = jobs["ray"]["dns_sd_configs"][0]
    if metrics_ports != {str(dns["port"])} or jobs["ray"]["static_configs"][0]["targets"] != [
        f"ray-head:{dns['port']}"
    ]:
        problems.append("Prometheus' Ray targets are not the nodes' metrics-export-port")
    if dns["names"] != ["ray-worker"]:
        problems.append("Prometheus does not discover the ray-worker replicas")
    (source,) = grafana_source["datasources"]
    if source["url"] != "http://prometheus:9090" or "prometheus" not in s:
        problems.append("Grafana's data source is not the compose Prometheus")
    return problems
