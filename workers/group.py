"""A job's ranks as one object on a Ray cluster: start, poll, stop, teardown.

    group = WorkerGroup(cfg, job_id="tiny-1")
    group.start()                       # plan, placement group, one actor per rank, rendezvous
    while (status := group.poll()).state == "running":
        for m in status.metrics: ...    # rank 0's step metrics, as they happen
    group.teardown()                    # always: no actor or placement group of ours stays

The plan (`workers.placement`) decides which ranks share a node; here each planned node
becomes one bundle of a single STRICT_SPREAD placement group, so every bundle lands on
a different node, all bundles are reserved or none, and the ranks of a bundle (a TP
group, or a TP x CP block) share a node. Actors are named `fourfold:<job>:<rank>` in the
`fourfold` namespace so leftovers can be found.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.queue import Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.config import Config
from workers.placement import Node, PlacementError, Plan, make_plan
from workers.worker import RankRunner

NAMESPACE = "fourfold"
# Passed on to every rank when the driver has them: how gloo and torch find their way on CPU.
PASS_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "FOURFOLD_TEST_STALL", "FOURFOLD_TEST_HOLD")  # fmt: skip


def cluster_nodes(cfg: Config) -> list[Node]:
    """Alive nodes and how many ranks of this job each can hold, from the cluster's totals."""
    res = cfg.resources
    nodes = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        have = n.get("Resources", {})
        if res.accelerator == "gpu":
            slots = min(int(have.get("GPU", 0)), int(have.get("CPU", 0) // res.cpus_per_rank))
        else:
            slots = int(have.get("CPU", 0) // res.cpus_per_rank)
        nodes.append(Node(n["NodeID"], slots))
    return nodes


@dataclass
class Status:
    state: str  # running | succeeded | failed | stopped
    metrics: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None


class WorkerGroup:
    def __init__(
        self, cfg: Config, job_id: str, ready_timeout_s: float = 60.0, runner_cls: type[RankRunner] = RankRunner
    ) -> None:
        """runner_cls: what each actor runs; tests pass a subclass that fails on purpose."""
        self.cfg, self.job_id, self.ready_timeout_s, self.runner_cls = cfg, job_id, ready_timeout_s, runner_cls
        self.plan: Plan | None = None
        self.pg = None
        self.bundles: list[tuple[str, dict[str, float]]] = []  # where the reservation landed
        self.actors: list[Any] = []
        self.queue: Queue | None = None
        self.futures: list[Any] = []
        self.heartbeats: dict[int, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []
        self.started_at = time.time()
        self.results: list[dict[str, Any]] = []

    def make_plan(self) -> Plan:
        unit = "GPUs" if self.cfg.resources.accelerator == "gpu" else "CPU slots"
        return make_plan(self.cfg.parallel, cluster_nodes(self.cfg), unit=unit)

    def start(self, spec: dict[str, Any] | None = None, plan: Plan | None = None) -> None:
        """Reserve the whole gang, start one actor per rank and begin training (non-blocking).

        plan: made by the caller (the service plans on the free slots it tracks); default: on
        the cluster's totals."""
        self.plan = plan = plan or self.make_plan()
        res = self.cfg.resources
        gpu = res.accelerator == "gpu"
        nodes = plan.nodes()
        bundles = []
        for node in nodes:
            n = len(plan.on_node(node))
            bundles.append({"CPU": n * res.cpus_per_rank, **({"GPU": n} if gpu else {})})
        self.pg = placement_group(bundles, strategy="STRICT_SPREAD", name=f"fourfold:{self.job_id}")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.ready_timeout_s)
        if not ready:
            self.teardown()
            raise PlacementError(
                f"the cluster has no room for {len(bundles)} node-sized blocks {bundles} "
                f"within {self.ready_timeout_s:.0f} s"
            )
        table = ray.util.placement_group_table(self.pg)
        self.bundles = [(table["bundles_to_node_id"][i], b) for i, b in enumerate(bundles)]  # (node, resources)
        # The queue lives in rank 0's bundle: if that node goes, the job fails anyway.
        beside_rank0 = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        self.queue = Queue(actor_options={"num_cpus": 0, "namespace": NAMESPACE, "scheduling_strategy": beside_rank0})
        queue = self.queue
        actor_cls = ray.remote(self.runner_cls)
        world = self.cfg.parallel.world_size
        for r in plan.ranks:
            strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=nodes.index(r.node))
            self.actors.append(
                actor_cls.options(
                    name=f"fourfold:{self.job_id}:{r.rank}", namespace=NAMESPACE, num_cpus=res.cpus_per_rank,
                    max_concurrency=2,  # run() in one thread; where/request_stop answered meanwhile
                    num_gpus=1 if gpu else 0, scheduling_strategy=strategy,
                ).remote(r.rank, world, 0 if gpu else r.bundle, queue.put_nowait)
            )  # fmt: skip
        master = ray.get(self.actors[0].where.remote())["host"]
        port = ray.get(self.actors[0].free_port.remote())
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.setdefault("OMP_NUM_THREADS", str(res.cpus_per_rank))
        spec = spec if spec is not None else self.cfg.model_dump(mode="json", by_alias=True)
        self.futures = [a.run.remote(spec, master, port, env) for a in self.actors]
        self.started_at = time.time()

    def where(self) -> list[dict[str, Any]]:
        """Each rank's node id, host and pid, as the actors report them."""
        return ray.get([a.where.remote() for a in self.actors])

    def _drain(self) -> list[dict[str, Any]]:
        """Take every queued event in two calls to the queue actor (not one per event)."""
        if self.queue is None:
            return []
        try:
            waiting = self.queue.qsize()
            events = self.queue.get_nowait_batch(waiting) if waiting else []
        except ray.exceptions.RayError:  # the queue's node is gone; the ranks' futures say the rest
            self.queue = None
            return []
        metrics = []
        for event in events:
            if event["kind"] == "metrics":
                metrics.append(event["metrics"])
            elif event["kind"] == "error":
                self.errors.append(event)
            else:
                self.heartbeats[event["rank"]] = event
        return metrics

    def poll(self, timeout_s: float = 0.0) -> Status:
        """New metrics and the latest heartbeats; the state once every rank returned or one failed."""
        done, _ = ray.wait(self.futures, num_returns=len(self.futures), timeout=timeout_s)
        metrics = self._drain()
        died, raised = [], []
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:  # the process is gone: killed, OOM, node lost
                died.append(self.futures.index(ref))
            except Exception as err:  # a rank raised
                raised.append((self.futures.index(ref), err))
        if died or raised:
            metrics += self._drain()
            return Status("failed", metrics, dict(self.heartbeats), self._cause(died, raised))
        if len(done) < len(self.futures):
            return Status("running", metrics, dict(self.heartbeats))
        self.results = ray.get(self.futures)
        metrics += self._drain()
        state = "stopped" if any(r["stopped"] for r in self.results) else "succeeded"
        return Status(state, metrics, dict(self.heartbeats))

    def _cause(self, died: list[int], raised: list[tuple[int, Exception]]) -> str:
        """Why the job failed, naming the ranks and nodes: a dead process first, else the earliest error."""
        nodes = {r.rank: r.node for r in self.plan.ranks} if self.plan else {}
        if died:
            where = ", ".join(f"rank {r} on node {nodes.get(r, '?')[:12]}" for r in sorted(died))
            return f"worker process died: {where}"
        if self.errors:  # the earliest a rank reported is the cause; its peers fail after it
            first = min(self.errors, key=lambda e: e["time"])
            node = nodes.get(first["rank"], "?")[:12]
            return f"rank {first['rank']} (node {node}) raised: {_first_line(first['error'])}"
        rank, err = raised[0]
        kind = type(getattr(err, "cause", None) or err).__name__
        return f"rank {rank} raised: {_first_line(f'{kind}: {err}')}"

    def silent_ranks(self, timeout_s: float) -> list[tuple[int, str, int, float]]:
        """Ranks whose last heartbeat is older than timeout_s: (rank, last phase, step, seconds silent)."""
        now = time.time()
        world = self.cfg.parallel.world_size
        out = []
        for rank in range(world):
            hb = self.heartbeats.get(rank)
            since = now - (hb["time"] if hb else self.started_at)
            if since > timeout_s:
                out.append((rank, hb["phase"] if hb else "not started", hb["step"] if hb else 0, since))
        return out

    def wait(self, timeout_s: float | None = None, on_metrics: Any = None) -> Status:
        """Poll until the job ends (or the timeout passes: state stays running)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while True:
            status = self.poll(timeout_s=0.5)
            seen += status.metrics
            if on_metrics is not None:
                for m in status.metrics:
                    on_metrics(m)
            if status.state != "running" or (deadline is not None and time.monotonic() > deadline):
                status.metrics = seen  # every metric since wait() began
                return status

    def stop(self, timeout_s: float = 120.0) -> Status:
        """Ask every rank to stop after its current step (saving a checkpoint if configured)."""
        for a in self.actors:
            a.request_stop.remote()
        return self.wait(timeout_s)

    def teardown(self) -> None:
        """Kill every actor and remove the placement group; safe to call more than once."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors, self.futures = [], []
        if self.queue is not None:
            self.queue.shutdown(force=True)
            self.queue = None
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
        self.bundles = []


def _first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else "unknown error"
