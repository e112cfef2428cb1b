"""Recovery benchmark: a worker process SIGKILLed mid-run, time until training resumes, steps redone.

The same job on the same local Ray cluster, four ways, interleaved: through fourfold's supervisor
restarting the whole job (`restart.in_place: false`), recovering in place from the live replica
(the default), the same with one warm spare (`restart.spares: 1`), and through Ray Train's
`TorchTrainer` with `FailureConfig(max_failures=2)` running the same engine in its workers (which
resumes from the engine's newest complete checkpoint, every 2 steps, as the full restart does).
The same runs also time the start: submission to the first step (the supervisor's split of it:
queued for admission and the placement group, actors, imports, rendezvous, model built, first step).
Rank 1's process is SIGKILLed once rank 0 has reported step 5 (or later); recovery time is from the kill to
the first step after it (with a spare, once the spare has warmed up: a job of hours gives it time, this
one of seconds would not). Steps redone: steps trained before the kill and again after it. For
fourfold it also prints where the seconds went (`service.recovery.PHASES`, as the attempt records
them, and `detect`: the kill until the supervisor saw the failure). Needs `pip install 'ray[train]'`.

    python bench/recovery_bench.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import ray  # noqa: E402

from parallel.config import build_config  # noqa: E402

KILL_AT = 5
STARTS: dict[str, list[tuple[float, dict[str, float]]]] = {}  # submission to first step, each run's
DEADLINE_S = 300.0  # every wait below gives up after this long, with the reason


def _until(check, what: str, timeout_s: float = DEADLINE_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"recovery_bench: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


def job_spec(ckpt: Path, steps: int, in_place: bool = False, spares: int = 0) -> dict:
    spec = {
        "name": "recovery",
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "seq_len": 32},
        "metrics": {"peak_tflops": 1.0},
        "checkpoint": {"dir": str(ckpt), "every": 2},
        "restart": {"max_failures": 2, "backoff_s": 0, "in_place": in_place, "spares": spares},
    }
    return build_config(spec).model_dump(mode="json", by_alias=True)


def start_of(store, job_id: str) -> tuple[float, dict[str, float]]:  # noqa: ANN001
    """Submission to the first step, and the supervisor's split of it (its `start` event)."""
    job = store.get_job(job_id)
    first = min((m for m in store.metrics(job_id) if m.attempt == 1), key=lambda m: m.step)
    message = next((e.message for e in store.events(job_id) if e.kind == "start"), "")
    split = {k.strip(): float(v) for k, v in re.findall(r"([a-z][a-z ]*) ([\d.]+) s", message.partition(": ")[2])}
    return first.time.timestamp() - job.created_at.timestamp(), split


def fourfold_once(tmp: Path, steps: int, in_place: bool = False, spares: int = 0) -> tuple[float, int, dict]:
    from service.states import TERMINAL
    from service.store import Store
    from service.supervisor import Supervisor

    store = Store(f"sqlite:///{tmp / 'store.db'}")
    sup = Supervisor(store, poll_s=0.1)
    sup.start()
    job, _ = store.create_job(job_spec(tmp / "ckpt", steps, in_place, spares), owner="bench", name="recovery")
    try:
        # A spare is pre-started: in a real job it is warm long before a failure, in this one of seconds
        # the kill waits for it (a step >= KILL_AT)
        def due() -> bool:
            att = sup.running.get(job.id)
            warm = att is not None and att.group.spares_ready()
            return warm and any(m.step >= KILL_AT for m in store.metrics(job.id))

        _until(due, f"step {KILL_AT} with the spare warm")
        victim = ray.get_actor(f"fourfold:{job.id}:1", namespace="fourfold")
        pid = ray.get(victim.where.remote(), timeout=60)["pid"]
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        _until(lambda: store.get_job(job.id).state in TERMINAL, "the end of the job")
        assert store.get_job(job.id).state == "SUCCEEDED", store.get_job(job.id).failure_reason
        after = [m for m in store.metrics(job.id) if m.attempt == 2]
        if not after:
            raise RuntimeError("recovery_bench: the job ended before the kill took effect; raise --steps")
        resumed = min(m.time.timestamp() for m in after)
        lines = [x.line for x in store.logs(job.id)]
        before = lines[: next(i for i, x in enumerate(lines) if x.startswith("failure:"))]
        trained = max(int(x.split()[1].split("/")[0]) for x in before if x.startswith("step "))
        redone = max(0, trained - min(m.step for m in after) + 1)
        split = store.attempts(job.id)[1].recovery_phases or {}
        total = resumed - killed
        STARTS.setdefault("fourfold" + (" + spare" if spares else ""), []).append(start_of(store, job.id))
        return total, redone, {"detect": round(total - sum(split.values()), 3), **split}
    finally:
        sup.stop()
        store.close()


def _ray_train_loop(config: dict) -> None:
    import ray.train

    from parallel.config import build_config
    from parallel.trainer import Trainer

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    log = Path(config["log"])
    Path(f"{log}.pid{rank}").write_text(str(os.getpid()))
    spec = dict(config["spec"])
    spec["checkpoint"] = {**spec["checkpoint"], "resume": "auto"}
    trainer = Trainer(build_config(spec, world_size=ctx.get_world_size()))  # joins Ray Train's gloo group

    def on_step(m: dict) -> None:
        if rank == 0:
            with open(log, "a") as f:
                f.write(json.dumps({"time": time.time(), "step": m["step"], "pid": os.getpid()}) + "\n")

    trainer.run(on_step=on_step)
    trainer.close()


def ray_train_once(tmp: Path, steps: int) -> tuple[float, int, dict]:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    log = tmp / "steps.jsonl"
    killed: list[float] = []

    def killer() -> None:
        def reached() -> bool:
            rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            return any(r["step"] >= KILL_AT for r in rows)

        _until(reached, f"step {KILL_AT} under Ray Train")
        pid = int(Path(f"{log}.pid1").read_text())
        killed.append(time.time())
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    submitted = time.time()
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"spec": job_spec(tmp / "ckpt", steps), "log": str(log)},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=str(tmp / "ray-train"), name="recovery",
                             failure_config=FailureConfig(max_failures=2)),
    )  # fmt: skip
    trainer.fit()
    thread.join(timeout=5)
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    if not killed or rows[-1]["step"] != steps:
        raise RuntimeError(f"recovery_bench: Ray Train's run ended at step {rows[-1]['step']}, killed={bool(killed)}")
    STARTS.setdefault("Ray Train TorchTrainer", []).append((rows[0]["time"] - submitted, {}))
    trained = max(r["step"] for r in rows if r["time"] <= killed[0])
    first = min(r["step"] for r in rows if r["time"] > killed[0])
    return min(r["time"] for r in rows if r["time"] > killed[0]) - killed[0], max(0, trained - first + 1), {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    ways = {
        "fourfold, full restart": lambda tmp: fourfold_once(tmp, args.steps),
        "fourfold, in place": lambda tmp: fourfold_once(tmp, args.steps, in_place=True),
        "fourfold, in place+spare": lambda tmp: fourfold_once(tmp, args.steps, in_place=True, spares=1),
        "Ray Train TorchTrainer": lambda tmp: ray_train_once(tmp, args.steps),
    }
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in ways}
    splits: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for i in range(args.repeats):
        for name, once in ways.items():
            tmp = Path(tempfile.mkdtemp(prefix=f"fourfold-recovery-{i}-"))
            seconds, redone, split = once(tmp)
            results[name].append((seconds, redone))
            splits[name] += [split] if split else []
            where = f"  ({', '.join(f'{k} {v:.2f}' for k, v in split.items())})" if split else ""
            line = f"  run {i + 1}: {name:<26} recovered in {seconds:6.2f} s, {redone} step(s) redone{where}"
            print(line, flush=True)
    print(f"recovery_bench: tiny model, dp=2 on a local Ray cluster (4 logical CPUs on {os.cpu_count()} cores), "
          f"SIGKILL of rank 1 after step {KILL_AT}, checkpoint every 2 steps, {args.repeats} runs each")  # fmt: skip
    peer = statistics.median(s for s, _ in results["Ray Train TorchTrainer"])
    for name, values in results.items():
        median = statistics.median(s for s, _ in values)
        runs = ", ".join(f"{s:.2f}" for s, _ in values)
        redone = statistics.median(r for _, r in values)
        print(f"{name:<26} median {median:6.2f} s = {median / peer:.2f} x Ray Train, steps redone {redone:g}  "
              f"(runs: {runs})")  # fmt: skip
    for name, rows in splits.items():
        if rows:
            medians = {k: statistics.median(s.get(k, 0.0) for s in rows) for k in rows[0]}
            print(f"{name}, median seconds per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    # The same runs' start: submission (TorchTrainer: the trainer made and fit() called) to the first step.
    ray_start = statistics.median(s for s, _ in STARTS["Ray Train TorchTrainer"])
    for name, rows in STARTS.items():
        median = statistics.median(s for s, _ in rows)
        where = [split for _, split in rows if split]
        phases = {k: statistics.median(w.get(k, 0.0) for w in where) for k in where[0]} if where else {}
        detail = ": " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) if phases else ""
        print(f"start, {name:<22} submit to first step median {median:6.2f} s = {median / ray_start:.2f} x Ray Train"
              f"{detail}")  # fmt: skip
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
