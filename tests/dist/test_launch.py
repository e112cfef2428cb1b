"""The CLI end to end: launching ranks, the metrics file contract, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

FIELDS = {
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "tflops",
    "mfu",
    "step_time_s",
    "peak_mem_bytes",
    "ckpt_block_s",
}


def test_two_ranks_on_stdlib_text_write_metrics(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    cmd = [
        sys.executable, "-m", "parallel.train", "--nproc-per-node", "2", "--config", "examples/tiny.yaml",
        "--set", "parallel.dp=2", "--set", "parallel.zero=1", "--set", "train.steps=3",
        "--metrics-file", str(metrics),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one line per step, from rank 0 only
    for row in rows:
        assert set(row) == FIELDS
        assert 0 < row["loss"] < 10 and row["tokens_per_s"] > 0 and 0 < row["mfu"] < 10
    assert "step     3/3" in proc.stdout


def test_torchrun_bad_config_refused_before_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "parallel.train", "--nproc-per-node", "2", "--set", "parallel.tp=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fourfold: config error: parallel: dp*tp*pp*cp = 1*4*1*1 = 4 but the world size is 2; "
        "make the product equal 2 or launch 4 processes"
    ]


def test_a_stalled_rank_ends_the_command_with_one_line_and_exit_3(tmp_path: Path) -> None:
    cmd = [
        sys.executable, "-m", "tests.dist.stall_train", "--nproc-per-node", "2", "--config", "examples/tiny.yaml",
        "--set", "parallel.dp=2", "--set", "train.steps=3", "--set", "parallel.timeout_s=3",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("fourfold:")]
    assert ours[0].startswith("fourfold: error: rank 0 timed out on mesh axis 'dp' while all-reduce of gradients")
    assert ours[-1] == "fourfold: rank 0 exited with code 3"
    assert "Traceback" not in proc.stderr
