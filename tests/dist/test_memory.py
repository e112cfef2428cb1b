"""At dp=4, the bytes each rank holds match the ZeRO formulas (measured on the tensors).

P = model parameters x 4 bytes (fp32), N = 4 data-parallel ranks; AdamW keeps two
states per element.
"""

from pathlib import Path

import pytest

from parallel.config import ModelConfig
from parallel.flops import param_count
from tests.dist.harness import run_layout

pytestmark = pytest.mark.dist

N = 4
EXPECTED = {  # (params, grads, optimizer) as multiples of P
    0: (1, 1, 2),
    1: (1, 1, 2 / N),
    2: (1, 1 / N, 2 / N),
    3: (1 / N, 1 / N, 2 / N),
}


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_memory_matches_formula(zero: int, tmp_path: Path) -> None:
    overrides = [f"parallel.dp={N}", f"parallel.zero={zero}", "train.steps=1"]
    result = run_layout(N, overrides, tmp_path, extra="memory")
    P = param_count(ModelConfig(preset="tiny")) * 4
    want = dict(zip(("params", "grads", "optimizer"), (f * P for f in EXPECTED[zero]), strict=True))
    for rank, held in enumerate(result["memory_all"]):
        for kind, expected in want.items():
            assert abs(held[kind] - expected) <= 0.02 * expected, (
                f"zero={zero} rank {rank} {kind}: holds {held[kind]} bytes, formula says {expected:.0f}"
            )
