"""Placement plans: every rank placed once, TP groups on one node, spread otherwise, clear refusals."""

import itertools
import random

import pytest
import torch

from parallel.config import ParallelConfig
from workers.placement import Node, PlacementError, coords, explain, make_plan


def _layout(**kw: int) -> ParallelConfig:
    return ParallelConfig(**kw)


LAYOUTS = [
    dict(dp=1),
    dict(dp=4),
    dict(tp=2),
    dict(tp=4),
    dict(dp=2, tp=2),
    dict(pp=2, tp=2),
    dict(pp=2, dp=2),
    dict(cp=2, tp=2),
    dict(dp=2, cp=2, tp=2),
    dict(pp=2, dp=2, tp=2),
    dict(pp=4, tp=2),
    dict(dp=4, tp=2, zero=3, dp_replicate=2),
    dict(dp=4, ep=2),
    dict(dp=4, ep=4, tp=2),
    dict(pp=2, dp=4, ep=2),
]
CLUSTERS = {
    "1x8": [8],
    "2x4": [4, 4],
    "3x2": [2, 2, 2],
    "4x2": [2, 2, 2, 2],
    "8x1": [1] * 8,
    "4+2+2": [4, 2, 2],
    "8x4": [4] * 8,
}


def _nodes(sizes: list[int]) -> list[Node]:
    return [Node(f"node-{i}", n) for i, n in enumerate(sizes)]


def _fits(p: ParallelConfig, sizes: list[int]) -> bool:
    return p.tp <= max(sizes) and p.world_size <= sum((n // p.tp) * p.tp for n in sizes)


@pytest.mark.parametrize(("layout", "cluster"), list(itertools.product(LAYOUTS, CLUSTERS)), ids=lambda v: str(v))
def test_plan_invariants(layout: dict, cluster: str) -> None:
    p, sizes = _layout(**layout), CLUSTERS[cluster]
    if not _fits(p, sizes):
        with pytest.raises(PlacementError):
            make_plan(p, _nodes(sizes))
        return
    plan = make_plan(p, _nodes(sizes))
    assert [r.rank for r in plan.ranks] == list(range(p.world_size))
    capacity = {n.id: n.slots for n in _nodes(sizes)}
    for node in plan.nodes():
        on = plan.on_node(node)
        assert len(on) <= capacity[node]
        assert [r.bundle for r in on] == list(range(len(on)))  # local ranks 0..n-1 in rank order
    for start in range(0, p.world_size, p.tp):  # a TP group is tp consecutive ranks: one node
        assert len({r.node for r in plan.ranks[start : start + p.tp]}) == 1
    if plan.block == p.tp * p.cp * p.ep:  # ep groups (ep consecutive TP x CP blocks) share a node if they can
        for start in range(0, p.world_size, plan.block):
            assert len({r.node for r in plan.ranks[start : start + plan.block]}) == 1
    if p.ep > 1 and p.tp * p.ep <= max(sizes) and plan.block < p.tp * p.ep:  # the cluster could not: said
        assert "expert-parallel group" in plan.note
    if plan.block == p.tp * p.cp:  # TP x CP blocks share a node when the cluster allows
        for start in range(0, p.world_size, p.tp * p.cp):
            assert len({r.node for r in plan.ranks[start : start + p.tp * p.cp]}) == 1


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_coordinates_follow_the_engine_mesh(layout: dict) -> None:
    p = _layout(**layout)
    grid = torch.arange(p.world_size).view(p.pp, p.dp, p.cp, p.tp)  # the engine's order, tp fastest
    for pp, dp, cp, tp in itertools.product(range(p.pp), range(p.dp), range(p.cp), range(p.tp)):
        assert coords(int(grid[pp, dp, cp, tp]), p) == (pp, dp, cp, tp)


def test_pipeline_stages_and_replicas_spread_across_nodes() -> None:
    plan = make_plan(_layout(pp=2, tp=2), _nodes([2, 2, 2]))
    assert {r.node for r in plan.ranks if r.pp == 0}.isdisjoint({r.node for r in plan.ranks if r.pp == 1})
    plan = make_plan(_layout(dp=4), _nodes([4, 4, 4, 4]))
    assert len(plan.nodes()) == 4  # one replica per node rather than four on the first
    plan = make_plan(_layout(pp=2, dp=2, tp=2), _nodes([4, 4]))
    assert plan.ranks[0].node != plan.ranks[2].node  # two dp replicas of stage 0 on different nodes


def test_tp_cp_block_falls_back_to_tp_group_when_it_cannot_fit() -> None:
    plan = make_plan(_layout(cp=2, tp=2), _nodes([2, 2]))
    assert plan.block == 2 and plan.ranks[0].node != plan.ranks[2].node
    plan = make_plan(_layout(cp=2, tp=2), _nodes([4, 4]))
    assert plan.block == 4 and len(plan.nodes()) == 1
    plan = make_plan(_layout(dp=2, cp=2, tp=2), _nodes([4, 2, 2]))  # only one node takes a block of 4
    assert plan.block == 2


def test_expert_parallel_groups_share_a_node_where_one_holds_them_and_the_plan_says_where_not() -> None:
    plan = make_plan(_layout(dp=4, ep=2), _nodes([2, 2]))  # ranks 0-1 and 2-3 are the ep groups
    assert plan.block == 2 and plan.ranks[0].node == plan.ranks[1].node != plan.ranks[2].node
    assert plan.note == ""
    plan = make_plan(_layout(dp=4, ep=4), _nodes([2, 2]))
    assert plan.block == 1 and "parallel.ep=4: 4 consecutive ranks) spans nodes (the largest node holds 2)" in plan.note
    assert plan.note in explain(plan)
    plan = make_plan(_layout(dp=4, ep=2, tp=2), _nodes([4, 2, 2]))  # one ep group fits on node-0, not two
    assert plan.block == 2 and "the nodes' free room does not allow it" in plan.note


def test_plan_is_stable_across_calls_and_node_order() -> None:
    nodes = _nodes([4, 2, 2, 4])
    first = make_plan(_layout(pp=2, dp=2, tp=2), nodes)
    for seed in range(5):
        shuffled = nodes[:]
        random.Random(seed).shuffle(shuffled)
        assert make_plan(_layout(pp=2, dp=2, tp=2), shuffled) == first


@pytest.mark.parametrize(
    ("layout", "sizes", "message"),
    [
        (dict(tp=8), [4, 4], "parallel.tp=8 needs 8 GPUs on one node; the largest node has 4"),
        (dict(dp=4, tp=2), [2, 2, 2], "the job needs 8 GPUs (dp*tp*pp*cp) but the cluster has 6"),
        (
            dict(dp=2, tp=2),
            [3, 1],
            "no node has 2 free GPUs for ranks 2-3 (each TP group of 2 ranks must share a node); free per node: node-0=1, node-1=1",
        ),
        (dict(dp=2), [0, 0], "the cluster has no node with free GPUs; the job needs 2"),
    ],
    ids=["tp-too-wide", "too-few-slots", "fragmented", "empty"],
)
def test_refusals_say_why(layout: dict, sizes: list[int], message: str) -> None:
    with pytest.raises(PlacementError) as err:
        make_plan(_layout(**layout), _nodes(sizes), unit="GPUs")
    assert str(err.value) == message


def test_explain_lists_every_rank() -> None:
    text = explain(make_plan(_layout(dp=2, tp=2), _nodes([4])))
    assert text.splitlines()[0].split() == ["rank", "node", "bundle", "pp", "dp", "cp", "tp"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    ("have", "accelerator", "cpus_per_rank", "slots"),
    [
        ({"CPU": 8.0}, "cpu", 1, 8),
        ({"CPU": 8.0}, "cpu", 3, 2),
        ({"CPU": 16.0, "GPU": 8.0}, "gpu", 1, 8),
        ({"CPU": 16.0, "GPU": 8.0}, "gpu", 4, 4),  # CPUs bind before GPUs do
        ({"CPU": 8.0}, "gpu", 1, 0),  # no GPU, no GPU slot
        ({}, "cpu", 1, 0),
    ],
)
def test_slots_from_node_resources(have: dict, accelerator: str, cpus_per_rank: int, slots: int) -> None:
    from parallel.config import ResourcesConfig
    from workers.placement import nodes_for, slots_of

    res = ResourcesConfig(accelerator=accelerator, cpus_per_rank=cpus_per_rank)
    assert slots_of(have, res) == slots
    assert nodes_for({"n1": have}, res) == [Node("n1", slots)]


def test_fractional_cpus_per_rank_give_several_slots_per_cpu() -> None:
    from parallel.config import ResourcesConfig
    from workers.placement import slots_of

    assert slots_of({"CPU": 2.0}, ResourcesConfig(cpus_per_rank=0.125)) == 16
    assert slots_of({"CPU": 2.0}, ResourcesConfig(cpus_per_rank=0.1)) == 20  # not 19 from float division


def test_spares_go_on_the_jobs_nodes_first_and_count_in_the_bundles() -> None:
    from parallel.config import ResourcesConfig
    from workers.placement import bundles_of

    plan = make_plan(_layout(dp=2, tp=2), _nodes([3, 3, 2]), spares=3)
    assert {r.node for r in plan.ranks} == {"node-0", "node-1"}
    assert plan.spares == ("node-0", "node-1", "node-2")  # room left on the job's nodes first, then others
    held = dict(bundles_of(plan, ResourcesConfig(cpus_per_rank=1)))
    assert held == {"node-0": {"CPU": 3}, "node-1": {"CPU": 3}, "node-2": {"CPU": 1}}


def test_no_room_for_the_spares_is_refused_with_the_field() -> None:
    with pytest.raises(PlacementError, match=r"restart.spares=2: the cluster has room for 1 spare\(s\)"):
        make_plan(_layout(dp=2), _nodes([2, 1]), unit="CPU slots", spares=2)
