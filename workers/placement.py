"""Where each rank runs: a plan from a job's layout and the cluster's nodes. Pure logic, no Ray.

    from workers.placement import Node, make_plan
    plan = make_plan(cfg.parallel, [Node("a", 4), Node("b", 4)])
    for r in plan.ranks: print(r.rank, r.node, r.bundle, r.pp, r.dp, r.cp, r.tp)

Ranks follow the engine's mesh order `(pp, dp, cp, tp)`, tp varying fastest, so a TP
group is `tp` consecutive ranks and a TP x CP block is `tp * cp` consecutive ranks.
The plan cuts the ranks into blocks that must share a node: expert-parallel groups (ep
consecutive TP x CP blocks) when the cluster can hold every one that way, else TP x CP blocks,
else TP groups (which must always fit); `Plan.note` says when an ep group spans nodes. Blocks go to
nodes round-robin in a fixed node order, each to the next node with room, so pipeline
stages and data-parallel replicas spread across nodes, and the same cluster always
gives the same plan. Within a node, ranks are numbered in rank order: that is the
bundle index (and the local rank).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from parallel.config import ConfigError, ParallelConfig, ResourcesConfig


class PlacementError(ConfigError):
    """The layout cannot be placed on this cluster; the message says why."""


@dataclass(frozen=True)
class Node:
    """A cluster node and how many ranks it can hold (GPUs, or CPUs / cpus_per_rank)."""

    id: str
    slots: int


@dataclass(frozen=True)
class RankPlace:
    rank: int
    node: str
    bundle: int  # index of this rank on its node (its local rank)
    pp: int
    dp: int
    cp: int
    tp: int

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    ranks: list[RankPlace]
    block: int  # ranks that share a node as one unit (tp, tp * cp, or tp * cp * ep)
    spares: tuple[str, ...] = ()  # the node of each warm spare (restart.spares)
    note: str = ""  # what the plan could not keep on one node that the layout would like there

    def nodes(self) -> list[str]:
        """The nodes used, in the order their first rank appears (then nodes with spares only)."""
        return list(dict.fromkeys([*(r.node for r in self.ranks), *self.spares]))

    def on_node(self, node: str) -> list[RankPlace]:
        return [r for r in self.ranks if r.node == node]


Bundle = tuple[str, dict[str, float]]
"""(node id, resources) that one job holds on one node."""


def bundles_of(plan: Plan, res: ResourcesConfig) -> list[Bundle]:
    """What a plan holds: one bundle per node, in plan.nodes() order, CPU (and GPU) for its ranks."""
    gpu = res.accelerator == "gpu"
    out = []
    for node in plan.nodes():
        n = len(plan.on_node(node)) + plan.spares.count(node)
        out.append((node, {"CPU": round(n * res.cpus_per_rank, 4), **({"GPU": n} if gpu else {})}))
    return out


def unit_of(res: ResourcesConfig) -> str:
    """What one slot is, in messages."""
    return "GPUs" if res.accelerator == "gpu" else "CPU slots"


def slots_of(node_resources: dict[str, float], res: ResourcesConfig) -> int:
    """How many ranks a node's resources hold: its GPUs (with cpus_per_rank CPUs each), or its
    CPUs divided by cpus_per_rank on a CPU cluster."""
    cpu = math.floor(node_resources.get("CPU", 0) / res.cpus_per_rank + 1e-9)  # 2 / 0.1 is 19.999...
    return min(int(node_resources.get("GPU", 0)), cpu) if res.accelerator == "gpu" else cpu


def nodes_for(resources: dict[str, dict[str, float]], res: ResourcesConfig) -> list[Node]:
    """Node id -> resources (free or total) as planner nodes for a job with these resources."""
    return [Node(node, slots_of(have, res)) for node, have in resources.items()]


def coords(rank: int, p: ParallelConfig) -> tuple[int, int, int, int]:
    """(pp, dp, cp, tp) of a global rank in the engine's mesh order."""
    tp = rank % p.tp
    cp = rank // p.tp % p.cp
    dp = rank // (p.tp * p.cp) % p.dp
    pp = rank // (p.tp * p.cp * p.dp)
    return pp, dp, cp, tp


def make_plan(p: ParallelConfig, nodes: list[Node], unit: str = "slots", spares: int = 0) -> Plan:
    """Assign every rank to a node, then `spares` warm spares; PlacementError (with the reason) when
    it cannot fit.

    `unit` names what a slot is in messages ("GPUs" or "CPU slots")."""
    plan = _ranks_plan(p, nodes, unit)
    return _with_spares(plan, nodes, spares, unit) if spares else plan


def _with_spares(plan: Plan, nodes: list[Node], n: int, unit: str) -> Plan:
    """Spares go round-robin over the nodes with room left, the plan's own nodes first (a spare that
    replaces a rank on its node keeps that rank's TP group together)."""
    used = {node: len(plan.on_node(node)) for node in plan.nodes()}
    room = {x.id: x.slots - used.get(x.id, 0) for x in nodes}
    order = [*plan.nodes(), *sorted(x.id for x in nodes if x.id not in used)]
    spares: list[str] = []
    while len(spares) < n:
        placed = False
        for node in order:
            if len(spares) < n and room.get(node, 0) > 0:
                room[node] -= 1
                spares.append(node)
                placed = True
        if not placed:
            raise PlacementError(
                f"restart.spares={n}: the cluster has room for {len(spares)} spare(s) beside the job's "
                f"{len(plan.ranks)} ranks ({unit} free per node after them: "
                f"{', '.join(f'{k}={max(v, 0)}' for k, v in room.items())})"
            )
    return Plan(plan.ranks, plan.block, tuple(spares), plan.note)


def _ranks_plan(p: ParallelConfig, nodes: list[Node], unit: str) -> Plan:
    usable = sorted((n for n in nodes if n.slots > 0), key=lambda n: n.id)
    world = p.world_size
    if not usable:
        raise PlacementError(f"the cluster has no node with free {unit}; the job needs {world}")
    largest = max(n.slots for n in usable)
    total = sum(n.slots for n in usable)
    if p.tp > largest:
        raise PlacementError(f"parallel.tp={p.tp} needs {p.tp} {unit} on one node; the largest node has {largest}")
    if world > total:
        raise PlacementError(f"the job needs {world} {unit} (dp*tp*pp*cp) but the cluster has {total}")
    # Keep each expert-parallel group (ep consecutive dp ranks, each a TP x CP block) on one node if the
    # cluster allows, else each TP x CP block, else only each TP group.
    wanted = [p.tp * p.cp * p.ep, p.tp * p.cp, p.tp]
    blocks = [b for i, b in enumerate(wanted) if b <= largest and b not in wanted[i + 1 :]] or [p.tp]
    for block in blocks:
        try:
            plan = _assign(p, usable, block, unit)
        except PlacementError:
            if block == blocks[-1]:
                raise
            continue
        if block < wanted[0] and p.ep > 1:
            full = "the nodes' free room does not allow it"
            where = f"the largest node holds {largest}" if wanted[0] > largest else full
            note = (f"each expert-parallel group (parallel.ep={p.ep}: {wanted[0]} consecutive ranks) spans nodes "
                    f"({where}): its all-to-all goes over the network")  # fmt: skip
            return Plan(plan.ranks, plan.block, plan.spares, note)
        return plan
    raise AssertionError("unreachable")


def _assign(p: ParallelConfig, usable: list[Node], block: int, unit: str) -> Plan:
    """Blocks of `block` consecutive ranks, round-robin to the next node with room."""
    free = {n.id: n.slots for n in usable}
    order = [n.id for n in usable]
    used: dict[str, int] = dict.fromkeys(order, 0)
    ranks: list[RankPlace] = []
    cursor = 0
    for start in range(0, p.world_size, block):
        for i in range(len(order)):
            node = order[(cursor + i) % len(order)]
            if free[node] >= block:
                break
        else:
            raise PlacementError(
                f"no node has {block} free {unit} for ranks {start}-{start + block - 1} (each TP"
                f"{' x CP' if block > p.tp else ''} group of {block} ranks must share a node); "
                f"free per node: {', '.join(f'{k}={v}' for k, v in free.items())}"
            )
        cursor = (order.index(node) + 1) % len(order)
        free[node] -= block
        for rank in range(start, start + block):
            ranks.append(RankPlace(rank, node, used[node], *coords(rank, p)))
            used[node] += 1
    return Plan(ranks, block)


def buddy_offset(plan: Plan) -> int:
    """The smallest k such that rank r + k (mod world) is on another node than rank r, for every r:
    where each rank's in-memory snapshot keeps its copy (`parallel.snapshot`); 1 on one node."""
    nodes = [r.node for r in sorted(plan.ranks, key=lambda r: r.rank)]
    world = len(nodes)
    for k in range(1, world):
        if all(nodes[r] != nodes[(r + k) % world] for r in range(world)):
            return k
    return 1


def explain(plan: Plan) -> str:
    """The plan as a table a person can read."""
    lines = [f"{'rank':>4}  {'node':<20} {'bundle':>6}  {'pp':>2} {'dp':>2} {'cp':>2} {'tp':>2}"]
    for r in plan.ranks:
        lines.append(f"{r.rank:>4}  {r.node[:20]:<20} {r.bundle:>6}  {r.pp:>2} {r.dp:>2} {r.cp:>2} {r.tp:>2}")
    return "\n".join(lines + ([f"note: {plan.note}"] if plan.note else []))
