"""Restart policy: backoff, elastic dp, the resume spec."""

import pytest

from parallel.config import RestartConfig, build_config
from service.recovery import backoff_s, fit, resume_spec


def cpus(*per_node: int) -> dict[str, dict[str, float]]:
    return {f"n{i}": {"CPU": float(c)} for i, c in enumerate(per_node)}


def test_backoff_doubles_and_is_capped() -> None:
    r = RestartConfig(backoff_s=10)
    assert [backoff_s(r, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert backoff_s(r, 10) == 300
    assert backoff_s(RestartConfig(backoff_s=0), 5) == 0


def test_fit_keeps_dp_when_there_is_room() -> None:
    cfg = build_config({"parallel": {"dp": 4, "dp_min": 1}, "train": {"global_batch": 8, "micro_batch": 2}})
    got, plan = fit(cfg, cpus(2, 2))
    assert got.parallel.dp == 4 and len(plan.ranks) == 4


def test_fit_shrinks_dp_to_the_largest_that_fits_and_divides_the_batch() -> None:
    cfg = build_config({"parallel": {"dp": 4, "dp_min": 1, "tp": 2}, "train": {"global_batch": 8, "micro_batch": 2}})
    got, plan = fit(cfg, cpus(2, 2, 2))  # 3 TP groups fit, but 8 sequences do not split over dp=3
    assert (got.parallel.dp, got.parallel.tp, got.train.global_batch, got.grad_accum) == (2, 2, 8, 2)
    assert len(plan.ranks) == 4


def test_fit_shrinks_expert_parallelism_with_dp() -> None:
    spec = {"model": {"preset": "tiny-moe"}, "parallel": {"dp": 4, "ep": 4, "dp_min": 1},
            "train": {"global_batch": 8, "micro_batch": 2}}  # fmt: skip
    got, plan = fit(build_config(spec), cpus(3))  # dp=3 cannot split 8 sequences; dp=2 takes ep=2
    assert (got.parallel.dp, got.parallel.ep) == (2, 2) and len(plan.ranks) == 2
    got, _ = fit(build_config(spec), cpus(1))
    assert (got.parallel.dp, got.parallel.ep) == (1, 1)


def test_fit_respects_dp_min_and_non_elastic_jobs() -> None:
    elastic = build_config({"parallel": {"dp": 4, "dp_min": 2}, "train": {"global_batch": 8, "micro_batch": 2}})
    assert fit(elastic, cpus(1)) is None
    rigid = build_config({"parallel": {"dp": 2}, "train": {"global_batch": 8, "micro_batch": 2}})
    assert fit(rigid, cpus(1)) is None


def test_resume_spec_resumes_from_the_newest_checkpoint_when_there_is_a_dir() -> None:
    with_dir = build_config({"checkpoint": {"dir": "/tmp/x"}})
    assert resume_spec(with_dir)["checkpoint"]["resume"] == "auto"
    assert resume_spec(build_config({}))["checkpoint"]["resume"] is None


def test_phases_of_a_recovery_follow_the_moments_in_order() -> None:
    from service.recovery import PHASES, phases_of, rank_marks

    ranks = rank_marks({0: {"imported": 14.0, "rendezvous": 14.5, "state": 16.0},
                        1: {"imported": 14.2, "rendezvous": 14.4, "state": 15.0}})  # fmt: skip
    assert ranks == {"imported": 14.2, "rendezvous": 14.5, "state": 16.0}  # the last rank to get there
    marks = {"detected": 10.0, "torn_down": 10.5, "restart": 10.5, "reserved": 11.0, "launched": 12.0,
             **ranks, "first_step": 17.0}  # fmt: skip
    split = phases_of(marks)
    assert list(split) == list(PHASES) and sum(split.values()) == pytest.approx(7.0)
    assert split == {"teardown": 0.5, "backoff": 0.0, "reservation": 0.5, "actors": 1.0, "imports": 2.2,
                     "rendezvous": 0.3, "state": 1.5, "first_step": 1.0}  # fmt: skip
    # a moment missing (no rank reported) or earlier than the one before (another node's clock) adds nothing
    skewed = phases_of({**marks, "imported": 11.5, "rendezvous": 14.5} | {"state": 0.0})
    assert skewed["imports"] == 0.0 and skewed["state"] == 0.0 and sum(skewed.values()) == pytest.approx(7.0)


def _parallel(**kw: int):  # noqa: ANN202
    from parallel.config import ParallelConfig

    return ParallelConfig(**kw)


def test_peer_plan_takes_the_newest_step_and_feeds_every_rank_behind_it() -> None:
    from parallel.peer import plan_recovery

    # dp=2 x tp=2: ranks 0 and 2 hold tp shard 0, ranks 1 and 3 shard 1. Rank 1 lost, rank 2 cut short
    # in its update: each gets its shard's other replica's state at the newest step.
    plan = plan_recovery(_parallel(dp=2, tp=2), {0: 7, 2: None, 3: 7})
    assert (plan.path, plan.step, plan.transfers) == ("peer", 7, [(3, 1), (0, 2)])
    # rank 3, rank 1's only replica, cut short too: nobody holds shard 1 at step 7
    plan = plan_recovery(_parallel(dp=2, tp=2), {0: 7, 2: 7, 3: None})
    assert plan.path == "checkpoint" and plan.reason.startswith("rank 1's state was lost"), plan.reason


def test_peer_plan_under_expert_parallelism_takes_a_rank_with_the_same_experts() -> None:
    from parallel.peer import plan_recovery

    # dp=4, ep=2, ZeRO 0: ranks 0 and 2 hold experts 0-1, ranks 1 and 3 experts 2-3.
    plan = plan_recovery(_parallel(dp=4, ep=2), {0: 3, 2: 3, 3: 3})
    assert (plan.path, plan.transfers) == ("peer", [(3, 1)])
    assert plan_recovery(_parallel(dp=4, ep=2), {0: 3, 2: 3, 1: 3}).transfers == [(1, 3)]
    assert plan_recovery(_parallel(dp=4), {0: 3, 2: 3, 3: 3}).transfers == [(0, 1)]  # dense: any replica


def test_plan_prefers_snapshots_to_the_checkpoint_and_says_when_they_do_not_cover() -> None:
    from parallel.peer import plan_recovery

    p = _parallel(dp=2, zero=1)
    covered = {0: {"own": 4, "held": [1, 4]}}
    plan = plan_recovery(p, {0: 5}, covered)
    assert (plan.path, plan.step, plan.transfers) == ("snapshot", 4, [(0, 1)])
    assert plan_recovery(p, {0: 5}, {0: {"own": 4, "held": [1, 2]}}).path == "checkpoint"  # copy too old
    assert plan_recovery(p, {0: 5}, {0: {"own": None, "held": None}}).path == "checkpoint"
    assert plan_recovery(p, {0: 5}).path == "checkpoint"


def test_start_phases_from_submission_to_the_first_step() -> None:
    from service.recovery import start_phases

    marks = {"reserved": 101.5, "launched": 101.75, "imported": 104.0, "rendezvous": 104.25, "state": 105.0,
             "first_step": 106.0}  # fmt: skip
    split = start_phases(100.0, marks)
    assert split == {"queued": 1.5, "actors": 0.25, "imports": 2.25, "rendezvous": 0.25, "state": 0.75,
                     "first_step": 1.0}  # fmt: skip
    assert sum(split.values()) == 6.0
