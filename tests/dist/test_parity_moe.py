"""Mixture-of-experts models train exactly like one process in every layout they run in (dp with ZeRO 0-3
and HSDP, expert parallelism at ep=2 and ep=4, tp, cp, pipelines, recomputation and their combinations),
dropless and with a capacity factor, with the aux loss and with the auxiliary-loss-free bias update:
losses <= 1e-4 relative, weights <= 1e-5, and the router's metrics (aux loss, dropped share, busiest
expert) equal one process's. A skewed router neither hangs nor crashes, and the metrics show it; a job
saved at ep=4 resumes at ep=2 and in one process."""

from pathlib import Path

import pytest
import torch

from tests.dist.harness import LayoutResults, compare, run_layout, spawn

pytestmark = pytest.mark.dist

MOE = ["model.preset=tiny-moe"]
CAPACITY = [*MOE, "model.moe.capacity_factor=1.0"]
BIAS = [*MOE, "model.moe.score=sigmoid", "model.moe.bias_update_rate=0.01"]
# name: (world, overrides, the one-process reference it must equal)
LAYOUTS = {
    "one": (1, MOE, None),
    "one-capacity": (1, CAPACITY, None),
    "one-bias": (1, BIAS, None),
    "dp2-zero0": (2, [*MOE, "parallel.dp=2"], "one"),
    "dp2-zero1": (2, [*MOE, "parallel.dp=2", "parallel.zero=1", "parallel.bucket_mb=0.02"], "one"),
    "dp2-zero2": (2, [*MOE, "parallel.dp=2", "parallel.zero=2", "parallel.bucket_mb=0.02"], "one"),
    "dp2-zero3": (2, [*MOE, "parallel.dp=2", "parallel.zero=3"], "one"),
    "pp2-1f1b": (2, [*MOE, "parallel.pp=2"], "one"),
    "pp2-dp2-zero3": (4, [*MOE, "parallel.pp=2", "parallel.dp=2", "parallel.zero=3"], "one"),
    "ac-full": (1, [*MOE, "parallel.activation_checkpointing=full"], "one"),
    "dp2-capacity": (2, [*CAPACITY, "parallel.dp=2"], "one-capacity"),
    "dp2-bias": (2, [*BIAS, "parallel.dp=2", "parallel.zero=1"], "one-bias"),
    # expert parallelism: experts sharded over ep ranks taken from dp_shard
    "ep2-zero0": (2, [*MOE, "parallel.dp=2", "parallel.ep=2"], "one"),
    "ep2-dp4-zero1": (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "parallel.zero=1"], "one"),
    "ep2-dp4-zero2": (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "parallel.zero=2"], "one"),
    "ep2-dp4-zero3": (4, [*MOE, "parallel.dp=4", "parallel.ep=2", "parallel.zero=3"], "one"),
    "ep4-zero3": (4, [*MOE, "parallel.dp=4", "parallel.ep=4", "parallel.zero=3"], "one"),
    "ep4-zero1": (4, [*MOE, "parallel.dp=4", "parallel.ep=4", "parallel.zero=1"], "one"),
    "ep2-pp2": (4, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.pp=2"], "one"),
    "ep2-ac-full": (2, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.activation_checkpointing=full"], "one"),
    "ep2-pp2-zbv": (
        4,
        [
            *MOE,
            "parallel.dp=2",
            "parallel.ep=2",
            "parallel.pp=2",
            "parallel.pp_schedule=zbv",
            "train.micro_batch=1",
            "parallel.zero=1",
        ],
        "one",
    ),  # fmt: skip
    "ep2-hsdp": (4, [*MOE, "parallel.dp=4", "parallel.dp_replicate=2", "parallel.ep=2", "parallel.zero=3"], "one"),
    "tp2": (2, [*MOE, "parallel.tp=2"], "one"),
    "ep2-tp2-zero1": (4, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "parallel.zero=1"], "one"),
    "ep2-tp2-zero3": (4, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.tp=2", "parallel.zero=3"], "one"),
    "cp2": (2, [*MOE, "parallel.cp=2"], "one"),
    "cp2-capacity": (2, [*CAPACITY, "parallel.cp=2", "parallel.cp_mode=allgather"], "one-capacity"),
    "ep2-cp2-zero1": (4, [*MOE, "parallel.dp=2", "parallel.ep=2", "parallel.cp=2", "parallel.zero=1"], "one"),
    "ep2-cp2-zero3": (
        4,
        [*CAPACITY, "parallel.dp=2", "parallel.ep=2", "parallel.cp=2", "parallel.zero=3"],
        "one-capacity",
    ),
    "ep2-capacity": (2, [*CAPACITY, "parallel.dp=2", "parallel.ep=2", "parallel.zero=1"], "one-capacity"),
    "ep2-bias": (2, [*BIAS, "parallel.dp=2", "parallel.ep=2", "parallel.zero=2"], "one-bias"),
}
ROUTER = ("moe_aux_loss", "moe_dropped_frac", "moe_max_load")


@pytest.fixture(scope="module")
def results(results_dir: Path) -> LayoutResults:
    (results_dir / "moe").mkdir(exist_ok=True)
    return LayoutResults({name: (world, o) for name, (world, o, _) in LAYOUTS.items()}, results_dir / "moe")


@pytest.mark.parametrize("layout", [name for name, (_, _, ref) in LAYOUTS.items() if ref])
def test_moe_layout_matches_single_process(layout: str, results: LayoutResults) -> None:
    ref = results[LAYOUTS[layout][2]]
    got = results[layout]
    compare(ref, got)
    for step, (a, b) in enumerate(zip(ref["history"], got["history"], strict=True), start=1):
        for key in ROUTER:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), f"step {step}: {key} {b[key]} vs {a[key]}"


def test_references_exercise_what_they_name(results: LayoutResults) -> None:
    assert all(m["moe_aux_loss"] > 0 for m in results["one"]["history"])
    assert all(m["moe_dropped_frac"] == 0 for m in results["one"]["history"])  # dropless
    assert any(m["moe_dropped_frac"] > 0 for m in results["one-capacity"]["history"])


def _skewed(rank: int, world: int, ep: int = 1) -> list[dict]:
    from parallel.config import build_config
    from parallel.moe import MoE
    from parallel.trainer import Trainer

    spec = {"model": {"preset": "tiny-moe", "moe": {"top_k": 1, "capacity_factor": 1.0}},
            "parallel": {"dp": world, "zero": 1, "ep": ep}, "data": {"source": "synthetic"},
            "train": {"steps": 2, "global_batch": 8, "micro_batch": 2, "seq_len": 32}}  # fmt: skip
    trainer = Trainer(build_config(spec, world_size=world))
    for m in (m for part in trainer.parts for m in part.modules() if isinstance(m, MoE)):
        m.expert_bias[0] = 1e3  # every token of every rank to expert 0
    history = [trainer.train_step() for _ in range(2)]
    trainer.close()
    return history


@pytest.mark.parametrize("ep", [1, 2], ids=["dp2", "ep2"])
def test_skewed_router_trains_and_shows_it(ep: int, tmp_path: Path) -> None:
    """At ep=2 every token goes to rank 0's expert and rank 1's experts get none, in every block."""
    history = spawn(_skewed, 2, tmp_path, ep, timeout_s=120)[0]
    for m in history:
        assert torch.isfinite(torch.tensor(m["loss"]))
        assert m["moe_max_load"] == pytest.approx(4.0)  # all of it on one of 4 experts
        assert m["moe_dropped_frac"] == pytest.approx(1 - 8 / 32)  # capacity 8 of each sequence's 32


def _save_and_resume(rank: int, world: int, ckpt: str) -> tuple[list, list]:
    from parallel.config import build_config
    from parallel.moe import moe_layers
    from parallel.trainer import Trainer

    def biases(trainer: Trainer) -> list:
        return [m.expert_bias.clone() for part in trainer.parts for m in moe_layers(part)]

    spec = {"model": {"preset": "tiny-moe", "moe": {"bias_update_rate": 0.01}}, "parallel": {"dp": world, "zero": 1},
            "data": {"source": "synthetic"}, "checkpoint": {"dir": ckpt, "every": 2},
            "train": {"steps": 2, "global_batch": 8, "micro_batch": 2, "seq_len": 32}}  # fmt: skip
    first = Trainer(build_config(spec, world_size=world))
    first.run()
    saved = biases(first)
    first.close()
    again = Trainer(build_config(spec, world_size=world), resume="auto")
    assert again.step == 2
    return saved, biases(again)


def test_routing_biases_are_checkpointed(tmp_path: Path) -> None:
    saved, resumed = spawn(_save_and_resume, 2, tmp_path, str(tmp_path / "ckpt"), timeout_s=120)[0]
    assert any(b.abs().sum() > 0 for b in saved)  # two steps of updates moved them
    for a, b in zip(saved, resumed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


TEN = [*MOE, "train.steps=10"]


def test_resume_at_another_expert_layout(tmp_path: Path) -> None:
    """Saved at ep=4 (ZeRO-3) after step 5, resumed at ep=2 (ZeRO-1, pp=2) and in one process: steps 6-10
    as one uninterrupted process gives them (the experts are saved whole, under their names)."""
    uninterrupted = run_layout(1, TEN, tmp_path)
    saved = [*TEN, "parallel.dp=4", "parallel.ep=4", "parallel.zero=3", f"checkpoint.dir={tmp_path / 'ckpt'}",
             "checkpoint.every=5"]  # fmt: skip
    run_layout(4, saved, tmp_path, stop_after=5)
    path = tmp_path / "ckpt" / "step-00000005"
    want = [m["loss"] for m in uninterrupted["history"] if m["step"] > 5]
    for world, layout in ((4, ["parallel.dp=2", "parallel.ep=2", "parallel.pp=2", "parallel.zero=1"]), (1, [])):
        resumed = run_layout(world, [*TEN, *layout, f"checkpoint.resume={path}"], tmp_path)
        got = [m["loss"] for m in resumed["history"]]
        assert len(got) == len(want) == 5
        for step, (a, b) in enumerate(zip(got, want, strict=True), start=6):
            assert abs(a - b) <= 1e-4 * abs(b), f"world {world}, step {step}: resumed loss {a} vs uninterrupted {b}"


def test_expert_parallel_job_starts_from_a_mixtral_directory(tmp_path: Path) -> None:
    """model.init_from at ep=2 under ZeRO-3: every rank reads the hub-layout experts and keeps its own."""
    from parallel.config import ModelConfig
    from parallel.hf import export_hf
    from parallel.model import Transformer

    mixtral = ["model.preset=tiny-moe", "model.moe.n_shared_experts=0", "model.moe.first_dense=0"]
    m = ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"n_shared_experts": 0, "first_dense": 0}})
    saved = Transformer(m, max_seq_len=32)
    saved.init_weights(7)
    export_hf(saved.state_dict(), m, tmp_path / "hf")
    layout = [*mixtral, "parallel.dp=2", "parallel.ep=2", "parallel.zero=3", f"model.init_from={tmp_path / 'hf'}"]
    got = run_layout(2, ["train.steps=1", *layout], tmp_path, extra="initial")["initial"]
    want = {n: t for n, t in saved.state_dict().items() if not n.endswith("expert_bias")}
    assert set(want) <= set(got)
    for name, value in want.items():
        assert torch.equal(got[name], value), name
