"""Recovery from a live replica: who holds a copy of whose state, and handing it over.

When one rank of a job dies, its data-parallel replicas still hold everything it held: the same
parameter shards, the same AdamW states, the same data position. The surviving ranks keep theirs in
memory (`capture`, once their step has failed), a new process takes the dead rank's place, every rank
joins a fresh process group, and each rank that lacks the newest state gets it from a replica over
that group (`exchange`). Training goes on from the step the survivors were at: the interrupted
step is redone, nothing before it.

    plan = plan_recovery(cfg.parallel, {0: 12, 2: 12, 3: 11})   # survivors' clean steps; rank 1 lost
    plan.path, plan.step, plan.transfers                          # "peer", 12, [(0, 1), (2, 3)]
    # on every rank, in the new process group, after building a fresh Trainer(cfg, resume=False):
    exchange(trainer, plan, kept)                                  # kept: capture(old trainer) or None

With in-memory snapshots (`parallel/snapshot.py`), a rank whose share has no live replica is restored
from the copy of its last snapshot its buddy holds, and every other rank from its own snapshot: the
`snapshot` path, which redoes the steps since that snapshot.

Which ranks are replicas: those at the same pipeline stage and tensor-parallel shard whose optimizer
holds the same share. Under ZeRO 0 every data-parallel and context-parallel rank holds all of it;
under ZeRO 1-3 the dp_shard ranks each hold a different 1/N, so only ranks at the same dp_shard
coordinate (across dp_replicate and cp) are replicas; with expert parallelism at ZeRO 0, those at the
same ep coordinate (their experts are the same). Where some rank's share has no replica at the
newest step (ZeRO 1-3 over every dp rank, dp = 1, a half-applied update), `plan_recovery` says
so and the job resumes from its newest checkpoint instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from parallel.config import ParallelConfig
from parallel.mesh import AXES
from parallel.model import persistent_buffers


@dataclass
class Kept:
    """One rank's state, held in memory across a failure (tensors by reference, no copy)."""

    step: int
    data: dict[str, int]
    rng: torch.Tensor
    params: list[torch.Tensor]
    states: list[torch.Tensor]

    def meta(self) -> dict[str, Any]:
        shapes = [(tuple(t.shape), str(t.dtype)) for t in self.params + self.states]
        return {"step": self.step, "data": self.data, "n_params": len(self.params), "shapes": shapes}


@dataclass
class RecoveryPlan:
    path: Literal["peer", "snapshot", "checkpoint"]
    step: int | None  # the step training goes on from (peer and snapshot paths)
    transfers: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) ranks
    reason: str = ""  # why this path, in a sentence

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "step": self.step, "transfers": self.transfers, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecoveryPlan:
        return cls(d["path"], d["step"], [tuple(t) for t in d["transfers"]], d.get("reason", ""))


def coords(rank: int, p: ParallelConfig) -> dict[str, int]:
    """The rank's place on each mesh axis (pp, dp_replicate, dp_shard, cp, tp; tp fastest)."""
    shape = (p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp)
    out, rest = {}, rank
    for axis, n in zip(reversed(AXES), reversed(shape), strict=True):
        out[axis] = rest % n
        rest //= n
    return out


def replica_key(rank: int, p: ParallelConfig) -> tuple[int, ...]:
    """Ranks with the same key hold the same state (see the module docstring)."""
    c = coords(rank, p)
    if p.zero >= 1:
        return c["pp"], c["tp"], c["dp_shard"]
    # ZeRO 0 with expert parallelism: the experts differ along ep (dp_shard's fastest part, mesh.Layout).
    return (c["pp"], c["tp"]) + ((c["dp_shard"] % p.ep,) if p.ep > 1 else ())


def plan_recovery(
    p: ParallelConfig, clean: dict[int, int | None], snapshots: dict[int, dict[str, Any]] | None = None
) -> RecoveryPlan:
    """How a job whose surviving ranks report `clean` ({rank: the step its state is at, or None when
    its update was cut short}) gets every rank's state back; ranks missing from `clean` are new.
    `snapshots`: what each survivor's in-memory snapshots hold (`parallel.snapshot.Snapshots.report`),
    tried when no live replica can serve."""
    world = math.prod((p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp))
    steps = [s for s in clean.values() if s is not None]
    if not steps:
        no_peer = RecoveryPlan("checkpoint", None, reason="no surviving rank holds a whole step's state")
        return _from_snapshots(world, clean, snapshots) or no_peer
    step = max(steps)
    transfers = []
    for rank in range(world):
        if clean.get(rank) == step:
            continue
        sources = [r for r in sorted(clean) if clean[r] == step and replica_key(r, p) == replica_key(rank, p)]
        if not sources:
            why = "was lost" if rank not in clean else f"is at {_at(clean[rank])}"
            share = "" if p.zero == 0 else f"; ZeRO {p.zero} gives each dp_shard rank its own share"
            no_peer = RecoveryPlan(
                "checkpoint", None,
                reason=f"rank {rank}'s state {why} and no surviving replica holds step {step}{share}",
            )  # fmt: skip
            return _from_snapshots(world, clean, snapshots) or no_peer
        # spread the sending over the replicas that can
        transfers.append((sources[len(transfers) % len(sources)], rank))
    lost = sorted(set(range(world)) - set(clean))
    return RecoveryPlan(
        "peer", step, transfers,
        reason=f"rank(s) {', '.join(map(str, lost)) or 'none'} restored from live replicas at step {step}",
    )  # fmt: skip


def _from_snapshots(
    world: int, clean: dict[int, int | None], snapshots: dict[int, dict[str, Any]] | None
) -> RecoveryPlan | None:
    """Every rank back to the survivors' common snapshot step, a lost rank's snapshot from the survivor
    that holds it; None when the snapshots do not cover every rank."""
    if not snapshots or set(snapshots) != set(clean):
        return None
    owns = {s["own"] for s in snapshots.values()}
    if len(owns) != 1 or None in owns:
        return None
    (step,) = owns
    held = {tuple(s["held"]): r for r, s in snapshots.items() if s["held"] is not None}
    transfers = []
    for rank in sorted(set(range(world)) - set(clean)):
        if (rank, step) not in held:
            return None
        transfers.append((held[(rank, step)], rank))
    lost = ", ".join(str(d) for _, d in transfers)
    return RecoveryPlan(
        "snapshot", step, transfers, reason=f"rank(s) {lost} restored from in-memory snapshots of step {step}"
    )


def _at(step: int | None) -> str:
    return "a half-applied update" if step is None else f"step {step}"


def capture(trainer: Any) -> Kept | None:
    """What a rank whose step failed keeps: its state at `trainer.clean_step`, or None if its update
    was cut short (then a replica's is needed)."""
    if trainer is None or trainer.clean_step is None:
        return None
    params, states = trainer.optimizer.local_tensors()
    params = params + _buffers(trainer)  # MoE routing biases ride along with the parameters
    return Kept(trainer.step, trainer.data.state_dict(), torch.get_rng_state(), params, states)


def _buffers(trainer: Any) -> list[torch.Tensor]:
    return [b for part in trainer.parts for _, b in persistent_buffers(part)]


def restore(trainer: Any, kept: Kept) -> None:
    """Put a kept (or received) state into a freshly built trainer of the same layout."""
    params, _ = trainer.optimizer.local_tensors()
    buffers = _buffers(trainer)
    mine = [(tuple(t.shape), str(t.dtype)) for t in params + buffers]
    theirs = kept.meta()["shapes"][: len(kept.params)]
    if mine != theirs:
        raise RuntimeError(f"peer state does not fit this rank: parameter shapes {theirs[:3]}... vs {mine[:3]}...")
    n = len(params)
    trainer.optimizer.load_local(kept.params[:n], kept.states, kept.step)
    with torch.no_grad():
        for b, t in zip(buffers, kept.params[n:], strict=True):
            b.copy_(t)
    trainer.step = kept.step
    trainer.data.load_state_dict(kept.data)
    torch.set_rng_state(kept.rng)


def send(kept: Kept, dst: int) -> None:
    """Hand `kept` to rank `dst` over the default process group: a small header, then the tensors
    packed into one buffer per dtype (one message each instead of one per tensor)."""
    header = [{**kept.meta(), "rng": kept.rng}]
    dist.send_object_list(header, dst=dst)
    for buffer in pack(kept.params + kept.states).values():
        dist.send(buffer, dst=dst)


def receive(src: int, device: torch.device) -> Kept:
    header: list[Any] = [None]
    dist.recv_object_list(header, src=src)
    buffers = buffers_for(header[0], device)
    for buffer in buffers.values():
        dist.recv(buffer, src=src)
    return unpack(header[0], buffers)


def buffers_for(meta: dict[str, Any], device: torch.device) -> dict[torch.dtype, torch.Tensor]:
    """Empty buffers to receive a state described by `meta` (Kept.meta()) into, one per dtype."""
    shapes = _shapes(meta)
    sizes: dict[torch.dtype, int] = {}
    for shape, dtype in shapes:
        sizes[dtype] = sizes.get(dtype, 0) + math.prod(shape)
    return {d: torch.empty(n, dtype=d, device=device) for d, n in sizes.items()}


def unpack(meta: dict[str, Any], buffers: dict[torch.dtype, torch.Tensor]) -> Kept:
    """The state in `buffers` (filled as `_pack` packed it) as a Kept, its tensors views of them."""
    at = dict.fromkeys(buffers, 0)
    tensors = []
    for shape, dtype in _shapes(meta):
        n = math.prod(shape)
        tensors.append(buffers[dtype][at[dtype] : at[dtype] + n].view(shape))
        at[dtype] += n
    k = meta["n_params"]
    return Kept(meta["step"], meta["data"], meta["rng"], tensors[:k], tensors[k:])


def _shapes(meta: dict[str, Any]) -> list[tuple[torch.Size, torch.dtype]]:
    return [(torch.Size(s), getattr(torch, d.removeprefix("torch."))) for s, d in meta["shapes"]]


def pack(tensors: list[torch.Tensor]) -> dict[torch.dtype, torch.Tensor]:
    """The tensors flattened end to end, one buffer per dtype (in order of first appearance)."""
    out: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t.detach().reshape(-1))
    return {d: torch.cat(ts) for d, ts in out.items()}


def exchange(
    trainer: Any, plan: RecoveryPlan, kept: Kept | None, snapshot: Kept | None = None,
    held: Kept | None = None,
) -> None:  # fmt: skip
    """Every rank of the new process group calls this with the same plan, after building a fresh
    trainer: ranks at the plan's step restore their own state (on the `snapshot` path their own
    snapshot), the others receive one (a replica's live state, or the snapshot a buddy `held`); the
    transfers run in the plan's order on every rank, so no two ranks wait on each other."""
    rank = dist.get_rank()
    mine, sending = (snapshot, held) if plan.path == "snapshot" else (kept, kept)
    receives = any(dst == rank for _, dst in plan.transfers)
    if not receives:
        if mine is None or mine.step != plan.step:
            raise RuntimeError(f"rank {rank}: the recovery plan expects it at step {plan.step} and gives it no source")
        restore(trainer, mine)
    for src, dst in plan.transfers:
        if rank == src:
            assert sending is not None
            send(sending, dst)
        elif rank == dst:
            restore(trainer, receive(src, trainer.device))
