"""API benchmark: GET /v1/jobs, GET /v1/jobs/{id} and POST /v1/jobs under 50 concurrent clients.

Fills a fresh store with --jobs jobs (every tenth with metrics), serves the API with uvicorn on
127.0.0.1 in a child process (the service's own `fourfold up` settings: one worker, uvloop and
httptools), and drives it from this process with --clients concurrent aiohttp clients:

- capacity: every client sends its next request as soon as the last one answered (closed loop): the
  most requests a second the server answers. With 50 clients always waiting, a request's latency
  is mostly its place in the queue (Little's law: 50 / rate).
- latency at a rate: the clients together send the target rate (500/s for a list page, 1,000/s for
  one job) on a fixed schedule (open loop), and a request's latency counts from when it was due,
  so a server that falls behind shows it (no coordinated omission).
- revalidation: list pages asked again with the `ETag` of the first answer (304s).
- submissions: every client submits jobs with new Idempotency-Keys, one request in five retrying an
  earlier key (maybe while its first submission is still in flight); then
  the store must hold exactly one job per key.

List pages go by the `next` cursor (`?after=`), as a client pages. PostgreSQL: --database-url names a
server; the benchmark makes a database of its own there and drops it afterwards.

    python bench/api_bench.py --jobs 10000 --clients 50 --seconds 10 [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

SUBMIT_SPEC = {"name": "bench-submit", "model": {"preset": "tiny"}, "train": {"steps": 3}}


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
    from api.app import create_app, serve
    from service.settings import Settings

    settings = Settings(data_dir=Path(data_dir), database_url=url)  # no quotas: the default
    serve(create_app(settings), "127.0.0.1", port)


class Result:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self.elapsed = 0.0

    def add(self, status: int, latency: float) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def row(self, name: str, expect: tuple[int, ...]) -> str:
        q = statistics.quantiles(self.latencies, n=100)
        errors = sum(n for s, n in self.statuses.items() if s not in expect)
        n = len(self.latencies)
        return f"{name:<40} {n:>8,} {n / self.elapsed:>8.0f} {q[49] * 1e3:>8.1f} {q[98] * 1e3:>8.1f} {errors:>7}"


async def drive(base: str, requests, clients: int, seconds: float, rate: float | None = None) -> Result:
    """`requests(rng)` -> (method, path, headers, body) for each request. Closed loop without `rate`;
    with it, each client sends on a schedule of rate/clients a second, latency counted from when due."""
    result = Result()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base, connector=connector) as session:
        start = time.perf_counter()
        stop = start + seconds

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            due = start + (rng.random() / rate * clients if rate else 0.0)
            while (now := time.perf_counter()) < stop:
                if rate:
                    if due > now:
                        await asyncio.sleep(due - now)
                    sent_at = due
                    due += clients / rate
                else:
                    sent_at = now
                method, path, headers, body = requests(rng)
                async with session.request(method, path, headers=headers, data=body) as r:
                    await r.read()
                result.add(r.status, time.perf_counter() - sent_at)

        await asyncio.gather(*(client(i) for i in range(clients)))
        result.elapsed = time.perf_counter() - start
    return result


def cursors(base: str, limit: int = 50) -> list[str]:
    """Every page of the list, newest first, as the `next` cursors lead there."""
    paths, after = [f"/v1/jobs?limit={limit}"], None
    with httpx.Client(base_url=base, timeout=60) as client:
        while True:
            page = client.get("/v1/jobs", params={"limit": limit, **({"after": after} if after else {})}).json()
            if not (after := page["next"]):
                return paths
            paths.append(f"/v1/jobs?limit={limit}&after={after}")


def pg_database(url: str) -> tuple[str, str]:
    """A fresh database on the server `url` names: (its URL, its name)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from service.db import normalise_url

    name = f"fourfold_bench_{os.getpid()}"
    engine = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False), name


def drop_pg_database(url: str, name: str) -> None:
    from sqlalchemy import create_engine, text

    from service.db import normalise_url

    engine = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--database-url", default=None, help="a PostgreSQL server; default: SQLite in a temp dir")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="fourfold-api-bench-")
    pg_name = None
    if args.database_url:
        url, pg_name = pg_database(args.database_url)
    else:
        url = f"sqlite:///{tmp}/store.db"
    try:
        return run(args, url, tmp)
    finally:
        if pg_name:
            drop_pg_database(args.database_url, pg_name)


def run(args: argparse.Namespace, url: str, tmp: str) -> int:
    start = time.perf_counter()
    ids = fill(url, args.jobs)
    backend = url.split(":")[0].split("+")[0]
    print(f"api_bench: {args.jobs:,} jobs stored in {time.perf_counter() - start:.1f} s ({backend})")
    port = _port()
    server = mp.get_context("spawn").Process(target=serve, args=(url, tmp, port), daemon=True)
    server.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(base + "/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    pages = cursors(base)
    etags = {p: httpx.get(base + p).headers["etag"] for p in pages}
    clients, seconds = args.clients, args.seconds
    print(f"{clients} concurrent clients, {seconds:.0f} s a row, server: one uvicorn worker in its own process")
    print(f"{'':<40} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    one_job = lambda rng: ("GET", f"/v1/jobs/{rng.choice(ids)}", None, None)  # noqa: E731
    a_page = lambda rng: ("GET", rng.choice(pages), None, None)  # noqa: E731

    def same_page(rng: random.Random) -> tuple[str, str, dict[str, str], None]:
        page = rng.choice(pages)
        return "GET", page, {"If-None-Match": etags[page]}, None

    keys: list[str] = []

    def submit(rng: random.Random) -> tuple[str, str, dict[str, str], str]:
        # One in five retries an earlier key (a client that lost the answer): it gets the job made before.
        if keys and rng.random() < 0.2:
            key = keys[rng.randrange(len(keys))]
        else:
            key = f"bench-{len(keys)}-{rng.random()}"
            keys.append(key)
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        return "POST", "/v1/jobs", headers, json.dumps(SUBMIT_SPEC)

    rows = [
        ("GET /v1/jobs (50/page), capacity", a_page, None, (200,)),
        ("GET /v1/jobs (50/page) at 500/s", a_page, 500.0, (200,)),
        ("GET /v1/jobs, If-None-Match (304)", same_page, None, (304,)),
        ("GET /v1/jobs/{id}, capacity", one_job, None, (200,)),
        ("GET /v1/jobs/{id} at 1,000/s", one_job, 1000.0, (200,)),
        ("POST /v1/jobs, capacity", submit, None, (200, 201)),
    ]
    figures = {}
    for name, requests, rate, expect in rows:
        result = asyncio.run(drive(base, requests, clients, seconds, rate))
        print(result.row(name, expect))
        if os.environ.get("BENCH_DEBUG"):
            print("   ", result.statuses)
        q = statistics.quantiles(result.latencies, n=100)
        figures[name] = {"requests": len(result.latencies), "rate": len(result.latencies) / result.elapsed,
                         "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3, "statuses": result.statuses}  # fmt: skip
    created = figures["POST /v1/jobs, capacity"]["statuses"].get(201, 0)
    stored = httpx.get(base + "/v1/jobs", params={"limit": 1}).json()["total"] - args.jobs
    posts = figures["POST /v1/jobs, capacity"]
    print(f"submissions: {created / seconds:.0f} jobs/s created, {posts['statuses'].get(200, 0)} retries answered "
          f"with the job made before; keys {len(keys)}, jobs stored {stored}: "
          f"{'none lost or duplicated' if stored == len(keys) == created else 'MISMATCH'}")  # fmt: skip
    figures["submissions"] = {"keys": len(keys), "created": created, "stored": stored, "jobs_per_s": created / seconds}
    if args.json:
        args.json.write_text(json.dumps({"backend": backend, "jobs": args.jobs, "clients": clients, **figures}))
    server.terminate()
    server.join()
    return 0 if stored == len(keys) == created else 1


if __name__ == "__main__":
    raise SystemExit(main())
