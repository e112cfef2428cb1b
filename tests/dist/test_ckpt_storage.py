"""Where checkpoints live: fsspec URLs (memory://, file://), a checkpoint.dir that cannot be
used, damaged commit markers, retention rules, and a resume from an older checkpoint."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.checkpoint import CheckpointError, list_checkpoints, read_meta, retained
from tests.dist.harness import BASE, run_layout, spawn

pytestmark = pytest.mark.dist


def _save_then_resume(rank: int, world: int, root: str) -> tuple[list[float], list[float]]:
    """Train 4 steps saving every 2 under `root`, then resume a new run from step 2 (one process:
    a memory:// filesystem lives in this process)."""
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides
    from parallel.trainer import Trainer

    sets = ["train.steps=4", f"checkpoint.dir={root}", "checkpoint.every=2"]
    full = Trainer(build_config(apply_overrides(copy.deepcopy(BASE), sets))).run()
    resume = [*sets, f"checkpoint.resume={root.rstrip('/')}/step-00000002"]
    again = Trainer(build_config(apply_overrides(copy.deepcopy(BASE), resume))).run()
    return [m["loss"] for m in full[2:]], [m["loss"] for m in again]


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls_save_and_resume_exactly(scheme: str, tmp_path: Path) -> None:
    root = "memory://fourfold-test/ckpt" if scheme == "memory" else f"file://{tmp_path}/ckpt"
    [(want, got)] = spawn(_save_then_resume, 1, tmp_path, root)
    assert got == want and len(got) == 2
    if scheme == "file":  # the shards went where the URL points, not to a relative ./file: folder
        assert [c.step for c in list_checkpoints(root) if c.complete] == [2, 4]
        assert list((tmp_path / "ckpt" / "step-00000004").glob("*.distcp"))
        assert not Path("file:").exists()


def _train(*sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "parallel.train", "--set", "train.steps=2"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("directory", "message"),
    [
        ("{tmp}/a-file/ckpt", "checkpoint.dir={tmp}/a-file/ckpt: cannot write there"),
        ("nosuchfs://bucket/ckpt", "checkpoint.dir=nosuchfs://bucket/ckpt: Protocol not known: nosuchfs"),
    ],
    ids=["under-a-file", "unknown-protocol"],
)
def test_unusable_checkpoint_dir_is_one_line_before_training(directory: str, message: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    out = _train(f"checkpoint.dir={directory.format(tmp=tmp_path)}")
    assert out.returncode == 2, out.stderr[-2000:]
    [line] = out.stderr.strip().splitlines()
    assert line.startswith(f"fourfold: config error: {message.format(tmp=tmp_path)}"), line
    assert "step" not in out.stdout  # refused before any training


def test_damaged_commit_marker_reads_as_incomplete(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_layout(1, ["train.steps=2", f"checkpoint.dir={ckpt}", "checkpoint.every=1"], tmp_path)
    (ckpt / "step-00000002" / "meta.json").write_text('{"step": 2, "conf')  # cut short
    assert [(c.step, c.complete) for c in list_checkpoints(str(ckpt))] == [(1, True), (2, False)]
    with pytest.raises(CheckpointError, match="corrupt meta.json"):
        read_meta(str(ckpt / "step-00000002"))
    ls = subprocess.run([sys.executable, "-m", "api.cli", "ckpt", "ls", str(ckpt)], capture_output=True, text=True)
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    out = _train(f"checkpoint.dir={ckpt}", "train.steps=3", "checkpoint.resume=auto")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {ckpt}/step-00000001 at step 1" in out.stdout


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path: Path) -> None:
    """Resumed from step 2 of a run that saved 2, 4 and 6: the new run's step 4 replaces the old
    one, the old step 6 is renamed abandoned-... (kept, never resumed from), and its own step 6
    is the newest complete checkpoint at the end."""
    ckpt = tmp_path / "ckpt"
    sets = ["train.steps=6", f"checkpoint.dir={ckpt}", "checkpoint.every=2", "checkpoint.keep_last=3"]
    run_layout(1, sets, tmp_path)
    old_six = read_meta(str(ckpt / "step-00000006"))["time"]
    run_layout(1, [*sets, f"checkpoint.resume={ckpt}/step-00000002"], tmp_path)
    assert [c.step for c in list_checkpoints(str(ckpt)) if c.complete] == [2, 4, 6]
    assert read_meta(str(ckpt / "step-00000006"))["time"] > old_six
    [aside] = [p for p in ckpt.iterdir() if p.name.startswith("abandoned-step-00000006-")]
    assert json.loads((aside / "meta.json").read_text())["time"] == old_six


@pytest.mark.parametrize(
    ("steps", "keep_last", "keep_every", "kept"),
    [
        ([1, 2, 3, 4, 5], 2, None, {4, 5}),
        ([2, 4, 6, 8, 10, 12], 2, 5, {10, 12}),
        ([5, 10, 15, 20, 25], 1, 10, {10, 20, 25}),
        ([3], 2, None, {3}),
        ([], 2, 3, set()),
    ],
)
def test_retention_rules(steps: list[int], keep_last: int, keep_every: int | None, kept: set[int]) -> None:
    assert retained(steps, keep_last, keep_every) == kept


def _rng_round_trip(rank: int, world: int, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each rank its own generator state, save it, scramble it, resume at the same grid:
    the state saved and the state the resumed trainer left behind."""
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides
    from parallel.trainer import Trainer

    sets = ["train.steps=2", f"checkpoint.dir={root}", f"parallel.dp={world}"]
    trainer = Trainer(build_config(apply_overrides(copy.deepcopy(BASE), sets)))
    torch.manual_seed(1000 + rank)
    saved = torch.get_rng_state()
    trainer.checkpointer.save(1, trainer.checkpoint_meta(), wait=True)
    torch.manual_seed(0)
    Trainer(build_config(apply_overrides(copy.deepcopy(BASE), [*sets, f"checkpoint.resume={root}/step-00000001"])))
    return saved, torch.get_rng_state()


def _rng_after_resume(rank: int, world: int, path: str) -> torch.Tensor:
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides
    from parallel.trainer import Trainer

    Trainer(build_config(apply_overrides(copy.deepcopy(BASE), [f"checkpoint.resume={path}"])))
    return torch.get_rng_state()


def test_each_rank_resumes_its_own_rng_state(tmp_path: Path) -> None:
    """Ranks with different generator states get their own back at the same grid; one process
    resuming the same checkpoint (another grid) takes rank 0's."""
    (saved0, got0), (saved1, got1) = spawn(_rng_round_trip, 2, tmp_path, str(tmp_path / "ckpt"))
    assert not torch.equal(saved0, saved1)
    assert torch.equal(got0, saved0) and torch.equal(got1, saved1)
    step1 = str(tmp_path / "ckpt" / "step-00000001")
    assert read_meta(step1)["rng"] == {"ranks": 2, "kinds": ["cpu"]}
    [alone] = spawn(_rng_after_resume, 1, tmp_path, step1)
    assert torch.equal(alone, saved0)
