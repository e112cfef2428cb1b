"""The CLI end to end: launching ranks, the metrics file contract, bad input."""

import json
import os
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bare_torchrun(nproc: int, args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    """torchrun itself, as a user would type it (static rendezvous, run id "none"); only the port is
    a free one, so that tests running side by side do not meet on 29500."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "-m", "parallel.train", *args]  # fmt: skip
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_bare_torchrun_says_the_config_error_once_whichever_rank_exits_first(tmp_path: Path) -> None:
    """torchrun kills the other ranks as soon as one exits: every rank must be able to say why, and
    the ranks of one machine say it once between them. Three runs, since who exits first varies."""
    line = "fourfold: config error: parallel.tp=3: model.n_heads=8 is not divisible by it; valid tp: 1, 2, 4, 8"
    for _ in range(3):
        proc = _bare_torchrun(3, ["--set", "parallel.tp=3"], tmp_path)
        assert proc.returncode != 0
        assert proc.stderr.splitlines().count(line) == 1, proc.stderr[-3000:]
        assert [x for x in proc.stderr.splitlines() if x.startswith("fourfold:")] == [line]
    # markers left by ranks torchrun killed belong to a torchrun that has exited: the next run removed them
    assert len(list(tmp_path.glob("fourfold-said-*"))) <= 1


def test_bare_torchrun_says_a_trainer_refusal_once(tmp_path: Path) -> None:
    """The other refusal path: a checkpoint that fails only while loading, after the process group exists."""
    ckpt = tmp_path / "ckpt"
    common = ["--set", "parallel.dp=2", "--set", "train.steps=2", "--set", f"checkpoint.dir={ckpt}"]
    cmd = [sys.executable, "-m", "parallel.train", "--nproc-per-node", "2", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shard in (ckpt / "step-00000002").glob("*.distcp"):
        shard.write_bytes(b"truncated")
    proc = _bare_torchrun(2, [*common, "--resume", str(ckpt / "step-00000002")], tmp_path)
    ours = [x for x in proc.stderr.splitlines() if x.startswith("fourfold:")]
    assert proc.returncode != 0 and ours, proc.stderr[-3000:]
    assert ours[0].startswith(f"fourfold: error: checkpoint {ckpt / 'step-00000002'}: cannot be loaded"), ours
    assert len(ours) == len(set(ours)), ours  # each distinct message once
