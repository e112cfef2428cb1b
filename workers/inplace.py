"""In-place recovery of a job whose rank process died, and its warm spares. The driver's side; the
ranks' side is `workers.worker.RankRunner` and the plan is `parallel.peer.plan_recovery`.

    record = recover(group, died=[1])   # inside WorkerGroup.poll; RecoveryFailed -> the job restarts

1. A replacement for each dead rank starts at once: a warm spare (on the dead rank's node if one
   waits there) takes the rank, or a new actor starts in the dead rank's bundle, whose resources the
   dead process gave back.
2. Meanwhile every survivor's step fails on a collective with the dead rank (or with a survivor that
   already left), and each reports `lost` with the step its in-memory state is at.
3. The plan: every rank's state from a live replica at the survivors' newest step (`peer`); where some
   rank's share has no replica, every rank back to the in-memory snapshots (`snapshot`, with
   `checkpoint.memory_every`), else to the newest checkpoint (`checkpoint`).
4. A new rendezvous on rank 0's process (a survivor's, or its replacement's), then `rejoin` to the
   survivors and `run` to the replacements: the same processes go on in a new process-group generation.

Anything that goes wrong here (a survivor that never leaves its step, another process dying, an
actor that does not start) raises RecoveryFailed, and the supervisor restarts the whole job from
its checkpoint as it would without in-place recovery. A recovery's records say which path it took.
Spares used are replaced in the background, in the bundle the dead rank left.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.peer import plan_recovery
from workers.health import Health

LOST_TIMEOUT_S = 60.0  # for every survivor to leave its failed step
LAUNCH_TIMEOUT_S = 60.0  # for a replacement to answer


class RecoveryFailed(Exception):
    """In-place recovery did not work out; the message says where."""


def new_actor(group: Any, name: str, rank: int, node: str) -> Any:
    """An actor of the group's runner class in the bundle of `node` (a rank, or rank -1 for a spare)."""
    res = group.cfg.resources
    gpu = res.accelerator == "gpu"
    index = [n for n, _ in group.bundles].index(node)  # the placement group's bundles keep their order
    strategy = PlacementGroupSchedulingStrategy(group.pg, placement_group_bundle_index=index)
    local = 0 if gpu or rank < 0 else group.plan.ranks[rank].bundle
    group.names.add(name)
    options = {"name": name, "namespace": group.namespace, "num_cpus": res.cpus_per_rank, "max_concurrency": 2,
               "num_gpus": 1 if gpu else 0, "scheduling_strategy": strategy}  # fmt: skip
    # max_concurrency=2: run() in one thread; where, request_stop, rejoin and assume answered meanwhile
    world = group.cfg.parallel.world_size
    return ray.remote(group.runner_cls).options(**options).remote(rank, world, local, group.queue.put_nowait)


def start_spare(group: Any, node: str) -> None:
    """One warm spare on `node`: its process imports torch and builds the model on the meta device."""
    group.spare_seq += 1
    actor = new_actor(group, f"fourfold:{group.job_id}:spare-{group.spare_seq}", -1, node)
    group.spares.append((actor, node, actor.prepare.remote(group.launch_args[0])))


def _replacement(group: Any, rank: int) -> tuple[Any, bool]:
    """(the actor taking `rank`'s place, whether it was a warm spare)."""
    node = group.plan.ranks[rank].node
    ready = [s for s in group.spares if s[1] == node] or group.spares
    if ready:
        spare = ready[0]
        group.spares.remove(spare)
        actor, spare_node, _ = spare
        if spare_node != node:  # the rank moves to the spare's node and bundle
            place = dataclasses.replace(group.plan.ranks[rank], node=spare_node)
            ranks = [place if r.rank == rank else r for r in group.plan.ranks]
            group.plan = dataclasses.replace(group.plan, ranks=ranks)
        local = 0 if group.cfg.resources.accelerator == "gpu" else group.plan.ranks[rank].bundle
        # waited for: a threaded actor runs calls in any order, and run() must see the rank
        ray.get(actor.assume.remote(rank, local), timeout=LAUNCH_TIMEOUT_S)
        return actor, True
    group.generation += 1
    return new_actor(group, f"fourfold:{group.job_id}:{rank}-{group.generation}", rank, node), False


def recover(group: Any, died: list[int]) -> dict[str, Any]:
    """Bring the job back in place after the processes of `died` ranks ended; returns the record of
    the recovery (see the module docstring). Raises RecoveryFailed."""
    marks = {"detected": time.time()}
    cause = group._cause(died, [])
    world = group.cfg.parallel.world_size
    survivors = [r for r in range(world) if r not in died]
    old_nodes = {r: group.plan.ranks[r].node for r in died}
    try:
        spares_used = 0
        for r in died:
            group.actors[r], spare = _replacement(group, r)
            spares_used += spare
        _await_lost(group, survivors)
        group.errors = []  # the survivors' "connection closed": effects of this failure, not causes of a next
        marks["torn_down"] = marks["restart"] = marks["reserved"] = time.time()
        snapshots = {r: group.lost[r]["snapshots"] for r in survivors if group.lost[r].get("snapshots")}
        clean = {r: group.lost[r]["clean_step"] for r in survivors}
        plan = plan_recovery(group.cfg.parallel, clean, snapshots or None)
        for r in died:
            ray.get(group.actors[r].where.remote(), timeout=LAUNCH_TIMEOUT_S)
        master = ray.get(group.actors[0].where.remote(), timeout=LAUNCH_TIMEOUT_S)["host"]
        timeout = group.cfg.parallel.timeout_s
        port = ray.get(group.actors[0].open_rendezvous.remote(timeout), timeout=LAUNCH_TIMEOUT_S)
    except RecoveryFailed:
        raise
    except Exception as err:  # Ray's errors: an actor that did not start, a node going
        raise RecoveryFailed(f"{type(err).__name__}: {err}") from err
    marks["launched"] = time.time()
    instructions = {"master": master, "port": port, **plan.to_dict()}
    for r in survivors:
        group.actors[r].rejoin.remote(instructions)
    spec, env, storage = group.launch_args
    for r in died:
        group.futures[r] = group.actors[r].run.remote(spec, master, port, env, storage, instructions)
    group.lost, group.lost_since, group.marks = {}, None, {}
    group.health = Health(world, time.monotonic(), nodes={p.rank: p.node for p in group.plan.ranks})
    group.recovering = True
    for r in died[:spares_used]:  # each dead process gave its resources back to its bundle: a spare there
        start_spare(group, old_nodes[r])
    return {
        "ranks": died, "cause": cause, "path": plan.path, "step": plan.step, "reason": plan.reason,
        "spares_used": spares_used, "marks": marks,
    }  # fmt: skip


def _await_lost(group: Any, survivors: list[int]) -> None:
    deadline = time.monotonic() + LOST_TIMEOUT_S
    while missing := [r for r in survivors if r not in group.lost]:
        if time.monotonic() > deadline:
            names = ", ".join(map(str, missing))
            raise RecoveryFailed(f"rank(s) {names} did not leave their failed step within {LOST_TIMEOUT_S:.0f} s")
        ended, _ = ray.wait([group.futures[r] for r in survivors], timeout=0.05)
        if ended:
            gone = [r for r in survivors if group.futures[r] in ended]
            raise RecoveryFailed(f"rank(s) {', '.join(map(str, gone))} ended while the job recovered")
        group._drain()
