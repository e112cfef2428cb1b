"""At dp=4, the bytes each rank holds at their peak inside the step match the ZeRO formulas.

Measured on the tensors themselves (each storage counted once), sampled inside the step: after
each micro-batch's backward before its gradients are reduced, after the reduction, and around
the optimizer's update (see `_memory_probe` in the harness). P = model parameters x 4 bytes
(fp32), N = 4 data-parallel ranks; AdamW keeps two states per element.

What the peak adds to the textbook table: ZeRO-2 shards the gradients it keeps, but each
micro-batch's backward first produces the whole gradients: this engine copies each bucket's into a
buffer and reduce-scatters it while backward goes on, and keeps the buffers until the last bucket's
reduction is done, so for a moment a rank holds P + P/N of gradients.
ZeRO-3's unsharded gradients live inside FSDP's backward hooks one block at a time and are
reduce-scattered there, before any sample point; what it keeps is P/N.
"""

import pytest

from parallel.config import ModelConfig
from parallel.flops import param_count
from tests.dist.harness import run_layouts

pytestmark = pytest.mark.dist

N = 4
EXPECTED = {  # peak (params, grads, optimizer) as multiples of P
    0: (1, 1, 2),
    1: (1, 1, 2 / N),
    2: (1, 1 + 1 / N, 2 / N),
    3: (1 / N, 1 / N, 2 / N),
}


@pytest.fixture(scope="module")
def peaks(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, int]]]:
    layouts = {f"zero{z}": [f"parallel.dp={N}", f"parallel.zero={z}", "train.steps=1"] for z in EXPECTED}
    results = run_layouts(N, layouts, tmp_path_factory.mktemp("memory"), extra="memory")
    return {z: results[f"zero{z}"]["memory_all"] for z in EXPECTED}


@pytest.mark.parametrize("zero", list(EXPECTED))
def test_zero_peak_memory_matches_formula(zero: int, peaks: dict[int, list[dict[str, int]]]) -> None:
    P = param_count(ModelConfig(preset="tiny")) * 4
    want = dict(zip(("params", "grads", "optimizer"), (f * P for f in EXPECTED[zero]), strict=True))
    for rank, held in enumerate(peaks[zero]):
        for kind, expected in want.items():
            assert abs(held[kind] - expected) <= 0.02 * expected, (
                f"zero={zero} rank {rank} {kind}: peaks at {held[kind]} bytes, formula says {expected:.0f}"
            )
