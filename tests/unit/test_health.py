"""Hang detection from heartbeats (workers.health): silence, no progress, and who is named."""

from workers.health import Health


def _beats(h: Health, now: float, states: dict[int, tuple[int, str]]) -> None:
    for rank, (step, phase) in states.items():
        h.record(rank, step, phase, now)


def test_a_silent_rank_is_named_after_the_timeout() -> None:
    h = Health(2, started=0.0, nodes={0: "node-a", 1: "node-b"})
    _beats(h, 1.0, {0: (0, "starting"), 1: (0, "starting")})
    _beats(h, 5.0, {0: (1, "idle"), 1: (1, "idle")})
    for t in (6.0, 8.0, 10.0, 12.0):
        h.record(0, 1, "idle", t)  # rank 1 goes quiet after t=5
    assert h.problem(14.0, timeout_s=10) is None
    assert (
        h.problem(16.0, timeout_s=10)
        == "hang: no heartbeat for 11 s from rank 1 (last phase idle, step 1, node node-b)"
    )


def test_a_rank_that_never_reported_counts_from_the_start() -> None:
    h = Health(2, started=0.0)
    h.record(0, 0, "starting", 5.0)
    assert h.problem(9.0, timeout_s=10) is None
    assert h.problem(11.0, timeout_s=10) == "hang: no heartbeat for 11 s from rank 1 (never reported)"


def test_no_progress_names_the_rank_behind() -> None:
    h = Health(4, started=0.0)
    _beats(h, 1.0, {r: (3, "idle") for r in range(4)})
    stuck = {0: (3, "forward-backward"), 1: (3, "data"), 2: (3, "forward-backward"), 3: (3, "forward-backward")}
    for t in range(2, 30):  # every rank keeps beating, nothing moves after t=2
        _beats(h, float(t), stuck)
    assert h.problem(11.0, timeout_s=10) is None
    assert h.problem(13.0, timeout_s=10) == (
        "hang: no progress for 11 s; behind: rank 1 (last phase data, step 3); the others: rank 0 (last phase "
        "forward-backward, step 3), rank 2 (last phase forward-backward, step 3), rank 3 (last phase forward-backward, "
        "step 3)"
    )


def test_a_lower_step_is_behind_and_progress_resets_the_clock() -> None:
    h = Health(3, started=0.0)
    _beats(h, 1.0, {0: (5, "forward-backward"), 1: (4, "optimizer"), 2: (5, "forward-backward")})
    _beats(h, 9.0, {0: (5, "forward-backward"), 1: (4, "optimizer"), 2: (5, "loss")})  # rank 2 moved at t=9
    for t in (12.0, 15.0, 18.0):
        _beats(h, t, {0: (5, "forward-backward"), 1: (4, "optimizer"), 2: (5, "loss")})
    assert h.problem(18.0, timeout_s=10) is None  # 9 s since the last change
    assert h.problem(19.5, timeout_s=10).startswith("hang: no progress for 10 s; behind: rank 1 (last phase optimizer")


def test_slow_phases_are_judged_by_silence_only() -> None:
    """Start-up, checkpoints and stopping may take long; their collectives carry their own timeout."""
    for phase in ("starting", "checkpoint", "stopping"):
        h = Health(2, started=0.0)
        for t in range(0, 100, 2):
            _beats(h, float(t), {0: (2, phase), 1: (2, "idle")})
        assert h.problem(99.0, timeout_s=10) is None, phase


def test_training_means_every_rank_is_past_start_up() -> None:
    h = Health(2, started=0.0)
    assert not h.training
    _beats(h, 1.0, {0: (0, "data"), 1: (0, "starting")})
    assert not h.training
    h.record(1, 0, "forward-backward", 2.0)
    assert h.training
