"""`fourfold plan`: the planner's ranking from the command line, its JSON, and every bad input as one line.

The Ray path is tested through `cluster_from_ray` with resource dicts shaped like
`workers.group.node_resources()`; connecting to a live cluster is left to `fourfold plan --ray` by hand.
"""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from api.cli import app
from api.cli.plan import cluster_from_ray, parse_cluster
from parallel.config import ResourcesConfig
from parallel.planner import ACCELERATORS, Cluster, search
from parallel.spec_files import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "examples" / "tiny.yaml")
CPU = ["--cpu-tflops", "0.05"]  # a stated CPU peak: nothing is measured
GiB = 2**30


def plan(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["plan", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_help_names_every_option() -> None:
    code, out, _ = plan("--help")
    assert code == 0
    for option in ("--config", "--set", "--cluster", "--ray", "--accelerator", "--top", "--json", "--cpu-tflops"):
        assert option in out


def test_tiny_on_a_cpu_node() -> None:
    code, out, err = plan("--config", TINY, "--cluster", "1x4xcpu", *CPU, "--top", "5")
    assert code == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("#  LAYOUT"))
    for col in ("PEAK/RANK", "OF CAP", "STEP", "TOKENS/S", "MFU", "BOTTLENECK", "FITS", "TARGET"):
        assert col in lines[header]
    rows = lines[header + 1 : lines.index("", header)]
    assert 1 <= len(rows) <= 5 and rows[0].startswith("1  dp")
    assert sum(line.startswith("#") and " dp" in line for line in lines) == min(3, len(rows))  # best 3 in detail
    assert "  memory per rank at the " in out and "    runtime " in out and "  - fits with " in out
    assert lines[-1].startswith("needs at least 1 x cpu ")


def test_json_is_the_search() -> None:
    """The document holds the planner's own ranking, predictions and reasons, and the fewest accelerators."""
    code, out, err = plan("--set", "model.preset=8b", "--cluster", "8x8xh100-80gb", "--top", "4", "--json")
    assert code == 0, err
    doc = json.loads(out)
    cfg = load_config(None, ["model.preset=8b"])
    expected = search(cfg, Cluster.parse("8x8xh100-80gb"), top=4)
    assert [c["prediction"]["layout"] for c in doc["candidates"]] == [c.prediction.layout for c in expected]
    assert [c["reasons"] for c in doc["candidates"]] == [c.reasons for c in expected]
    best = doc["candidates"][0]
    assert best["rank"] == 1 and best["prediction"]["fits"] and doc["fits"]
    assert best["prediction"]["memory"]["total"] == expected[0].prediction.memory["total"]
    assert set(best["layout"]) >= {"dp", "tp", "pp", "cp", "zero", "pp_schedule", "activation_checkpointing"}
    cl = doc["cluster"]
    assert (cl["text"], cl["world"], cl["accelerator"]) == ("8x8xh100-80gb", 64, "h100-80gb")
    assert doc["min_accelerators"] == {"count": 4, "accelerator": "h100-80gb", "per_node": 8}
    assert doc["job"]["params"] > 8e9 and doc["job"]["dtype"] == "bf16"


def test_nothing_fits_exits_1_with_the_smallest_and_the_minimum() -> None:
    code, out, _ = plan("--set", "model.preset=8b", "--cluster", "1xh100", "--top", "3")
    assert code == 1
    assert "NOTHING FITS: the smallest layout needs " in out
    assert out.count("memory per rank at the ") == 1  # the smallest layout's breakdown only
    assert "does not fit: " in out
    assert out.splitlines()[-1].startswith("needs at least 4 x h100-80gb ")
    code, out, _ = plan("--set", "model.preset=8b", "--cluster", "1xh100", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["fits"] and doc["min_accelerators"]["count"] == 4
    assert not any(c["prediction"]["fits"] for c in doc["candidates"])


BAD = {
    "missing config": (["--config", "/nonexistent.yaml", "--cluster", "8xh100"],
                       "--config /nonexistent.yaml: cannot read (No such file or directory)"),
    "config is a directory": (["--config", "/", "--cluster", "8xh100"], "--config /: cannot read"),
    "invalid yaml": (["--config", "{bad}", "--cluster", "8xh100"], "--config {bad}: not valid YAML ("),
    "not a mapping": (["--config", "{list}", "--cluster", "8xh100"], "expected a mapping of sections, got list"),
    "engine refuses": (["--config", TINY, "--set", "parallel.tp=3", "--cluster", "8xh100"],
                       "parallel.tp=3: model.n_heads=8 is not divisible by it; valid tp: 1, 2, 4, 8"),
    "unknown field": (["--set", "trian.steps=1", "--cluster", "8xh100"], "trian: unknown field; valid: name, model"),
    "bad --set": (["--set", "oops", "--cluster", "8xh100"], "--set 'oops': expected section.key=value"),
    "unknown accelerator": (["--cluster", "8x8xfoo"],
                            "--cluster 8x8xfoo: unknown accelerator 'foo'; known: h100-80gb, h200-141gb"),
    "malformed cluster": (["--cluster", "8x8x8xh100"], "--cluster 8x8x8xh100: expected NODESxPER_NODExACCELERATOR"),
    "zero nodes": (["--cluster", "0x8xh100"], "--cluster 0x8xh100: give at least one node and one device per node"),
    "no cluster": ([], "--cluster: give a cluster such as 8x8xh100-80gb, or --ray"),
    "both": (["--cluster", "8xh100", "--ray"], "--cluster: give a cluster such as 8x8xh100-80gb, or --ray"),
    "accelerator without ray": (["--cluster", "8xh100", "--accelerator", "h100"], "--accelerator: goes with --ray"),
    "top": (["--cluster", "8xh100", "--top", "0"], "--top 0: give a whole number of at least 1"),
    "margin": (["--cluster", "8xh100", "--margin", "1"], "--margin 1.0: give a share from 0 up to"),
    "no peak for the dtype": (["--cluster", "4xv5p", "--set", "train.dtype=float32"],
                              "--cluster 1x4xtpu-v5p: TPU v5p has no fp32 peak in the table"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line(case: str, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("a: [\n")
    (tmp_path / "list.yaml").write_text("- 1\n")
    args, expected = BAD[case]
    args = [a.replace("{bad}", str(tmp_path / "bad.yaml")).replace("{list}", str(tmp_path / "list.yaml")) for a in args]
    expected = expected.replace("{bad}", str(tmp_path / "bad.yaml"))
    code, out, err = plan(*args)
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fourfold: error: ") and expected in err, err


def test_cpu_cluster_shares_the_node_memory() -> None:
    one, four = parse_cluster("1x1xcpu", cpu_tflops=0.05), parse_cluster("2x4xcpu", cpu_tflops=0.05)
    assert (four.nodes, four.per_node, four.accelerator.kind) == (2, 4, "cpu")
    assert four.accelerator.peak_tflops["fp32"] == 0.05
    assert four.accelerator.memory_bytes == one.accelerator.memory_bytes // 4
    assert parse_cluster("h100").accelerator is ACCELERATORS["h100-80gb"]


# -- --ray: the Cluster from Ray's node totals ---------------------------------------------------------------


def test_ray_cpu_nodes() -> None:
    nodes = {"a": {"CPU": 8.0, "memory": 32 * GiB}, "b": {"CPU": 8.0, "memory": 16 * GiB}}
    cluster, notes = cluster_from_ray(nodes, ResourcesConfig(cpus_per_rank=2), cpu_tflops=0.1)
    assert (cluster.nodes, cluster.per_node, cluster.accelerator.kind) == (2, 4, "cpu")
    assert cluster.accelerator.memory_bytes == 16 * GiB // 4  # the smaller node's memory, shared by its 4 ranks
    assert cluster.accelerator.peak_tflops["fp32"] == 0.1
    assert notes[0] == "Ray: 2 node(s) of 4, 4 CPU slots (resources.cpus_per_rank=2)"


def test_ray_gpu_nodes_need_the_accelerator_named() -> None:
    nodes = {
        "a": {"CPU": 64.0, "GPU": 8.0}, "b": {"CPU": 64.0, "GPU": 4.0}, "head": {"CPU": 4.0}, "dead": {},
    }  # fmt: skip
    cluster, notes = cluster_from_ray(nodes, ResourcesConfig(accelerator="cpu"), accelerator="h100")
    assert (cluster.nodes, cluster.per_node, cluster.accelerator) == (2, 4, ACCELERATORS["h100-80gb"])
    assert "planned as 2 nodes of 4, the smallest" in notes[1]
    with pytest.raises(typer.Exit) as err:
        cluster_from_ray(nodes, ResourcesConfig(accelerator="gpu"))
    assert err.value.exit_code == 2
    with pytest.raises(typer.Exit):
        cluster_from_ray(nodes, ResourcesConfig(), accelerator="z100")
    with pytest.raises(typer.Exit):
        cluster_from_ray({"head": {"CPU": 4.0}}, ResourcesConfig(), accelerator="h100")  # no GPUs at all


def test_ray_gpu_error_lines(capsys: pytest.CaptureFixture[str]) -> None:
    for kwargs, expected in [
        ({"job": ResourcesConfig(accelerator="gpu")}, "--accelerator: the job runs on GPUs and Ray does not say which"),
        ({"job": ResourcesConfig(), "accelerator": "z100"}, "--accelerator z100: unknown accelerator 'z100'"),
        ({"job": ResourcesConfig(), "accelerator": "a100"}, "--ray: no alive node of the Ray cluster has GPUs"),
    ]:
        with pytest.raises(typer.Exit):
            cluster_from_ray({"head": {"CPU": 4.0}}, **kwargs)
        err = capsys.readouterr().err
        assert err.startswith(f"fourfold: error: {expected}") and len(err.splitlines()) == 1, err
