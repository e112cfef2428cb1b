"""A rank that stops answering ends the run after parallel.timeout_s with an error
naming the waiting rank, the mesh axis and what it was waiting in."""

import copy
import time
from pathlib import Path

import pytest

from tests.dist.harness import BASE, spawn

pytestmark = pytest.mark.dist

TIMEOUT_S = 3.0


def _stall(rank: int, world: int, overrides: list[str], stalled_rank: int) -> str:
    from parallel.comms import CommTimeout
    from parallel.config import build_config
    from parallel.spec_files import apply_overrides
    from parallel.trainer import Trainer

    cfg = build_config(apply_overrides(copy.deepcopy(BASE), overrides), world_size=world)
    trainer = Trainer(cfg)
    trainer.train_step()  # one healthy step: every peer is connected
    if rank == stalled_rank:
        time.sleep(TIMEOUT_S * 2)  # stops answering, as a wedged GPU or process would
        return "stalled"
    started = time.monotonic()
    try:
        trainer.train_step()
    except CommTimeout as err:
        return f"{err} [after {time.monotonic() - started:.1f}s]"
    return "no error"


@pytest.mark.parametrize(
    ("overrides", "world", "expected"),
    [
        (
            ["parallel.pp=2"],
            2,
            ("rank 0 timed out on mesh axis 'pp' while pipeline stage 0: ", "micro-batch", "stage 1"),
        ),
        (
            ["parallel.cp=2"],
            2,
            ("rank 0 timed out on mesh axis 'cp' while ring attention forward step 1/1: K/V from cp rank 1",),
        ),
        (["parallel.dp=2"], 2, ("rank 0 timed out on mesh axis 'dp' while all-reduce of gradients",)),
        # Every axis is smaller than the world: their groups must get timeout_s too (torch's own
        # default for sub-groups is 30 minutes).
        (["parallel.dp=2", "parallel.tp=2"], 4, ("rank 0 timed out on mesh axis 'dp' while all-reduce of gradients",)),
    ],
    ids=["pp", "cp", "dp", "dp2-tp2"],
)
def test_stalled_rank_is_named(overrides: list[str], world: int, expected: tuple[str, ...], tmp_path: Path) -> None:
    overrides = [*overrides, f"parallel.timeout_s={TIMEOUT_S}"]
    results = spawn(_stall, world, tmp_path, overrides, world - 1, timeout_s=TIMEOUT_S)
    assert results[-1] == "stalled"
    message = results[0]
    assert all(part in message for part in expected), message
    waited = float(message.rsplit("after ", 1)[1].rstrip("s]"))
    assert TIMEOUT_S * 0.8 <= waited <= TIMEOUT_S * 3, message
