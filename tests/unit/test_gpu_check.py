"""bench/gpu_check.py: on a machine without CUDA it claims nothing; its pure helpers are right."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel.config import ModelConfig
from parallel.flops import param_count
from parallel.spec_files import load_config

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
assert _spec and _spec.loader
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
_spec.loader.exec_module(gpu_check)


def test_without_cuda_it_says_so_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the no-CUDA path even where there is a GPU
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: no CUDA device found") and "nothing was checked" in proc.stdout
    assert "ok" not in proc.stdout.split() and "FAIL" not in proc.stdout


# (params, grads, optimizer) as multiples of P at dp=N: the table of tests/dist/test_memory.py
@pytest.mark.parametrize(
    ("zero", "multiples"),
    [(0, (1, 1, 2)), (1, (1, 1, 2 / 4)), (2, (1, 1 + 1 / 4, 2 / 4)), (3, (1 / 4, 1 / 4, 2 / 4))],
)
def test_zero_formula(zero: int, multiples: tuple[float, float, float]) -> None:
    n = param_count(ModelConfig(preset="125m"))
    got = gpu_check.zero_state_bytes(n, zero, 4)
    assert got == pytest.approx(tuple(m * n * 4 for m in multiples))
    assert gpu_check.zero_state_bytes(n, zero, 1)[0] == n * 4  # one rank holds everything
    with pytest.raises(ValueError):
        gpu_check.zero_state_bytes(n, 4, 2)


def test_max_rel_gap() -> None:
    assert gpu_check.max_rel_gap([1.0, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    assert gpu_check.max_rel_gap([1.0], [1.0, 2.0]) == float("inf")  # a run that stopped early
    assert gpu_check.max_rel_gap([float("nan")], [1.0]) == float("inf")
    assert gpu_check.max_rel_gap([], []) == float("inf")


def test_format_table() -> None:
    text = gpu_check.format_table(["name", "loss", "ok"], [["1 GPU", 5.5452, True], ["dp8 zero3", 1.5e-6, None]])
    assert text.splitlines() == [  # a column of numbers is right-aligned, its header too
        "name           loss  ok",
        "---------  --------  --",
        "1 GPU         5.545  ok",
        "dp8 zero3  1.50e-06  -",
    ]
    assert gpu_check.format_table(["n"], [[1234567], [False]]).splitlines()[2:] == ["1,234,567", "FAIL"]


@pytest.mark.parametrize("n_gpus", range(1, 17))
def test_every_layout_it_runs_is_a_valid_config(n_gpus: int) -> None:
    layouts = gpu_check.layouts(n_gpus)
    assert bool(layouts) == (n_gpus >= 2)
    for name, (world, sets) in layouts.items():
        assert world <= n_gpus, name
        cfg = load_config(None, [*gpu_check.BASE, *sets], world_size=world)
        assert cfg.parallel.world_size == world


def test_mfu_presets_memory_on_one_gpu() -> None:
    # 8b's fp32 weights, gradients and AdamW states alone outgrow an 80 GB H100 but fit an H200's
    # 141 GB: the check runs it where it fits and says "does not fit" elsewhere, never an OOM.
    from parallel.config import ModelConfig
    from parallel.flops import param_count

    assert gpu_check.one_gpu_state_bytes("1b") == 16 * param_count(ModelConfig(preset="1b"))
    assert 80e9 < gpu_check.one_gpu_state_bytes("8b") < 141e9
