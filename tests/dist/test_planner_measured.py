"""The planner's predictions (parallel/planner) against what the engine does, measured on every rank of
seventeen layouts over dp (ZeRO 0-3, HSDP), tp with sequence parallelism, pp (gpipe, 1f1b, interleaved
1F1B, zero-bubble V), cp (ring and all-gather), activation checkpointing (none, selective, full) and
expert parallelism (a mixture-of-experts model at ep=2 and ep=4).

How each quantity is measured is in tests/dist/planner_probe.py; in short, in the second of two steps:

- state: the peak bytes of parameters, gradients and optimizer states a rank holds (each storage once),
  against `state_bytes(cfg, pp_rank)`, within 2%;
- activations: what `saved_tensors_hooks` sees autograd save (parameters, buffers and the scalar loss
  left out; selective checkpointing's cached outputs read from its cache), within 10%, two ways:
  per micro-batch, each forward of each stage this rank runs, against `unit_bytes`' terms for that stage
  (its layers, the first stage's token ids, the last stage's head and loss); and at the peak of the step,
  the saved tensors alive at once (several micro-batches in flight under pipelining) against the
  autograd-saved items of `activation_bytes(cfg, pp_rank)`, layers + embedding + head (its logits, stage
  outputs and receive buffers are held by the trainer and the pipeline stage, not by autograd);
- communication: the payload of every collective per mesh axis (scalars left out, as the planner
  leaves them out) against `comm_bytes(cfg, "fp32", pp_rank)`, within 5%.

The layouts run on 4 ranks, one after another in one set of processes, and one 4D layout (dp, tp, pp
and cp all 2) on 16 ranks sharing the two cores.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.dist.planner_runs import TOL, config_of, measure_layouts, predicted, table, within

pytestmark = pytest.mark.dist

WORLD = 4
FOUR_D = {
    "dp2_tp2_pp2_cp2_zero1": ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.cp=2", "parallel.zero=1"]
}
"""Layouts on 16 ranks (every axis at once)."""
LAYOUTS: dict[str, list[str]] = {
    "dp4_zero0": ["parallel.dp=4", "parallel.zero=0"],
    "dp4_zero1": ["parallel.dp=4", "parallel.zero=1"],
    "dp4_zero2_accum2": ["parallel.dp=4", "parallel.zero=2", "train.micro_batch=1"],
    "dp4_zero3_full": ["parallel.dp=4", "parallel.zero=3", "parallel.activation_checkpointing=full"],
    "hsdp2x2_zero3": ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero=3", "train.micro_batch=1"],
    "hsdp2x2_zero2": ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero=2"],
    "tp4_selective": ["parallel.tp=4", "parallel.activation_checkpointing=selective"],
    "dp2_tp2_zero1": ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"],
    "pp2_dp2_gpipe_zero2": ["parallel.pp=2", "parallel.dp=2", "parallel.pp_schedule=gpipe", "parallel.zero=2"],
    "pp2_tp2_1f1b_full": [
        "parallel.pp=2",
        "parallel.tp=2",
        "parallel.pp_schedule=1f1b",
        "parallel.activation_checkpointing=full",
    ],  # fmt: skip
    "pp2_cp2_interleaved": [
        "parallel.pp=2",
        "parallel.cp=2",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_virtual=2",
    ],  # fmt: skip
    "pp2_dp2_zbv_zero3": [
        "parallel.pp=2",
        "parallel.dp=2",
        "parallel.pp_schedule=zbv",
        "parallel.zero=3",
        "train.micro_batch=1",
    ],  # fmt: skip
    "pp4_1f1b": ["parallel.pp=4", "parallel.pp_schedule=1f1b"],
    "cp2_tp2_allgather_selective": [
        "parallel.cp=2",
        "parallel.tp=2",
        "parallel.cp_mode=allgather",
        "parallel.activation_checkpointing=selective",
    ],  # fmt: skip
    "dp2_cp2_ring_zero2_selective": [
        "parallel.dp=2",
        "parallel.cp=2",
        "parallel.cp_mode=ring",
        "parallel.zero=2",
        "parallel.activation_checkpointing=selective",
    ],  # fmt: skip
    # mixture of experts: experts sharded over ep (dp_shard ranks), their states over the edp rest
    "moe_dp4_ep2_zero1": ["model.preset=tiny-moe", "parallel.dp=4", "parallel.ep=2", "parallel.zero=1"],
    "moe_dp4_ep4_zero3": ["model.preset=tiny-moe", "parallel.dp=4", "parallel.ep=4", "parallel.zero=3"],
}
ALL = {**LAYOUTS, **FOUR_D}


def _world(name: str) -> int:
    return 16 if name in FOUR_D else WORLD


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    results = {}
    for world, layouts in ((WORLD, LAYOUTS), (16, FOUR_D)):
        results.update(measure_layouts(world, layouts, tmp_path_factory.mktemp("planner")))
        print(table(world, layouts, results))  # shown with a failure's captured output
    return results


def _ranks(name: str, measured: dict[str, list[dict[str, Any]]]) -> list[tuple[int, dict, dict]]:
    cfg = config_of(_world(name), ALL[name])
    return [(rank, m, predicted(cfg, m["pp_rank"])) for rank, m in enumerate(measured[name])]


# Under expert parallelism a rank keeps the activations of the tokens its experts received: the planner
# counts the share a balanced router gives (top_k per token); the rank of a busier expert keeps more and
# the others less, by as much as the routing of the step happens to be uneven (seen: up to +10% on one
# rank at tiny-moe's initial routing, in one run of several). The ranks' mean, which the routing cannot
# move (every token sent is received once), is held to the usual 10%; each rank to 25%.
ROUTED = {"moe_dp4_ep2_zero1", "moe_dp4_ep4_zero3"}


def _activation_ranks(name: str, measured: dict[str, list[dict[str, Any]]]) -> list[tuple[int, dict, dict]]:
    ranks = _ranks(name, measured)
    if name not in ROUTED:
        return ranks
    want = ranks[0][2]  # one pipeline rank in these layouts: every rank has the same prediction
    for rank, got, _ in ranks:
        assert within(got["peak"], want["peak"], 0.25), f"{name} rank {rank}: peak {got['peak']} vs {want['peak']}"
    n = len(ranks)
    per_mb = {key: sum(m["per_mb"][key] for _, m, _ in ranks) / n for key in ranks[0][1]["per_mb"]}
    mean = {"peak": sum(m["peak"] for _, m, _ in ranks) / n, "per_mb": per_mb, "pp_rank": 0}
    return [(-1, mean, want)]  # rank -1: the mean over the ranks


@pytest.mark.parametrize("name", list(ALL))
def test_state_bytes_match_the_sharded_tensors(name: str, measured: dict[str, list[dict[str, Any]]]) -> None:
    for rank, got, want in _ranks(name, measured):
        for kind in ("params", "grads", "optimizer"):
            assert within(got["state"][kind], want["state"][kind], TOL["state"]), (
                f"{name} rank {rank} (pp rank {got['pp_rank']}) {kind}: measured {got['state'][kind]} bytes, "
                f"state_bytes says {want['state'][kind]}"
            )


@pytest.mark.parametrize("name", list(ALL))
def test_activation_bytes_per_micro_batch(name: str, measured: dict[str, list[dict[str, Any]]]) -> None:
    for rank, got, want in _activation_ranks(name, measured):
        stages = {stage for stage, _ in got["per_mb"]}
        assert stages == set(want["per_mb"]), f"{name} rank {rank}: forwards of stages {stages}"
        for (stage, mb), n in sorted(got["per_mb"].items()):
            assert within(n, want["per_mb"][stage], TOL["activations"]), (
                f"{name} rank {rank} stage {stage} micro-batch {mb}: autograd saved {n} bytes, the planner's "
                f"per-micro-batch terms say {want['per_mb'][stage]}"
            )


# The planner's one known miss, stated in docs/planner.md ("Measured error"): under zbv the input-gradient
# pass retains part of each micro-batch's graph until its deferred weight pass, which the planner's 2p
# chunk-micro-batches in flight do not count. Measured +42% (pp rank 0) and +24% (pp rank 1) over the
# prediction; held here to [-10%, +50%] so that it cannot drift unnoticed either way.
UNDER_PREDICTED = {"pp2_dp2_zbv_zero3": 0.5}


@pytest.mark.parametrize("name", list(ALL))
def test_activation_bytes_at_the_peak(name: str, measured: dict[str, list[dict[str, Any]]]) -> None:
    for rank, got, want in _activation_ranks(name, measured):
        if name in UNDER_PREDICTED:
            low, high = want["peak"] * (1 - TOL["activations"]), want["peak"] * (1 + UNDER_PREDICTED[name])
            assert low <= got["peak"] <= high, f"{name} rank {rank}: peak {got['peak']}, predicted {want['peak']}"
            continue
        assert within(got["peak"], want["peak"], TOL["activations"]), (
            f"{name} rank {rank} (pp rank {got['pp_rank']}): at most {got['peak']} saved bytes alive at once, "
            f"activation_bytes (layers + embedding + head) says {want['peak']}"
        )


@pytest.mark.parametrize("name", list(ALL))
def test_comm_bytes_per_axis(name: str, measured: dict[str, list[dict[str, Any]]]) -> None:
    for rank, got, want in _ranks(name, measured):
        assert set(got["comm"]) - {"other"} <= set(want["comm"]) | {a for a, n in got["comm"].items() if not n}, (
            f"{name} rank {rank}: traffic on axes {got['comm']}, the planner expects only {want['comm']}"
        )
        assert not got["comm"].get("other"), f"{name} rank {rank}: collectives outside the mesh axes: {got['calls']}"
        for axis, expected in want["comm"].items():
            n = got["comm"].get(axis, 0)
            assert within(n, expected, TOL["comm"]), (
                f"{name} rank {rank} (pp rank {got['pp_rank']}) {axis}: collectives moved {n} bytes "
                f"({got['calls']}), comm_bytes says {expected}"
            )
