"""`fourfold ckpt ls/export`, `model.init_from`, and the errors for checkpoints that cannot be used."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from parallel.checkpoint import load_full_weights
from parallel.hf import WEIGHTS, export_hf
from parallel.model import Transformer
from tests.dist.harness import run_layout

pytestmark = pytest.mark.dist

DP2_TP2 = ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]


def _fourfold(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint saved by a sharded (dp2 x tp2) run: checkpoint.dir, holding step 3."""
    tmp = tmp_path_factory.mktemp("saved")
    run_layout(4, ["train.steps=3", *DP2_TP2, f"checkpoint.dir={tmp / 'ckpt'}"], tmp)
    return tmp / "ckpt"


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "export"
    done = _fourfold("ckpt", "export", str(ckpt), "--hf", str(out))
    assert done.returncode == 0, done.stderr
    assert "step-00000003" in done.stdout  # checkpoint.dir given: its newest checkpoint is exported
    return out


def test_ls_shows_complete_and_incomplete(ckpt: Path) -> None:
    (ckpt / "step-00000004.tmp").mkdir()
    (ckpt / "step-00000004.tmp" / "__0_0.distcp").write_bytes(b"half")
    try:
        out = _fourfold("ckpt", "ls", str(ckpt))
    finally:
        (ckpt / "step-00000004.tmp" / "__0_0.distcp").unlink()
        (ckpt / "step-00000004.tmp").rmdir()
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["3", "4"]
    assert rows[0][-6:] == ["dp2", "tp2", "pp1", "cp1", "zero1", "complete"]
    assert rows[1][-1] == "incomplete"


def test_export_gives_transformers_the_same_logits(ckpt: Path, exported: Path) -> None:
    from transformers import LlamaForCausalLM

    weights, cfg = load_full_weights(str(ckpt / "step-00000003"))
    ours = Transformer(cfg.model, max_seq_len=64)
    ours.load_state_dict(weights)
    theirs = LlamaForCausalLM.from_pretrained(str(exported), dtype=torch.float32)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), theirs(tokens).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert json.loads((exported / "config.json").read_text())["num_key_value_heads"] == cfg.model.n_kv_heads


def test_init_from_round_trip_is_bit_exact(ckpt: Path, exported: Path, tmp_path: Path) -> None:
    """A tp=2 job started from the export holds exactly the checkpoint's weights, and exporting them
    again writes exactly the same tensors."""
    saved, cfg = load_full_weights(str(ckpt / "step-00000003"))
    got = run_layout(2, ["train.steps=1", "parallel.tp=2", f"model.init_from={exported}"], tmp_path, extra="initial")
    assert set(got["initial"]) == set(saved)
    for name, value in saved.items():
        assert torch.equal(got["initial"][name], value), name
    again = export_hf(got["initial"], cfg.model, tmp_path / "again")
    first, second = load_file(str(exported / WEIGHTS)), load_file(str(again / WEIGHTS))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def _train(*sets: str, resume: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "parallel.train"]
    for s in sets:
        args += ["--set", s]
    if resume:
        args += ["--resume", resume]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("sets", "resume", "message"),
    [
        (
            ["model.preset=debug", "model.init_from={hf}"],
            None,
            "model.init_from={hf}: hidden_size is 64 there but model.dim is 256",
        ),
        (["model.init_from={ckpt}"], None, "model.init_from={ckpt}: no config.json there"),
        (["model.preset=debug"], "{ckpt}/step-00000003", "model.dim saved 64, requested 256"),
        ([], "{ckpt}/step-00000009", "checkpoint {ckpt}/step-00000009: does not exist"),
    ],
    ids=["init-from-other-shape", "init-from-not-hf", "resume-other-shape", "resume-missing"],
)
def test_unusable_weights_are_refused_in_one_line(
    sets: list[str], resume: str | None, message: str, ckpt: Path, exported: Path
) -> None:
    fill = {"hf": exported, "ckpt": ckpt}
    out = _train(*(s.format(**fill) for s in sets), resume=resume and resume.format(**fill))
    assert out.returncode == 2
    assert out.stderr.startswith("fourfold: config error: ") and len(out.stderr.strip().splitlines()) == 1
    assert message.format(**fill) in out.stderr


def test_corrupt_and_partial_checkpoints_are_named(ckpt: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "step-00000003"
    shutil.copytree(ckpt / "step-00000003", broken)
    (broken / ".metadata").unlink()
    out = _train(resume=str(broken))
    assert out.returncode == 2 and "corrupt (DCP .metadata is missing)" in out.stderr, out.stderr

    shard = next((ckpt / "step-00000003").glob("*.distcp"))
    shutil.copytree(ckpt / "step-00000003", broken, dirs_exist_ok=True)
    (broken / shard.name).write_bytes(b"truncated")
    out = _train(resume=str(broken))
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.startswith(f"fourfold: error: checkpoint {broken}: cannot be loaded"), out.stderr[-2000:]


def test_init_from_refuses_numbers_that_differ_without_a_shape(exported: Path, tmp_path: Path) -> None:
    """A foreign export whose RoPE base differs has every shape right but would give other logits."""
    import shutil

    other = tmp_path / "other-rope"
    shutil.copytree(exported, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    out = _train(f"model.init_from={other}")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"fourfold: config error: model.init_from={other}: rope_theta is 500000.0 there but model.rope_theta is "
        f"{config['rope_theta']}"
    ]


def test_export_to_an_unwritable_place_is_one_line(ckpt: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    out = _fourfold("ckpt", "export", str(ckpt), "--hf", str(tmp_path / "a-file" / "hf"))
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"--hf {tmp_path / 'a-file' / 'hf'}: cannot write there" in out.stderr
