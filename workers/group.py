"""A job's ranks as one object on a Ray cluster: reserve, launch, poll, stop, teardown.

    group = WorkerGroup(cfg, job_id="tiny-1")
    group.start()                       # plan, placement group, one actor per rank, rendezvous
    while (status := group.poll()).state == "running":
        for m in status.metrics: ...    # rank 0's step metrics, as they happen
    group.teardown()                    # always: no actor or placement group of ours stays

`start` is `reserve` (the placement group, asynchronous), waiting until it is ready, and
`launch` (the actors); a caller that must not block (the service's supervisor) calls the
three itself and checks `is_ready()` between its other work.

The plan (`workers.placement`) decides which ranks share a node; here each planned node
becomes one bundle of a single STRICT_SPREAD placement group, pinned to that node by its
`ray.io/node-id` label, so all bundles are reserved or none, each where the plan says, and
the ranks of a bundle (a TP group, or a TP x CP block) share a node. Actors are named
`fourfold:<job>:<rank>` in the `fourfold` namespace and the placement group
`fourfold:<job>`, so leftovers of a job can be found (`remove_leftovers`).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import ray
from ray.util.placement_group import NODE_ID_LABEL_KEY, placement_group, remove_placement_group
from ray.util.queue import Queue
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from parallel.config import Config
from workers.health import Health
from workers.inplace import RecoveryFailed, new_actor, recover, start_spare
from workers.placement import (
    Bundle,
    Node,
    PlacementError,
    Plan,
    buddy_offset,
    bundles_of,
    make_plan,
    nodes_for,
    unit_of,
)
from workers.worker import RankRunner

NAMESPACE = "fourfold"
# Passed on to every rank when the driver has them: how gloo and torch find their way on CPU.
PASS_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "FOURFOLD_TEST_STALL", "FOURFOLD_TEST_HOLD", "FOURFOLD_TEST_PEER_FAIL")  # fmt: skip
LAUNCH_TIMEOUT_S = 120.0  # for every actor process to start and answer
LOST_GRACE_S = 5.0  # ranks whose step failed with no process dead: how long to wait for a death to show
GONE_TIMEOUT_S = 30.0  # for Ray to finish removing what teardown removed


def node_resources() -> dict[str, dict[str, float]]:
    """Alive nodes' total resources, by node id."""
    return {n["NodeID"]: dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")}


def cluster_nodes(cfg: Config) -> list[Node]:
    """Alive nodes and how many ranks of this job each can hold, from the cluster's totals."""
    return nodes_for(node_resources(), cfg.resources)


GroupState = Literal["running", "succeeded", "failed", "stopped"]


@dataclass
class Status:
    state: GroupState
    metrics: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: dict[int, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    training: bool = False  # every rank is past start-up
    # Nodes of ranks that stopped answering (their raylet is gone, or the node itself): Ray may
    # still list such a node alive for a while, so a restart should not plan on it yet.
    unreachable_nodes: tuple[str, ...] = ()
    marks: dict[int, dict[str, float]] = field(default_factory=dict)  # each rank's start-up moments
    recovered: dict[str, Any] | None = None  # an in-place recovery just carried out (workers.inplace.recover)


class WorkerGroup:
    def __init__(
        self, cfg: Config, job_id: str, ready_timeout_s: float = 60.0, runner_cls: type[RankRunner] = RankRunner
    ) -> None:
        """runner_cls: what each actor runs; tests pass a subclass that fails on purpose."""
        self.cfg, self.job_id, self.ready_timeout_s, self.runner_cls = cfg, job_id, ready_timeout_s, runner_cls
        self.plan: Plan | None = None
        self.pg = None
        self.bundles: list[Bundle] = []  # (node, resources) reserved
        self.reserved_at = 0.0
        self.actors: list[Any] = []
        self.queue: Queue | None = None
        self.futures: list[Any] = []
        self.heartbeats: dict[int, dict[str, Any]] = {}
        self.health = Health(cfg.parallel.world_size, time.monotonic())
        self.errors: list[dict[str, Any]] = []
        self.results: list[dict[str, Any]] = []
        self.marks: dict[int, dict[str, float]] = {}  # each rank's start-up moments (wall clock)
        # in-place recovery (workers.inplace): names of every actor made, warm spares (actor, node, ref),
        # ranks whose step failed and who wait for rejoin, and whether a recovery awaits its first step
        self.namespace = NAMESPACE
        self.names: set[str] = set()
        self.spares: list[tuple[Any, str, Any]] = []
        self.spare_seq = self.generation = 0
        self.lost: dict[int, dict[str, Any]] = {}
        self.lost_since: float | None = None
        self.recovering = self.stop_requested = False
        self.launch_args: tuple[dict[str, Any], dict[str, str], dict[str, Any] | None] = ({}, {}, None)

    def make_plan(self) -> Plan:
        return make_plan(
            self.cfg.parallel, cluster_nodes(self.cfg), unit=unit_of(self.cfg.resources), spares=self.cfg.restart.spares
        )

    # -- starting ------------------------------------------------------------------
    def start(self, spec: dict[str, Any] | None = None, plan: Plan | None = None) -> None:
        """Reserve the whole gang, wait for it, start one actor per rank and begin training.

        plan: made by the caller (the service plans on the free slots it tracks); default: on
        the cluster's totals."""
        self.reserve(plan)
        ready, _ = ray.wait([self._ready], timeout=self.ready_timeout_s)
        if not ready:
            message = self.not_ready()
            self.teardown()
            raise PlacementError(message)
        self.launch(spec)

    def reserve(self, plan: Plan | None = None) -> None:
        """Ask for the placement group (returns at once): one bundle per planned node, pinned there."""
        self.plan = plan = plan or self.make_plan()
        nodes = plan.nodes()
        self.bundles = bundles_of(plan, self.cfg.resources)
        self.pg = placement_group(
            [b for _, b in self.bundles], strategy="STRICT_SPREAD", name=f"fourfold:{self.job_id}",
            bundle_label_selector=[{NODE_ID_LABEL_KEY: node} for node in nodes],
        )  # fmt: skip
        self.reserved_at = time.monotonic()
        # One ref, made once: a fresh `pg.ready()` checked with timeout=0 is never resolved yet.
        self._ready = self.pg.ready()

    def is_ready(self) -> bool:
        ready, _ = ray.wait([self._ready], timeout=0)
        return bool(ready)

    def not_ready(self) -> str:
        """Why a reservation is still waiting, for errors and events."""
        blocks = ", ".join(f"{node[:12]}: {b}" for node, b in self.bundles)
        waited = time.monotonic() - self.reserved_at
        return f"the cluster has no room for {len(self.bundles)} node-sized blocks ({blocks}) within {waited:.0f} s"

    def launch(self, spec: dict[str, Any] | None = None, storage: dict[str, Any] | None = None) -> None:
        """Start one actor per rank in the ready placement group, hand out the rendezvous, train.
        With `storage` (a `workers.confine.Grant` as a dict) each rank checks the spec's paths
        against it again before it opens any."""
        plan, res = self.plan, self.cfg.resources
        table = ray.util.placement_group_table(self.pg)
        landed = [table["bundles_to_node_id"][i] for i in range(len(self.bundles))]
        if landed != [node for node, _ in self.bundles]:  # the label pins them; never trust, check
            self.teardown()
            raise PlacementError(f"the placement group landed on {landed}, not on the planned nodes")
        gpu = res.accelerator == "gpu"
        # The queue lives in rank 0's bundle: if that node goes, the job fails anyway.
        beside_rank0 = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0)
        self.queue = Queue(actor_options={"num_cpus": 0, "namespace": NAMESPACE, "scheduling_strategy": beside_rank0})
        world = self.cfg.parallel.world_size
        self.actors = [new_actor(self, f"fourfold:{self.job_id}:{r.rank}", r.rank, r.node) for r in plan.ranks]
        master = ray.get(self.actors[0].where.remote(), timeout=LAUNCH_TIMEOUT_S)["host"]
        port = ray.get(self.actors[0].open_rendezvous.remote(self.cfg.parallel.timeout_s), timeout=LAUNCH_TIMEOUT_S)
        env = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
        env.setdefault("OMP_NUM_THREADS", str(max(1, int(res.cpus_per_rank))))
        if not gpu:  # a CPU job on a GPU node must not pick up the node's GPUs
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["FOURFOLD_SNAPSHOT_OFFSET"] = str(buddy_offset(plan))  # each rank's snapshot copy on another node
        spec = spec if spec is not None else self.cfg.model_dump(mode="json", by_alias=True)
        self.launch_args = (spec, env, storage)
        self.futures = [a.run.remote(spec, master, port, env, storage) for a in self.actors]
        for node in plan.spares:
            start_spare(self, node)
        self.health = Health(world, time.monotonic(), nodes={r.rank: r.node for r in plan.ranks})

    def spares_ready(self) -> bool:
        """Whether every warm spare has finished warming up (imports, the model built on meta)."""
        refs = [ref for _, _, ref in self.spares]
        return len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs) if refs else True

    @property
    def launched(self) -> bool:
        return bool(self.futures)

    def where(self) -> list[dict[str, Any]]:
        """Each rank's node id, host and pid, as the actors report them."""
        return ray.get([a.where.remote() for a in self.actors])

    def request_stop(self, at_checkpoint: bool = False) -> None:
        """Ask every rank to stop after its current step (saving a checkpoint if configured), or
        with `at_checkpoint` after the next step that saves one on schedule."""
        self.stop_requested = True  # a rank dying now fails the job: no in-place recovery while stopping
        for a in self.actors:
            a.request_stop.remote(at_checkpoint)

    # -- watching ------------------------------------------------------------------
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
        metrics, now = [], time.monotonic()
        for event in events:
            if event["kind"] == "metrics":
                metrics.append(event["metrics"])
            elif event["kind"] == "error":
                self.errors.append(event)
            elif event["kind"] == "marks":
                self.marks[event["rank"]] = event["marks"]
            elif event["kind"] == "lost":
                self.lost[event["rank"]] = event
                self.lost_since = self.lost_since or now
            else:
                self.heartbeats[event["rank"]] = event
                self.health.record(event["rank"], event["step"], event["phase"], now)
        return metrics

    def poll(self, timeout_s: float = 0.0) -> Status:
        """New metrics and the latest heartbeats; the state once every rank returned or one failed."""
        done, _ = ray.wait(self.futures, num_returns=len(self.futures), timeout=timeout_s)
        metrics = self._drain()
        died, raised, unreachable = [], [], []
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.ActorDiedError:  # the process is gone: killed, OOM, node lost
                died.append(self.futures.index(ref))
            # A call in flight when the node's raylet died ends as ActorUnavailableError ("Socket
            # closed") before Ray marks the actor dead: the rank is gone too, its node maybe.
            except ray.exceptions.ActorUnavailableError:
                died.append(self.futures.index(ref))
                unreachable.append(self.futures.index(ref))
            except Exception as err:  # a rank raised
                raised.append((self.futures.index(ref), err))
        if metrics:
            self.recovering = False  # a step after an in-place recovery: it is over
        if died and self._in_place(died, raised, unreachable):
            try:
                record = recover(self, died)
            except RecoveryFailed as err:
                metrics += self._drain()
                cause = f"{self._cause(died, raised)}; in-place recovery failed ({err})"
                return self._status("failed", metrics, cause)
            status = self._status("running", metrics + self._drain())
            status.recovered = record
            return status
        if died or raised:
            metrics += self._drain()
            status = self._status("failed", metrics, self._cause(died, raised))
            nodes = {r.rank: r.node for r in self.plan.ranks} if self.plan else {}
            status.unreachable_nodes = tuple(sorted({nodes[r] for r in unreachable if r in nodes}))
            return status
        if self.lost_since is not None and time.monotonic() - self.lost_since > LOST_GRACE_S:
            # steps failed and no process died: an error of the job's own, which recovering in place
            # would only repeat (the waiting ranks end with the teardown)
            return self._status("failed", metrics, self._cause([], []))
        if len(done) < len(self.futures):
            return self._status("running", metrics)
        self.results = ray.get(self.futures)
        metrics += self._drain()
        return self._status("stopped" if any(r["stopped"] for r in self.results) else "succeeded", metrics)

    def _in_place(self, died: list[int], raised: list[Any], unreachable: list[int]) -> bool:
        """Whether to recover in place: asked for, only processes died (their nodes answer), some rank
        survives, the job is not stopping, and no recovery is still waiting for its first step (a failure
        then restarts the job)."""
        world = self.cfg.parallel.world_size
        return (
            self.cfg.restart.in_place and not raised and not unreachable and not self.recovering
            and not self.stop_requested and len(died) < world and self.queue is not None
        )  # fmt: skip

    def _status(self, state: str, metrics: list[dict[str, Any]], error: str | None = None) -> Status:
        return Status(state, metrics, dict(self.heartbeats), error, self.health.training, marks=dict(self.marks))

    def _cause(self, died: list[int], raised: list[tuple[int, Exception]]) -> str:
        """Why the job failed, naming the ranks and nodes: a dead process first, else the earliest error."""
        nodes = {r.rank: r.node for r in self.plan.ranks} if self.plan else {}
        if died:
            where = ", ".join(f"rank {r} on node {nodes.get(r, '?')[:12]}" for r in sorted(died))
            return f"worker process died: {where}"
        if self.errors:  # the earliest a rank reported is the cause; its peers fail after it
            first = min(self.errors, key=lambda e: e["time"])
            node = nodes.get(first["rank"], "?")[:12]
            return f"rank {first['rank']} (node {node}) raised: {_last_line(first['error'])}"
        rank, err = min(raised)  # no event arrived: the lowest rank that raised
        kind = type(getattr(err, "cause", None) or err).__name__
        return f"rank {rank} (node {nodes.get(rank, '?')[:12]}) raised: {_last_line(f'{kind}: {err}')}"

    def hang(self, timeout_s: float | None = None) -> str | None:
        """Why the job is hung (silent ranks, or no progress) after `timeout_s`
        (default restart.hang_timeout_s), or None."""
        timeout_s = self.cfg.restart.hang_timeout_s if timeout_s is None else timeout_s
        return self.health.problem(time.monotonic(), timeout_s)

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
        """Ask every rank to stop after its current step and wait for them."""
        self.request_stop()
        return self.wait(timeout_s)

    # -- ending --------------------------------------------------------------------
    def teardown(self, wait: bool = True) -> None:
        """Kill every actor and remove the placement group, then (wait=True) until Ray says they
        are gone. Safe to call more than once; one step failing (a lost node) does not skip the rest."""
        names = sorted(self.names)
        for a in [*self.actors, *(s[0] for s in self.spares)]:
            _quietly(ray.kill, a, no_restart=True)
        self.actors, self.futures, self.spares = [], [], []
        if self.queue is not None:
            _quietly(self.queue.shutdown, force=True)
            self.queue = None
        pg, self.pg = self.pg, None
        if pg is not None:
            _quietly(remove_placement_group, pg)
        self.bundles = []
        if wait:
            _wait_gone(names, [pg] if pg is not None else [])


def remove_leftovers(job_ids: list[str]) -> int:
    """Remove the actors and placement groups a previous driver left for these jobs (it died and
    Ray may not have cleaned up yet); wait until they are gone. Returns how many were found."""
    if not job_ids:
        return 0
    mine = {f"fourfold:{j}" for j in job_ids}
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].rsplit(":", 1)[0] in mine
    ]
    for name in names:
        _quietly(lambda n: ray.kill(ray.get_actor(n, namespace=NAMESPACE), no_restart=True), name)
    groups = [
        ray.util.get_placement_group(g["name"])
        for g in ray.util.placement_group_table().values()
        if g["name"] in mine and g["state"] != "REMOVED"
    ]
    for pg in groups:
        _quietly(remove_placement_group, pg)
    _wait_gone(names, groups)
    return len(names) + len(groups)


def _wait_gone(names: list[str], groups: list[Any]) -> None:
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while time.monotonic() < deadline:
        alive = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
        pending = [pg for pg in groups if _pg_state(pg) not in ("REMOVED", None)]
        if not (alive & set(names)) and not pending:
            return
        time.sleep(0.1)


def _pg_state(pg: Any) -> str | None:
    try:
        return ray.util.placement_group_table(pg).get("state")
    except Exception:
        return None


def _quietly(fn: Any, *args: Any, **kwargs: Any) -> None:
    with contextlib.suppress(Exception):  # already gone, or its node is: nothing more to remove there
        fn(*args, **kwargs)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip()[:500] if lines else "unknown error"
