"""Each invalid config ends with one line naming the field, exit code 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = {
    "world size": (1, ["parallel.dp=2"], "dp*tp*pp*cp = 2*1*1*1 = 2 but the world size is 1"),
    "heads vs tp": (3, ["parallel.tp=3"], "parallel.tp=3: model.n_heads=8 is not divisible by it; valid tp: 1, 2, 4, 8"),
    "kv heads vs tp": (
        4, ["parallel.tp=4", "model.n_kv_heads=2"], "parallel.tp=4: model.n_kv_heads=2 is not divisible by it",
    ),
    "dp_replicate": (4, ["parallel.dp=4", "parallel.dp_replicate=3", "parallel.zero=3"], "parallel.dp_replicate=3 does not divide parallel.dp=4"),
    "global batch": (2, ["parallel.dp=2", "train.global_batch=6"], "train.global_batch=6 is not divisible by dp*micro_batch"),
    "seq_len vs tp": (2, ["parallel.tp=2", "train.seq_len=33"], "train.seq_len=33 is not divisible by 2"),
    "unknown preset": (1, ["model.preset=huge"], "model.preset: Input should be"),
    "unknown field": (1, ["train.bogus=1"], "train.bogus: unknown field; valid: steps, global_batch, micro_batch,"),
    "vocab vs tp": (2, ["parallel.tp=2", "model.vocab_size=255"], "model.vocab_size=255 is not divisible by it; valid tp: 1, 3, 5, 15, 17, 51, 85, 255"),
    "pp_virtual without pp": (1, ["parallel.pp_virtual=2"], "parallel.pp_virtual=2 needs parallel.pp > 1"),
    "microbatches vs accumulation": (1, ["parallel.microbatches=3"], "parallel.microbatches=3 must equal train.global_batch/(dp*micro_batch) = 4"),
    "unknown section": (1, ["trian.steps=1"], "trian: unknown field"),
    "zero range": (1, ["parallel.zero=4"], "parallel.zero: Input should be 0, 1, 2 or 3"),
    "pp microbatches": (4, ["parallel.pp=4", "train.global_batch=4"], "parallel.microbatches=2: pp_schedule=1f1b with pp=4 needs at least 4"),
    "pp too many stages": (4, ["parallel.pp=4", "parallel.pp_virtual=2", "parallel.pp_schedule=interleaved_1f1b"], "8 stages but model.n_layers=4"),
    "zbv virtual": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=1"], "pp_schedule=zbv runs exactly 2 stages per rank"),
    "seq_len vs cp": (2, ["parallel.cp=2", "train.seq_len=30"], "train.seq_len=30 is not divisible by 4"),
    "missing text path": (1, ["data.source=text", "data.path=/nonexistent/corpus"], "data.path"),
    "empty text dir": (1, ["data.source=text", "data.path={empty}"], "data.path"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_config_is_one_line(case: str, tmp_path: Path) -> None:
    world, overrides, expected = CASES[case]
    (tmp_path / "empty").mkdir()
    args = []
    for item in overrides:
        args += ["--set", item.format(empty=tmp_path / "empty")]
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "parallel.train", *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("fourfold: config error: ")
    assert expected in lines[0]


def test_missing_config_file() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "parallel.train", "--config", "/nonexistent.yaml"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "fourfold: config error: --config /nonexistent.yaml: cannot read (No such file or directory)"
    )


def _ranks_say(tmp_path: Path, messages: list[str], local_world: int | None = None) -> list[str]:
    """Start one process per message, as torchrun's local ranks of one run would be (same parent, same
    run variables), each calling say_once with its message; returns their stderr lines, all together."""
    code = "import sys; from parallel.train import say_once; say_once(sys.argv[1])"
    env = {
        **os.environ, "TMPDIR": str(tmp_path), "TORCHELASTIC_RUN_ID": "none", "MASTER_PORT": "29500",
        "LOCAL_WORLD_SIZE": str(local_world or len(messages)),
    }  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, message], env={**env, "LOCAL_RANK": str(i)}, stderr=subprocess.PIPE, text=True
        )
        for i, message in enumerate(messages)
    ]
    return [line for proc in procs for line in proc.communicate(timeout=60)[1].splitlines()]


def test_local_ranks_say_each_distinct_message_once_and_tidy_up(tmp_path: Path) -> None:
    lines = _ranks_say(tmp_path, ["fourfold: config error: a"] * 3 + ["fourfold: error: b"])
    assert sorted(lines) == ["fourfold: config error: a", "fourfold: error: b"]
    assert not list(tmp_path.glob("fourfold-said-*"))  # the last local rank removed the run's markers
    # the same message in the next run (same parent, same run id and port) is said again
    assert _ranks_say(tmp_path, ["fourfold: config error: a"] * 2) == ["fourfold: config error: a"]


def test_markers_of_killed_ranks_are_removed_once_their_launcher_is_gone(tmp_path: Path) -> None:
    # two of three local ranks had their turn, then the third was killed: the markers stay while
    # their launcher (here: this process) lives, and a run that finds its launcher gone removes them
    assert _ranks_say(tmp_path, ["fourfold: config error: a"] * 2, local_world=3) == ["fourfold: config error: a"]
    [live] = tmp_path.glob("fourfold-said-*")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"fourfold-said-{dead.pid}-{live.name.split('-')[3]}-0123456789abcdef"
    stale.mkdir()
    (stale / "0123456789abcdef").touch()
    live.rename(live.with_name(live.name + "0"))  # so that the next run starts a directory, and sweeps
    assert _ranks_say(tmp_path, ["x", "x"]) == ["x"]
    assert not stale.exists() and live.with_name(live.name + "0").exists()


def test_a_lone_process_always_says_it(tmp_path: Path) -> None:
    assert _ranks_say(tmp_path, ["m"], local_world=1) == ["m"]
    assert _ranks_say(tmp_path, ["m"], local_world=1) == ["m"]
    assert not list(tmp_path.glob("fourfold-said-*"))
