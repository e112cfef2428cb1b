"""In-memory snapshots between checkpoints (`checkpoint.memory_every`): every N steps each rank copies
its state into host memory and sends a copy to its buddy, the rank `offset` places after it, so a
rank whose state has no live replica (ZeRO 1-3 over every dp rank) can still be restored without
storage: every rank goes back to the snapshot's step, the lost rank's copy coming from its buddy
(`parallel.peer.plan_recovery`, path `snapshot`).

    snaps = Snapshots(every=5, offset=2)      # made by the Trainer when memory_every > 0
    snaps.maybe_take(trainer)                 # after each step; a collective when due
    snaps.own, snaps.held                     # this rank's last snapshot; (rank, its snapshot) held for it

The offset: FOURFOLD_SNAPSHOT_OFFSET (the Ray launcher sets the smallest that puts every rank's buddy
on another node, `workers.placement.buddy_offset`), else LOCAL_WORLD_SIZE under torchrun (the next
node's rank), else 1. A snapshot is committed on a rank only once both its sending and its receiving
are done, so a failure in the middle leaves the previous one in place.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from parallel.peer import Kept, buffers_for, capture, pack, unpack


def snapshot_offset(world: int) -> int:
    """How far after a rank its buddy is (see the module docstring); 1 when nothing says."""
    for key in ("FOURFOLD_SNAPSHOT_OFFSET", "LOCAL_WORLD_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit() and 0 < int(value) < world:
            return int(value)
    return 1


class Snapshots:
    def __init__(self, every: int, offset: int | None = None) -> None:
        self.every = every
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.offset = offset or snapshot_offset(self.world)
        # Own gloo group: host-memory tensors on every backend, never interleaved with training traffic.
        self.group = dist.new_group(backend="gloo") if self.world > 1 else None
        self.own: Kept | None = None
        self.held: tuple[int, Kept] | None = None  # (the rank whose snapshot this rank keeps, that snapshot)

    def maybe_take(self, trainer: object) -> float:
        """Take a snapshot when the step is due; returns the seconds it took (0 when not due)."""
        step = trainer.step  # type: ignore[attr-defined]
        if not self.every or step % self.every:
            return 0.0
        start = time.perf_counter()
        self.take(trainer)
        return time.perf_counter() - start

    @torch.no_grad()
    def take(self, trainer: object) -> None:
        live = capture(trainer)
        assert live is not None, "a snapshot is taken between steps, never inside an update"
        params, states = ([t.detach().cpu().clone() for t in ts] for ts in (live.params, live.states))
        own = Kept(live.step, dict(live.data), live.rng.clone(), params, states)
        if self.group is None:
            self.own = own
            return
        dst, src = (self.rank + self.offset) % self.world, (self.rank - self.offset) % self.world
        metas: list[dict | None] = [None] * self.world
        dist.all_gather_object(metas, {**own.meta(), "rng": own.rng}, group=self.group)
        incoming = buffers_for(metas[src], torch.device("cpu"))
        outgoing = pack(own.params + own.states)
        works = [dist.isend(b, dst, group=self.group) for b in outgoing.values()]
        works += [dist.irecv(b, src, group=self.group) for b in incoming.values()]
        for work in works:
            work.wait()
        self.own, self.held = own, (src, unpack(metas[src], incoming))

    def report(self) -> dict[str, object]:
        """What this rank holds, for the recovery plan: {"own": step | None, "held": [rank, step] | None}."""
        return {
            "own": self.own.step if self.own else None,
            "held": [self.held[0], self.held[1].step] if self.held else None,
        }
