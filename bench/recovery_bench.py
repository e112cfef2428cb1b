"""Recovery benchmark: a worker process SIGKILLed mid-run, time until training resumes.

The same job on the same local Ray cluster, twice over: through fourfold's supervisor, and
through Ray Train's `TorchTrainer` with `FailureConfig(max_failures=2)` running the same engine
in its workers. Both resume from the engine's newest complete checkpoint (every 2 steps). A
killer thread SIGKILLs rank 1's process once rank 0 has reported step 5; recovery time is
from the kill to the first step the new attempt reports. For fourfold it also prints where the
seconds went (`service.recovery.PHASES`, as the attempt records them, and `detect`: the kill until the
supervisor saw the failure). Needs `pip install 'ray[train]'`.

    python bench/recovery_bench.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
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
DEADLINE_S = 300.0  # every wait below gives up after this long, with the reason


def _until(check, what: str, timeout_s: float = DEADLINE_S) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"recovery_bench: {what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.05)


def job_spec(ckpt: Path, steps: int) -> dict:
    spec = {
        "name": "recovery",
        "model": {"preset": "tiny"},
        "parallel": {"dp": 2},
        "train": {"steps": steps, "global_batch": 4, "micro_batch": 2, "seq_len": 32},
        "metrics": {"peak_tflops": 1.0},
        "checkpoint": {"dir": str(ckpt), "every": 2},
        "restart": {"max_failures": 2, "backoff_s": 0},
    }
    return build_config(spec).model_dump(mode="json", by_alias=True)


def fourfold_once(tmp: Path, steps: int) -> tuple[float, dict[str, float]]:
    from service.states import TERMINAL
    from service.store import Store
    from service.supervisor import Supervisor

    store = Store(f"sqlite:///{tmp / 'store.db'}")
    sup = Supervisor(store, poll_s=0.1)
    sup.start()
    job, _ = store.create_job(job_spec(tmp / "ckpt", steps), owner="bench", name="recovery")
    try:
        _until(lambda: any(m.step >= KILL_AT for m in store.metrics(job.id)), f"step {KILL_AT}")
        victim = ray.get_actor(f"fourfold:{job.id}:1", namespace="fourfold")
        pid = ray.get(victim.where.remote(), timeout=60)["pid"]
        killed = time.time()
        os.kill(pid, signal.SIGKILL)
        _until(lambda: store.get_job(job.id).state in TERMINAL, "the end of the job")
        assert store.get_job(job.id).state == "SUCCEEDED", store.get_job(job.id).failure_reason
        resumed = min(m.time.timestamp() for m in store.metrics(job.id) if m.attempt == 2)
        split = store.attempts(job.id)[1].recovery_phases or {}
        total = resumed - killed
        return total, {"detect": round(total - sum(split.values()), 3), **split}
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


def ray_train_once(tmp: Path, steps: int) -> tuple[float, dict[str, float]]:
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
    return min(r["time"] for r in rows if r["time"] > killed[0]) - killed[0], {}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[float]] = {"fourfold supervisor": [], "Ray Train TorchTrainer": []}
    splits: list[dict[str, float]] = []
    for i in range(args.repeats):
        for name, once in (("fourfold supervisor", fourfold_once), ("Ray Train TorchTrainer", ray_train_once)):
            tmp = Path(tempfile.mkdtemp(prefix=f"fourfold-recovery-{i}-"))
            seconds, split = once(tmp, args.steps)
            results[name].append(seconds)
            splits += [split] if split else []
            where = f"  ({', '.join(f'{k} {v:.2f}' for k, v in split.items())})" if split else ""
            print(f"  run {i + 1}: {name:<24} recovered in {seconds:6.2f} s{where}", flush=True)
    print(f"recovery_bench: tiny model, dp=2 on a local Ray cluster (4 logical CPUs on {os.cpu_count()} cores), "
          f"SIGKILL of rank 1 after step {KILL_AT}, checkpoint every 2 steps, {args.repeats} runs each")  # fmt: skip
    for name, values in results.items():
        print(f"{name:<24} median {statistics.median(values):6.2f} s  (runs: {', '.join(f'{v:.2f}' for v in values)})")
    if splits:
        medians = {k: statistics.median(s.get(k, 0.0) for s in splits) for k in splits[0]}
        print("fourfold, median seconds per phase: " + ", ".join(f"{k} {v:.2f}" for k, v in medians.items()))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
