"""Pipeline and context parallelism, alone and composed with dp and tp, up to all four axes at
once, train exactly like one process (tiny model, 5 steps, losses <= 1e-4 relative, weights
<= 1e-5). Layouts of one world size share one set of processes (LayoutResults)."""

from pathlib import Path

import pytest

from tests.dist.harness import LayoutResults, compare

pytestmark = pytest.mark.dist

LAYOUTS = {
    "pp2-gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2-1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "pp2-interleaved": (2, ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2"]),
    "pp2-zbv": (2, ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=2"]),
    "pp4-1f1b": (4, ["parallel.pp=4", "parallel.pp_schedule=1f1b"]),
    "cp2-ring": (2, ["parallel.cp=2", "parallel.cp_mode=ring"]),
    "cp2-allgather": (2, ["parallel.cp=2", "parallel.cp_mode=allgather"]),
    "cp4-ring": (4, ["parallel.cp=4"]),
    "cp2-tp2": (4, ["parallel.cp=2", "parallel.tp=2"]),
    "pp2-dp2-zero1": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.zero=1"]),
    "pp2-dp2-zero3": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.zero=3"]),
    "pp2-tp2": (4, ["parallel.pp=2", "parallel.tp=2"]),
    "dp2-pp2-tp2": (8, ["parallel.dp=2", "parallel.pp=2", "parallel.tp=2", "parallel.zero=1"]),
    "dp2-cp2-pp2": (8, ["parallel.dp=2", "parallel.cp=2", "parallel.pp=2", "parallel.zero=1"]),
    "cp2-dp2-zero3": (4, ["parallel.cp=2", "parallel.dp=2", "parallel.zero=3"]),
    "tp2-cp2-pp2": (8, ["parallel.tp=2", "parallel.cp=2", "parallel.pp=2"]),
    # the demo's layout: all four at once, 16 ranks sharing the two cores
    "dp2-tp2-pp2-cp2": (16, ["parallel.dp=2", "parallel.tp=2", "parallel.pp=2", "parallel.cp=2", "parallel.zero=1"]),
}


@pytest.fixture(scope="module")
def results(results_dir: Path) -> LayoutResults:
    return LayoutResults(LAYOUTS, results_dir)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_process(layout: str, single_process: dict, results: LayoutResults) -> None:
    compare(single_process, results[layout])
