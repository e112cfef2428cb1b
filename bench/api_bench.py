"""API benchmark: p50/p99 latency and requests/s of GET /v1/jobs and GET /v1/jobs/{id}.

Fills a fresh store with --jobs jobs (each with a few steps of metrics), serves the API with
uvicorn on 127.0.0.1 in a child process, then runs --clients concurrent clients for --seconds
per endpoint, all in this one run.

    python bench/api_bench.py --jobs 10000 --clients 50 --seconds 10 [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(url: str, n: int) -> list[str]:
    from service.states import JobState
    from service.store import Store

    store = Store(url)
    ids = []
    spec = {"name": "bench", "train": {"steps": 3}}
    for i in range(n):
        job, _ = store.create_job(spec, owner="local", name=f"bench-{i}", priority=i % 3)
        ids.append(job.id)
        if i % 10 == 0:  # every tenth job ran: metrics for the list's "latest" columns
            store.transition(job.id, JobState.STARTING, "bench")
            store.transition(job.id, JobState.RUNNING, "bench")
            row = {"loss": 3.0, "tokens_per_s": 1e3, "mfu": 0.5, "step_time_s": 0.1}
            store.add_metrics(job.id, [{"step": s, **row} for s in (1, 2, 3)], 1)
    store.close()
    return ids


def serve(url: str, data_dir: str, port: int) -> None:
    import uvicorn

    from api.app import create_app
    from service.settings import Settings

    app = create_app(Settings(data_dir=Path(data_dir), database_url=url))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


async def load(base: str, paths: list[str], clients: int, seconds: float) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        stop = time.perf_counter() + seconds

        async def one_client(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < stop:
                start = time.perf_counter()
                r = await client.get(rng.choice(paths))
                latencies.append(time.perf_counter() - start)
                errors += r.status_code != 200

        start = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, errors, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="fourfold-api-bench-")
    url = args.database_url or f"sqlite:///{tmp}/store.db"
    start = time.perf_counter()
    ids = fill(url, args.jobs)
    print(f"api_bench: {args.jobs:,} jobs stored in {time.perf_counter() - start:.1f} s ({url.split(':')[0]})")
    port = _port()
    server = mp.get_context("spawn").Process(target=serve, args=(url, tmp, port), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    print(f"{args.clients} concurrent clients, {args.seconds:.0f} s per endpoint, one uvicorn worker")
    print(f"{'endpoint':<28} {'requests':>9} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    endpoints = {
        "GET /v1/jobs (50/page)": [f"/v1/jobs?offset={o}" for o in range(0, args.jobs, 50)],
        "GET /v1/jobs/{id}": [f"/v1/jobs/{i}" for i in ids],
    }
    for name, paths in endpoints.items():
        lat, errors, elapsed = asyncio.run(load(base, paths, args.clients, args.seconds))
        q = statistics.quantiles(lat, n=100)
        print(
            f"{name:<28} {len(lat):>9,} {len(lat) / elapsed:>8.0f} {q[49] * 1e3:>8.1f} {q[98] * 1e3:>8.1f} {errors:>7}"
        )
    server.terminate()
    server.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
