"""Admission: priority then age, whole gangs only, a strict queue, refusals for what can never fit."""

from dataclasses import dataclass

from service.scheduler import admit


@dataclass
class Job:
    id: str
    spec: dict


def job(job_id: str, dp: int = 1, tp: int = 1) -> Job:
    return Job(job_id, {"parallel": {"dp": dp, "tp": tp}, "train": {"global_batch": 8 * dp, "micro_batch": 2}})


def cpus(*per_node: int) -> dict[str, dict[str, float]]:
    return {f"n{i}": {"CPU": float(c)} for i, c in enumerate(per_node)}


def test_jobs_start_in_queue_order_while_they_fit() -> None:
    out = admit([job("a", dp=2), job("b", dp=2), job("c")], free=cpus(2, 2), total=cpus(2, 2))
    assert [(d.job_id, d.action) for d in out] == [("a", "start"), ("b", "start")]  # c waits: no room


def test_head_of_queue_waits_whole_and_nothing_overtakes_it() -> None:
    out = admit([job("big", dp=4), job("small")], free=cpus(2, 1), total=cpus(2, 2))
    assert out == []  # big needs 4 slots, 3 are free: it waits, and small does not slip past


def test_tp_group_needs_one_node_with_room() -> None:
    out = admit([job("tp2", tp=2)], free=cpus(1, 1), total=cpus(2, 2))
    assert out == []  # two free slots, but on different nodes
    out = admit([job("tp2", tp=2)], free=cpus(1, 2), total=cpus(2, 2))
    assert [d.action for d in out] == ["start"] and out[0].plan.nodes() == ["n1"]


def test_a_job_that_can_never_fit_is_refused_and_the_queue_moves_on() -> None:
    out = admit([job("huge", tp=4), job("ok")], free=cpus(2, 2), total=cpus(2, 2))
    assert [(d.job_id, d.action) for d in out] == [("huge", "refuse"), ("ok", "start")]
    assert "parallel.tp=4 needs 4 CPU slots on one node; the largest node has 2" in out[0].reason


def test_no_nodes_yet_decides_nothing() -> None:
    assert admit([job("a")], free={}, total={}) == []
