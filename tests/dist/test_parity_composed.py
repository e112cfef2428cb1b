"""The layout families composed: every pipeline schedule with every ZeRO stage, activation
checkpointing with each parallelism, HSDP with ZeRO-2, all-gather context parallelism with tp and
dp. Each trains exactly like one process: tiny model, 3 steps (enough: a wrong gradient shows in
the weights after the first), losses <= 1e-4 relative and weights <= 1e-5 against a one-process
run of the same 3 steps. (tp x cp x pp and the demo's full 4D layout are in test_parity_4d.)

Layouts of one world size run one after another in one set of processes (LayoutResults), so the
two dozen 4-rank cases pay for starting processes and importing torch once.
"""

from pathlib import Path

import pytest

from tests.dist.harness import LayoutResults, compare

pytestmark = pytest.mark.dist

PP2 = ["parallel.pp=2", "parallel.dp=2", "train.micro_batch=1"]  # 4 micro-batches per rank: zbv needs 3
SCHEDULE = {
    "gpipe": ["parallel.pp_schedule=gpipe"],
    "1f1b": ["parallel.pp_schedule=1f1b"],
    "interleaved": ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2"],
    "zbv": ["parallel.pp_schedule=zbv", "parallel.pp_virtual=2"],
}

# Every schedule with every ZeRO stage at pp=2 x dp=2: the zero-bubble schedule's split backward
# once met FSDP's resharding and lost weight gradients (ZeRO-3 only), so no pair is left out.
SWEEP = {f"pp2-{name}-dp2-zero{z}": (4, [*PP2, *sched, f"parallel.zero={z}"]) for name, sched in SCHEDULE.items() for z in range(4)}  # fmt: skip

STEPS = ["train.steps=3"]
LAYOUTS = SWEEP | {
    # the interleaved and zero-bubble schedules with tensor parallelism
    "pp2-interleaved-tp2": (4, ["parallel.pp=2", "parallel.tp=2", *SCHEDULE["interleaved"]]),
    "pp2-zbv-tp2": (4, ["parallel.pp=2", "parallel.tp=2", "train.micro_batch=1", *SCHEDULE["zbv"]]),
    # activation checkpointing, full and selective, with tp and pp, and with cp and ZeRO-3
    "ac-full-tp2-pp2": (4, ["parallel.activation_checkpointing=full", "parallel.tp=2", "parallel.pp=2"]),
    "ac-selective-tp2-pp2": (4, ["parallel.activation_checkpointing=selective", "parallel.tp=2", "parallel.pp=2"]),
    "ac-full-cp2-dp2-zero3": (
        4,
        ["parallel.activation_checkpointing=full", "parallel.cp=2", "parallel.dp=2", "parallel.zero=3"],
    ),
    "ac-selective-cp2-dp2-zero3": (
        4,
        ["parallel.activation_checkpointing=selective", "parallel.cp=2", "parallel.dp=2", "parallel.zero=3"],
    ),
    # HSDP with our own ZeRO-2: reduce-scatter within a replica, all-reduce of the shards across
    "dp4-hsdp2-zero2": (4, ["parallel.dp=4", "parallel.dp_replicate=2", "parallel.zero=2"]),
    # all-gather context parallelism with tp and with dp
    "cp2-allgather-tp2": (4, ["parallel.cp=2", "parallel.cp_mode=allgather", "parallel.tp=2"]),
    "cp2-allgather-dp2": (4, ["parallel.cp=2", "parallel.cp_mode=allgather", "parallel.dp=2", "parallel.zero=1"]),
}


@pytest.fixture(scope="module")
def results(results_dir: Path) -> LayoutResults:
    table = {name: (world, [*STEPS, *overrides]) for name, (world, overrides) in LAYOUTS.items()}
    return LayoutResults(table | {"one-process": (1, STEPS)}, results_dir)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_composed_layout_matches_single_process(layout: str, results: LayoutResults) -> None:
    compare(results["one-process"], results[layout])
