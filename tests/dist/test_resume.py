"""Resume: exact at the same layout, within 1e-4 at another layout, never from a
half-written checkpoint (and then every step as an uninterrupted run gives it);
retention keeps exactly keep_last."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from parallel.checkpoint import CheckpointError, list_checkpoints, read_meta
from tests.dist.harness import run_layout

pytestmark = pytest.mark.dist

TEN = ["train.steps=10"]
DP2_TP2 = ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]


def _losses(result: dict, first: int = 1) -> list[float]:
    return [m["loss"] for m in result["history"] if m["step"] >= first]


def _assert_close(got: list[float], want: list[float], rtol: float) -> None:
    assert len(got) == len(want) == 5, (got, want)
    for i, (a, b) in enumerate(zip(got, want, strict=True), start=6):
        assert abs(a - b) <= rtol * abs(b), f"step {i}: resumed loss {a} vs uninterrupted {b}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_layout(1, TEN, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def uninterrupted_dp2_tp2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_layout(4, [*TEN, *DP2_TP2], tmp_path_factory.mktemp("ref-dp2-tp2"))


@pytest.mark.parametrize(
    ("world", "layout", "reference"),
    [(1, [], "uninterrupted"), (1, ["checkpoint.async=true"], "uninterrupted"), (4, DP2_TP2, "uninterrupted_dp2_tp2")],
    ids=["one-process", "one-process-async", "dp2-tp2"],
)
def test_same_layout_resume_is_exact(
    world: int, layout: list[str], reference: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Stopped after step 5 (its checkpoint written), resumed: steps 6-10 as the same layout's
    uninterrupted run gives them."""
    ckpt = [f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.every=5"]
    run_layout(world, [*TEN, *layout, *ckpt], tmp_path, stop_after=5)
    resumed = run_layout(world, [*TEN, *layout, *ckpt, "checkpoint.resume=auto"], tmp_path)
    _assert_close(_losses(resumed), _losses(request.getfixturevalue(reference), first=6), rtol=1e-6)


@pytest.fixture(scope="module")
def saved_dp2_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cross")
    run_layout(4, [*TEN, *DP2_TP2, f"checkpoint.dir={tmp / 'ckpt'}", "checkpoint.every=5"], tmp, stop_after=5)
    return tmp / "ckpt" / "step-00000005"


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (4, ["parallel.pp=2", "parallel.dp=2", "parallel.zero=1"]),
        (4, ["parallel.cp=2", "parallel.tp=2"]),
        (1, []),
        (2, ["parallel.dp=2", "parallel.zero=3"]),
    ],
    ids=["pp2-dp2", "cp2-tp2", "one-process", "dp2-zero3"],
)
def test_resume_at_another_layout(
    world: int, layout: list[str], saved_dp2_tp2: Path, uninterrupted: dict, tmp_path: Path
) -> None:
    resumed = run_layout(world, [*TEN, *layout, f"checkpoint.resume={saved_dp2_tp2}"], tmp_path)
    _assert_close(_losses(resumed), _losses(uninterrupted, first=6), rtol=1e-4)


def test_retention_keeps_last_two(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    run_layout(2, ["parallel.dp=2", "train.steps=10", f"checkpoint.dir={ckpt}", "checkpoint.every=1",
                   "checkpoint.keep_last=2", "checkpoint.async=true"], tmp_path)  # fmt: skip
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000009", "step-00000010"]
    assert [c.step for c in list_checkpoints(str(ckpt)) if c.complete] == [9, 10]


# Where the kill lands, and the directory that shows the write got there.
WINDOWS = {"shards": "step-00000004.tmp", "rename": "step-00000004.tmp", "marker": "step-00000004"}
SIX = ["--set", "train.steps=6"]  # the command line's defaults otherwise: one process, synthetic data


def _cli_losses(metrics: Path) -> dict[int, float]:
    """Loss by step from a --metrics-file (a step written twice, the later one)."""
    return {m["step"]: m["loss"] for m in map(json.loads, metrics.read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], dict[int, float]]]:
    """The run the kill tests interrupt, trained straight through by the same command, no checkpoints.
    It starts in the background with the first test that asks for it (one process: on a 2-core machine
    it mostly takes the core that test's one-process runs leave idle); the function waits for it."""
    tmp = tmp_path_factory.mktemp("ref-cli")
    metrics, log = tmp / "metrics.jsonl", tmp / "out.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "parallel.train", *SIX, "--metrics-file", str(metrics)],
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    result: dict[int, float] = {}

    def losses() -> dict[int, float]:
        if not result:
            assert proc.wait(timeout=300) == 0, log.read_text()[-2000:]
            result.update(_cli_losses(metrics))
            assert sorted(result) == list(range(1, 7)), log.read_text()[-2000:]
        return result

    yield losses
    if proc.poll() is None:  # a test failed before it asked for the result
        proc.kill()
        proc.wait()


def _assert_steps_match(got: dict[int, float], want: dict[int, float], what: str, rtol: float) -> None:
    for step, loss in sorted(got.items()):
        assert abs(loss - want[step]) <= rtol * abs(want[step]), (
            f"{what}, step {step}: loss {loss!r} vs {want[step]!r} uninterrupted "
            f"(relative difference {abs(loss - want[step]) / abs(want[step]):.2e} > {rtol})"
        )


@pytest.mark.parametrize(
    ("window", "ranks"),
    [("shards", 1), ("rename", 1), ("marker", 1), ("shards", 2)],
    ids=["shards", "rename", "marker", "shards-2-ranks"],
)
def test_killed_mid_write_resumes_from_previous(
    window: str, ranks: int, uninterrupted_cli: Callable[[], dict[int, float]], tmp_path: Path
) -> None:
    """SIGKILL while step 4's checkpoint is being written (every process of the run at once, as a
    lost machine would): step 2's is used and the run finishes, every step with the loss of a run
    that was never interrupted."""
    ckpt, killed_metrics, resumed_metrics = tmp_path / "ckpt", tmp_path / "killed.jsonl", tmp_path / "resumed.jsonl"
    env = {**os.environ, "FOURFOLD_TEST_SLOW_AT": window, "FOURFOLD_TEST_SLOW_S": "60"}
    args = [sys.executable, "-m", "tests.dist.slow_commit", *SIX, "--set", f"checkpoint.dir={ckpt}",
            "--set", "checkpoint.every=2", "--metrics-file", str(killed_metrics)]  # fmt: skip
    if ranks > 1:
        args += ["--nproc-per-node", str(ranks), "--set", f"parallel.dp={ranks}"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (ckpt / WINDOWS[window]).exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    time.sleep(1.0)  # in the middle of writing step 4
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank
    proc.wait(timeout=30)
    assert (ckpt / WINDOWS[window]).exists() and not (ckpt / "step-00000004" / "meta.json").exists()
    assert [c.step for c in list_checkpoints(str(ckpt)) if c.complete] == [2]
    with pytest.raises(CheckpointError, match="incomplete"):
        read_meta(str(ckpt / WINDOWS[window]))

    out = subprocess.run(
        [sys.executable, "-m", "parallel.train", *SIX, "--set", f"checkpoint.dir={ckpt}", "--set", "checkpoint.every=2",
         "--resume", "auto", "--metrics-file", str(resumed_metrics)], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {ckpt}/step-00000002 at step 2" in out.stdout
    assert [c.step for c in list_checkpoints(str(ckpt)) if c.complete] == [4, 6]
    assert sorted(p.name for p in ckpt.iterdir()) == ["step-00000004", "step-00000006"]  # no crash leftovers

    # Step 4's metrics are written after its checkpoint, so the killed run reported steps 1-3; the
    # resumed one trains 3-6, steps 3 and 4 for the second time.
    killed, resumed = _cli_losses(killed_metrics), _cli_losses(resumed_metrics)
    assert (sorted(killed), sorted(resumed)) == ([1, 2, 3], [3, 4, 5, 6])
    # 1e-6 as in test_same_layout_resume_is_exact: one process is the reference's own layout (equal
    # bits when measured); at dp=2 a rank sums two micro-batch gradients before the ranks sum theirs,
    # one process all four in a row (measured 1 ulp, 9e-8, apart). Looser would not do: the loss of
    # these random tokens barely moves, and a 1% error in the learning rate shifts it by under 2e-6.
    want = uninterrupted_cli()
    _assert_steps_match(killed, want, f"killed run at {ranks} rank(s)", rtol=1e-6)
    _assert_steps_match(resumed, want, "resumed run", rtol=1e-6)
