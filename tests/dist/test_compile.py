"""train.compile: every layout, its blocks compiled, trains like one eager process.

Regional compilation (`parallel.parallelize.apply_compile`) with each kind of layout the blocks take
part in: data parallel (ZeRO-0 and FSDP2's ZeRO-3), tensor parallel with sequence parallel (each
block's attention and feed-forward compiled), pipeline stages, ring and all-gather context parallel,
activation checkpointing. Inductor may fuse and reorder floating-point
work, so the tolerances are the parity tests' (losses 1e-4 relative, weights 1e-5), against the same
real single-process eager run. The first step reports its compile time apart from its step time.
"""

from pathlib import Path

import pytest

from tests.dist.harness import LayoutResults, compare, run_layouts

pytestmark = [pytest.mark.dist, pytest.mark.slow]

COMPILE = ["train.compile=true"]
LAYOUTS = {
    "one": (1, COMPILE),
    "ac-full": (1, [*COMPILE, "parallel.activation_checkpointing=full"]),
    "dp2-zero0": (2, [*COMPILE, "parallel.dp=2", "train.micro_batch=4"]),
    "dp2-zero3": (2, [*COMPILE, "parallel.dp=2", "parallel.zero=3", "train.micro_batch=4"]),
    "tp2": (2, [*COMPILE, "parallel.tp=2"]),
    "dp2-tp2-zero3": (4, [*COMPILE, "parallel.dp=2", "parallel.tp=2", "parallel.zero=3"]),
    "pp2-1f1b": (2, [*COMPILE, "parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "cp2-ring": (2, [*COMPILE, "parallel.cp=2", "parallel.cp_mode=ring"]),
    "cp2-allgather": (2, [*COMPILE, "parallel.cp=2", "parallel.cp_mode=allgather"]),
}


@pytest.fixture(scope="module")
def results(results_dir: Path) -> LayoutResults:
    return LayoutResults(LAYOUTS, results_dir)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_layout_matches_eager_single_process(
    layout: str, single_process: dict, results: LayoutResults
) -> None:
    got = results[layout]
    compare(single_process, got)
    first, *rest = got["history"]
    assert first["compile_s"] > 0, first  # the blocks were compiled, and the time is reported apart
    assert [m["compile_s"] for m in rest] == [0.0] * len(rest)  # compiled once: no recompiles


MOE = ["model.preset=tiny-moe"]


def test_compiled_mixture_of_experts_matches_eager_single_process(tmp_path: Path) -> None:
    """Experts are data-dependent (tokens per expert change every step): compiled blocks break the graph
    around the dispatch and still train like one eager process, at ep=2 too (the all-to-all inside)."""
    reference = run_layouts(1, {"eager": MOE}, tmp_path)["eager"]
    got = run_layouts(2, {"dp2": [*MOE, *COMPILE, "parallel.dp=2"],
                          "ep2": [*MOE, *COMPILE, "parallel.dp=2", "parallel.ep=2", "parallel.zero=3"]}, tmp_path)  # fmt: skip
    for name, result in got.items():
        compare(reference, result)
        assert result["history"][0]["compile_s"] > 0, name
