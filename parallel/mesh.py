"""The rank grid: one DeviceMesh with axes (pp, dp_replicate, dp_shard, cp, tp), tp fastest.

Because tp varies fastest, a TP group is a run of consecutive ranks, which the
Ray placement keeps on one node. The mesh is built once and passed around as a
`Layout` object; nothing here is global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as C10dBackend
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig

AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def init_distributed(timeout_s: float, store: dist.Store | None = None) -> torch.device:
    """Join the process group torchrun (or a Ray worker) described in the environment.

    `store`: a rendezvous store this rank already holds (rank 0 under Ray opens it on a port
    of its own choosing, so no other process can take the port first); RANK and WORLD_SIZE
    still come from the environment. Without RANK/WORLD_SIZE this is a single process: a
    group of one on an in-memory store, so the same code path runs with or without a launcher."""
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = timedelta(seconds=timeout_s)
        if store is not None:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        elif "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


@dataclass
class Layout:
    """The mesh and this rank's place in it."""

    mesh: DeviceMesh
    cfg: ParallelConfig
    device: torch.device  # this rank's device, where its model lives
    # With ep > 1, the same grid with dp_shard split into (edp, ep), ep fastest: an expert-parallel
    # group is ep consecutive dp_shard ranks, and the edp ranks (ep apart) hold the same experts.
    expert_mesh: DeviceMesh | None = None

    @classmethod
    def build(cls, cfg: ParallelConfig, device: torch.device) -> Layout:
        shape = (cfg.pp, cfg.dp_replicate, cfg.dp_shard, cfg.cp, cfg.tp)
        # Every axis's group gets parallel.timeout_s: without options, torch creates the
        # sub-groups (any axis smaller than the world) with its own default (30 min on gloo).
        backend = dist.get_backend()
        options = C10dBackend.Options(backend, timeout=timedelta(seconds=cfg.timeout_s))
        override = {axis: (backend, options) for axis, n in zip(AXES, shape, strict=True) if n > 1}
        mesh = init_device_mesh(device.type, shape, mesh_dim_names=AXES, backend_override=override or None)
        expert_mesh = None
        if cfg.ep > 1:  # a view of the same ranks: the model's DTensors keep one root mesh (FSDP2 needs it)
            sizes = (cfg.dp_shard // cfg.ep, cfg.ep)
            split = {axis: (backend, options) for axis, n in zip(("edp", "ep"), sizes, strict=True) if n > 1}
            expert_mesh = mesh._unflatten("dp_shard", sizes, ("edp", "ep"), backend_override=split)
        return cls(mesh, cfg, device, expert_mesh)

    def timeout(self, axis: str) -> timedelta | None:
        """The timeout of the axis's process group (what a stalled peer costs), None for a one-rank axis."""
        group = self.group(axis)
        if group is None:
            return None
        return group._get_backend(torch.device(self.mesh.device_type)).options._timeout

    def size(self, axis: str) -> int:
        return self.mesh[axis].size()

    def expert_group(self, axis: str) -> dist.ProcessGroup | None:
        """The group along `ep` (ranks holding different experts) or `edp` (ranks holding the same
        experts, within a dp_replicate replica); None when the axis has one rank."""
        if self.expert_mesh is None or self.expert_mesh[axis].size() == 1:
            return None
        return self.expert_mesh[axis].get_group()

    @property
    def expert_dp_mesh(self) -> DeviceMesh:
        """What FSDP shards the experts over: the ranks holding the same experts (edp, and dp_replicate
        for HSDP)."""
        assert self.expert_mesh is not None
        return self.expert_mesh["dp_replicate", "edp"] if self.cfg.dp_replicate > 1 else self.expert_mesh["edp"]

    def coord(self, axis: str) -> int:
        return self.mesh[axis].get_local_rank()

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """The process group along one axis, or None when the axis has one rank."""
        return self.mesh[axis].get_group() if self.size(axis) > 1 else None

    @property
    def dp_rank(self) -> int:
        """Index among all data-parallel ranks (replicate-major)."""
        return self.coord("dp_replicate") * self.size("dp_shard") + self.coord("dp_shard")

    @property
    def dp_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards over: dp_shard, or (dp_replicate, dp_shard) for HSDP."""
        return self.mesh["dp_replicate", "dp_shard"] if self.cfg.dp_replicate > 1 else self.mesh["dp_shard"]

    def groups(self, *axes: str) -> list[dist.ProcessGroup]:
        return [g for g in (self.group(a) for a in axes) if g is not None]
