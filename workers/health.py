"""Is a job making progress? Pure logic over its ranks' heartbeats (no Ray here).

Every rank sends a heartbeat every few seconds from a thread of its own, with the step it
last finished and the phase it is in now (`starting`, then the trainer's `data`,
`forward-backward`, `optimizer`, `loss`, `checkpoint`, `idle`, and `stopping`/`done`).
Two things make a job hung:

- silence: nothing arrived from a rank for `timeout_s` (its process is frozen or its node
  cut off), timed on the driver's clock from when each beat arrived, never the worker's;
- no progress: every rank beats, but no rank's (step, phase) changed for `timeout_s` since
  training began: a wedged device, a collective that never completes. Phases that may
  legitimately take long and that end in a collective with its own timeout (starting,
  checkpoint, stopping) are not judged by progress, only by silence.

The report names the ranks that are behind (the lowest step, then the rarest phase), with
their phase, step and node, so the event says where the job stuck.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

# Phases in which no progress is expected for a while; a hang there surfaces as a collective timeout.
SLOW_PHASES = {"starting", "checkpoint", "stopping", "done"}
LISTED = 8  # ranks named in a report; the rest are counted


@dataclass
class RankState:
    step: int
    phase: str
    heard: float  # driver's monotonic time of the last beat
    changed: float  # driver's monotonic time (step, phase) last changed


class Health:
    def __init__(self, world: int, started: float, nodes: dict[int, str] | None = None) -> None:
        self.world, self.started, self.nodes = world, started, nodes or {}
        self.ranks: dict[int, RankState] = {}

    def record(self, rank: int, step: int, phase: str, now: float) -> None:
        old = self.ranks.get(rank)
        changed = now if old is None or (old.step, old.phase) != (step, phase) else old.changed
        self.ranks[rank] = RankState(step, phase, now, changed)

    @property
    def training(self) -> bool:
        """Every rank got past start-up (its process group and model exist)."""
        return len(self.ranks) == self.world and all(s.phase != "starting" for s in self.ranks.values())

    def problem(self, now: float, timeout_s: float) -> str | None:
        """A one-line description of why the job is hung, or None while it is healthy."""
        quiet = {r: now - (self.ranks[r].heard if r in self.ranks else self.started) for r in range(self.world)}
        silent = [r for r, seconds in quiet.items() if seconds > timeout_s]
        if silent:
            return f"hang: no heartbeat for {max(quiet[r] for r in silent):.0f} s from {self._describe(silent)}"
        if not self.training or any(s.phase in SLOW_PHASES for s in self.ranks.values()):
            return None
        still = now - max(s.changed for s in self.ranks.values())
        if still <= timeout_s:
            return None
        behind = self._behind()
        others = [r for r in range(self.world) if r not in behind]
        text = f"hang: no progress for {still:.0f} s; behind: {self._describe(behind)}"
        return text + (f"; the others: {self._describe(others)}" if others else "")

    def _behind(self) -> list[int]:
        lowest = min(s.step for s in self.ranks.values())
        at_lowest = [r for r in sorted(self.ranks) if self.ranks[r].step == lowest]
        if len(at_lowest) < self.world:
            return at_lowest
        counts = Counter(self.ranks[r].phase for r in at_lowest)
        rarest = min(counts.values())
        return [r for r in at_lowest if counts[self.ranks[r].phase] == rarest]

    def _describe(self, ranks: list[int]) -> str:
        parts = []
        for r in ranks[:LISTED]:
            s = self.ranks.get(r)
            where = f", node {self.nodes[r][:12]}" if r in self.nodes else ""
            state = f"last phase {s.phase}, step {s.step}" if s else "never reported"
            parts.append(f"rank {r} ({state}{where})")
        more = f" and {len(ranks) - LISTED} more" if len(ranks) > LISTED else ""
        return ", ".join(parts) + more
