"""Tests of the job store (`service.store.Store`) on SQLite and on PostgreSQL.

    .venv/bin/python -m pytest -q tests/service -p no:randomly

Every test runs twice through the `store` fixture of conftest.py: on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from service.db import make_engine, normalise_url
from service.models import Base
from service.states import TERMINAL, TRANSITIONS, InvalidTransition, JobState
from service.store import Store

S = JobState


def submit(store: Store, owner: str = "ada", name: str = "job", **kw) -> str:
    job, created = store.create_job({"name": name, "train": {"steps": 3}}, owner, name, **kw)
    assert created
    return job.id


def walk(store: Store, job_id: str, *states: JobState) -> None:
    for state in states:
        store.transition(job_id, state, f"to {state}")


def test_submit_get_list(store: Store) -> None:
    ids = [submit(store, name=f"j{i}") for i in range(5)]
    other = submit(store, owner="bob")
    job = store.get_job(ids[0])
    assert job is not None and job.state is S.QUEUED and job.owner == "ada" and job.name == "j0"
    assert job.spec == {"name": "j0", "train": {"steps": 3}}
    assert job.attempts == 0 and not job.cancel_requested and job.started_at is None
    assert store.get_job("0" * 32) is None

    page, total = store.list_jobs(owner="ada", limit=2)
    assert total == 5 and [j.id for j in page] == ids[::-1][:2]  # newest first
    page, total = store.list_jobs(owner="ada", limit=2, offset=4)
    assert total == 5 and [j.id for j in page] == [ids[0]]
    _, total = store.list_jobs()
    assert total == 6

    walk(store, ids[1], S.STARTING, S.RUNNING)
    page, total = store.list_jobs(state=S.RUNNING)
    assert total == 1 and page[0].id == ids[1]
    page, total = store.list_jobs(owner="bob", state=S.QUEUED)
    assert total == 1 and page[0].id == other


def test_owner_isolation(store: Store) -> None:
    job_id = submit(store, owner="ada")
    assert store.get_job(job_id, owner="ada") is not None
    assert store.get_job(job_id, owner="bob") is None
    assert store.list_jobs(owner="bob") == ([], 0)


def test_idempotency(store: Store) -> None:
    a, created_a = store.create_job({"x": 1}, "ada", "j", idempotency_key="k1")
    b, created_b = store.create_job({"x": 2}, "ada", "j", idempotency_key="k1")
    assert (created_a, created_b) == (True, False) and a.id == b.id and b.spec == {"x": 1}
    c, created_c = store.create_job({"x": 1}, "bob", "j", idempotency_key="k1")
    assert created_c and c.id != a.id
    assert store.list_jobs()[1] == 2


def test_idempotency_concurrent(store: Store) -> None:
    barrier = threading.Barrier(8)

    def submit_same(_: int) -> tuple[str, bool]:
        barrier.wait()
        job, created = store.create_job({"x": 1}, "ada", "race", idempotency_key="same")
        return job.id, created

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit_same, range(8)))
    assert len({job_id for job_id, _ in results}) == 1
    assert sorted(created for _, created in results) == [False] * 7 + [True]
    assert store.list_jobs(owner="ada")[1] == 1


@pytest.mark.parametrize("current", list(JobState))
def test_transitions(store: Store, current: JobState) -> None:
    # A path from QUEUED to every state, through allowed transitions only.
    paths = {
        S.QUEUED: [],
        S.STARTING: [S.STARTING],
        S.RUNNING: [S.STARTING, S.RUNNING],
        S.RESTARTING: [S.STARTING, S.RUNNING, S.RESTARTING],
        S.SUCCEEDED: [S.STARTING, S.RUNNING, S.SUCCEEDED],
        S.FAILED: [S.STARTING, S.FAILED],
        S.CANCELLED: [S.CANCELLED],
    }
    for new in JobState:
        job_id = submit(store)
        walk(store, job_id, *paths[current])
        if new in TRANSITIONS[current]:
            assert store.transition(job_id, new, "ok").state is new
        else:
            with pytest.raises(InvalidTransition) as info:
                store.transition(job_id, new, "nope")
            message = str(info.value)
            assert job_id in message and f"from {current} to {new}" in message
            for allowed in TRANSITIONS[current]:
                assert allowed in message
            if current in TERMINAL:
                assert "terminal" in message
            assert store.get_job(job_id).state is current


def test_timestamps_and_events(store: Store) -> None:
    ok = submit(store)
    before = store.get_job(ok)
    time.sleep(0.01)
    walk(store, ok, S.STARTING, S.RUNNING, S.RESTARTING, S.STARTING)
    restarted = store.transition(ok, S.RUNNING, "again")
    first_start = restarted.started_at
    assert first_start is not None and first_start > before.created_at
    assert restarted.updated_at > first_start  # started_at is kept from the first RUNNING
    done = store.transition(ok, S.SUCCEEDED, "all steps done")
    assert done.finished_at is not None and done.finished_at >= first_start and done.failure_reason is None

    bad = submit(store)
    walk(store, bad, S.STARTING, S.RUNNING)
    failed = store.transition(bad, S.FAILED, "rank 3 died: CUDA OOM")
    assert failed.failure_reason == "rank 3 died: CUDA OOM" and failed.finished_at is not None

    events = store.events(ok)
    got = [(e.kind, e.from_state, e.to_state) for e in events[:3]]
    assert got == [("state", None, S.QUEUED), ("state", S.QUEUED, S.STARTING), ("state", S.STARTING, S.RUNNING)]
    assert events[0].message == "submitted" and events[-1].message == "all steps done"
    assert [e.id for e in events] == sorted(e.id for e in events)
    extra = store.add_event(ok, "note", "hello")
    assert [e.message for e in store.events(ok, after_id=events[-1].id)] == ["hello"] and extra.kind == "note"


def test_queued_order(store: Store) -> None:
    low_old = submit(store, name="low-old", priority=0)
    high_new = submit(store, name="high-new", priority=5)
    low_new = submit(store, name="low-new", priority=0)
    high_newer = submit(store, name="high-newer", priority=5)
    started = submit(store, name="started", priority=9)
    walk(store, started, S.STARTING)
    assert [j.id for j in store.queued()] == [high_new, high_newer, low_old, low_new]
    assert [j.id for j in store.queued(limit=1)] == [high_new]
    assert [j.id for j in store.active()] == [started]


def test_request_cancel(store: Store) -> None:
    queued = submit(store)
    job = store.request_cancel(queued)
    assert job.state is S.CANCELLED and job.cancel_requested and job.finished_at is not None
    assert [e.kind for e in store.events(queued)] == ["state", "cancel", "state"]
    assert store.events(queued)[-1].message == "cancelled while queued"

    running = submit(store)
    walk(store, running, S.STARTING, S.RUNNING)
    job = store.request_cancel(running)
    assert job.state is S.RUNNING and job.cancel_requested
    assert store.get_job(running).cancel_requested
    assert store.events(running)[-1].kind == "cancel"
    assert store.transition(running, S.CANCELLED, "ranks stopped").state is S.CANCELLED
    assert store.request_cancel(running).state is S.CANCELLED  # finished: nothing to do
    with pytest.raises(KeyError):
        store.request_cancel("e" * 32)
    with pytest.raises(KeyError):
        store.transition("f" * 32, S.STARTING, "x")


def test_attempts(store: Store) -> None:
    job_id = submit(store)
    assert store.start_attempt(job_id) == 1
    store.finish_attempt(job_id, 1, "failed", "node lost")
    assert store.start_attempt(job_id) == 2
    assert store.get_job(job_id).attempts == 2
    attempts = store.attempts(job_id)
    assert [(a.number, a.outcome, a.reason) for a in attempts] == [(1, "failed", "node lost"), (2, None, None)]
    assert attempts[0].finished_at is not None and attempts[1].finished_at is None
    with pytest.raises(ValueError):
        store.finish_attempt(job_id, 2, "exploded")
    with pytest.raises(KeyError):
        store.finish_attempt(job_id, 7, "failed")


def metric(step: int, loss: float) -> dict:
    return dict(step=step, loss=loss, grad_norm=1.0, lr=3e-4, tokens_per_s=1e5, tflops=1.5, mfu=0.4,
                step_time_s=0.2, peak_mem_bytes=3 * 2**33, ckpt_block_s=0.0)  # fmt: skip


def test_metrics(store: Store) -> None:
    job_id = submit(store)
    store.add_metrics(job_id, [metric(s, 10.0 - s) for s in (1, 2, 3)], attempt=1)
    store.add_metrics(job_id, [metric(3, 99.0), metric(4, 6.0)], attempt=1)  # step 3 again: ignored
    rows = store.metrics(job_id)
    assert [(m.step, m.loss) for m in rows] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert rows[0].peak_mem_bytes == 3 * 2**33 and rows[0].mfu == 0.4 and rows[0].attempt == 1
    assert [m.step for m in store.metrics(job_id, after_step=2)] == [3, 4]
    assert [m.step for m in store.metrics(job_id, limit=2)] == [1, 2]

    # A restart resumes from the step-2 checkpoint and logs steps 3 and 4 again: attempt 2 wins.
    store.add_metrics(job_id, [metric(3, 5.0), metric(4, 4.0), metric(5, 3.0)], attempt=2)
    got = [(m.step, m.attempt, m.loss) for m in store.metrics(job_id)]
    assert got == [(1, 1, 9.0), (2, 1, 8.0), (3, 2, 5.0), (4, 2, 4.0), (5, 2, 3.0)]
    store.add_metrics(job_id, [{"step": 6}], attempt=2)
    assert store.metrics(job_id, after_step=5)[0].loss is None
    with pytest.raises(KeyError):
        store.add_metrics("d" * 32, [metric(1, 1.0)], attempt=1)


def test_logs_and_checkpoints(store: Store) -> None:
    job_id = submit(store)
    store.append_logs(job_id, ["a", "b", "c"])
    logs = store.logs(job_id)
    assert [r.line for r in logs] == ["a", "b", "c"]
    assert [r.line for r in store.logs(job_id, after_id=logs[0].id)] == ["b", "c"]
    assert [r.line for r in store.logs(job_id, limit=1)] == ["a"]
    store.add_checkpoint(job_id, 20, "/ckpt/step_20")
    store.add_checkpoint(job_id, 10, "/ckpt/step_10")
    assert [(c.step, c.path) for c in store.checkpoints(job_id)] == [(10, "/ckpt/step_10"), (20, "/ckpt/step_20")]
    assert store.checkpoints(submit(store)) == []
    # Retention deleted step 10 and a new step 30 was committed: the records follow the storage.
    store.sync_checkpoints(job_id, [(20, "/ckpt/step_20"), (30, "/ckpt/step_30")])
    assert [(c.step, c.path) for c in store.checkpoints(job_id)] == [(20, "/ckpt/step_20"), (30, "/ckpt/step_30")]


def test_count_by_state(store: Store) -> None:
    assert store.count_by_state() == dict.fromkeys(JobState, 0)
    a, b = submit(store), submit(store)
    submit(store)
    walk(store, a, S.STARTING, S.RUNNING)
    store.request_cancel(b)
    counts = store.count_by_state()
    assert set(counts) == set(JobState)
    assert counts[S.QUEUED] == 1 and counts[S.RUNNING] == 1 and counts[S.CANCELLED] == 1 and counts[S.FAILED] == 0


def test_oldest_queued_at(store: Store) -> None:
    """The submission time of the longest-waiting QUEUED job, whatever its priority; None with none queued."""
    assert store.oldest_queued_at() is None
    first, second = submit(store), submit(store, priority=5)
    submitted = {j.id: j.created_at for j in (store.get_job(first), store.get_job(second))}
    assert store.oldest_queued_at() == submitted[first]
    assert store.oldest_queued_at().utcoffset() == timedelta(0)
    walk(store, first, S.STARTING)
    assert store.oldest_queued_at() == submitted[second]
    store.request_cancel(second)
    assert store.oldest_queued_at() is None


def test_migrations_idempotent(store: Store, url: str) -> None:
    job_id = submit(store)
    again = Store(url)  # upgrade runs again: a no-op on an up-to-date schema
    try:
        assert again.get_job(job_id) is not None
        submit(again)
        assert store.list_jobs()[1] == 2
    finally:
        again.close()


def test_migration_matches_models(store: Store) -> None:
    # The hand-written migration and the models describe the same schema (columns, types, indexes).
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_times_are_utc(store: Store) -> None:
    job_id = submit(store)
    walk(store, job_id, S.STARTING, S.RUNNING)
    store.start_attempt(job_id)
    store.add_metrics(job_id, [metric(1, 1.0)], attempt=1)
    store.append_logs(job_id, ["x"])
    job = store.get_job(job_id)
    times = [job.created_at, job.updated_at, job.started_at]
    times += [store.events(job_id)[0].time, store.metrics(job_id)[0].time, store.logs(job_id)[0].time]
    times += [store.attempts(job_id)[0].started_at]
    for t in times:
        assert t.tzinfo is not None and t.utcoffset() == timedelta(0)
        assert abs(t - datetime.now(UTC)) < timedelta(minutes=1)


def test_url_rewriting(tmp_path) -> None:
    for url in ("postgres://u@h/db", "postgresql://u@h/db", "postgresql+psycopg://u@h/db"):
        assert normalise_url(url).drivername == "postgresql+psycopg"
    path = tmp_path / "a" / "b" / "jobs.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
    engine.dispose()
    assert path.parent.is_dir()


def test_reads_do_not_wait_for_a_writer(store: Store) -> None:
    """A transaction holding the write lock does not hold up readers (WAL on SQLite, MVCC on PostgreSQL)."""
    job, _ = store.create_job({"name": "r"}, owner="alice", name="r")
    locked = threading.Event()

    def writer() -> None:
        with store._tx() as session:  # a long write transaction, like a slow transition
            store._locked_job(session, job.id)
            locked.set()
            time.sleep(2.0)

    thread = threading.Thread(target=writer)
    thread.start()
    assert locked.wait(10)
    start = time.perf_counter()
    assert store.get_job(job.id) is not None
    assert store.list_jobs()[1] >= 1
    assert time.perf_counter() - start < 1.0
    thread.join()
