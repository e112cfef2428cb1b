"""Naming what a rank was waiting for when a collective never completes.

The process group's timeout (parallel.timeout_s) turns a hang into an exception
deep inside torch; `watch` re-raises it as a `CommTimeout` that names the rank,
the mesh axis and the action (pipeline step, ring step, gradient all-reduce).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch.distributed as dist


class CommTimeout(RuntimeError):
    """A collective or point-to-point transfer did not complete within the timeout."""


def _is_timeout(err: BaseException) -> bool:
    text = str(err).lower()
    return "timed out" in text or "timeout" in text or "connection closed by peer" in text


@contextlib.contextmanager
def watch(axis: str, action: str | Callable[[], str]) -> Iterator[None]:
    """Re-raise a communication timeout inside the block with rank, axis and action named."""
    try:
        yield
    except CommTimeout:
        raise
    except RuntimeError as err:
        if not _is_timeout(err):
            raise
        what = action() if callable(action) else action
        rank = dist.get_rank() if dist.is_initialized() else 0
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CommTimeout(f"rank {rank} timed out on mesh axis '{axis}' while {what} ({first})") from err
