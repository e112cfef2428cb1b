"""Accelerators, clusters, and which link each mesh axis uses once the workers place the ranks.

Bandwidths are per device and per direction, in bytes per second; memory in bytes; peaks are dense
(no 2:4 sparsity) TFLOP/s per dtype. Every number can be overridden: make your own `Accelerator`
(`dataclasses.replace(ACCELERATORS["h100-80gb"], inter_gbps=25)`), or give `Cluster` explicit
`intra_bw` / `inter_bw`.

    python -c "from parallel.planner import Cluster; print(Cluster.parse('8x8xh100-80gb'))"
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Literal

from parallel.config import ParallelConfig

GiB = 2**30
MiB = 2**20
GB = 10**9


@dataclass(frozen=True)
class Accelerator:
    """One device: memory, dense peak per dtype, memory and link bandwidths, and what the runtime takes."""

    name: str
    kind: Literal["gpu", "tpu", "cpu"]
    memory_bytes: int
    """Device memory as the driver reports it (nvidia-smi's total), before anything is allocated."""
    peak_tflops: dict[str, float | None] = field(compare=False)
    """Dense peak TFLOP/s by dtype key: bf16, fp16, tf32, fp32 (None: no native matrix peak)."""
    hbm_gbps: float
    """Memory bandwidth, GB/s: what bounds the optimizer step (AdamW is elementwise)."""
    intra_gbps: float
    """Per-device, per-direction bandwidth to a peer in the same node, GB/s (NVLink, ICI)."""
    inter_gbps: float
    """Per-device, per-direction bandwidth to a peer on another node, GB/s (the device's NIC share)."""
    per_node: int
    """Devices in one node by default (8 in an HGX/DGX board)."""
    runtime_bytes: int
    """Memory a rank loses before the model: CUDA context, cuBLAS/cuDNN workspaces, NCCL communicators
    for up to five mesh axes, allocator slack. A stated constant, not a measurement."""
    latency_s: tuple[float, float] = (10e-6, 25e-6)
    """Seconds per ring step of a collective (or per point-to-point message), inside and between nodes."""
    source: str = ""


# Datasheet figures. Peaks agree with parallel/flops.py's table (tested); link figures are the nominal
# per-direction rates: NVLink 4 is 900 GB/s bidirectional per H100/H200 (450 each way), NVLink 3 600 GB/s
# (A100), NVLink 5 1.8 TB/s (B200); between nodes one 400 Gb/s NIC per GPU (ConnectX-7, 50 GB/s), 200 Gb/s
# HDR on A100 systems (25 GB/s). TPU v5p: 4,800 Gb/s of ICI per chip over six links; a ring along one torus
# axis uses two of them, so 100 GB/s each way, the same inside a 4-chip host as across the pod.
ACCELERATORS: dict[str, Accelerator] = {
    "h100-80gb": Accelerator(
        "H100 SXM 80GB",
        "gpu",
        81559 * MiB,
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
        hbm_gbps=3350,
        intra_gbps=450,
        inter_gbps=50,
        per_node=8,
        runtime_bytes=4 * GiB,
        source="NVIDIA H100 datasheet (SXM5), dense",
    ),
    "h200-141gb": Accelerator(
        "H200 SXM 141GB",
        "gpu",
        143771 * MiB,
        {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 67.0},
        hbm_gbps=4800,
        intra_gbps=450,
        inter_gbps=50,
        per_node=8,
        runtime_bytes=4 * GiB,
        source="NVIDIA H200 datasheet (SXM), dense",
    ),
    "a100-80gb": Accelerator(
        "A100 SXM 80GB",
        "gpu",
        81920 * MiB,
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        hbm_gbps=2039,
        intra_gbps=300,
        inter_gbps=25,
        per_node=8,
        runtime_bytes=4 * GiB,
        source="NVIDIA A100 datasheet (SXM4 80GB), dense",
    ),
    "a100-40gb": Accelerator(
        "A100 SXM 40GB",
        "gpu",
        40960 * MiB,
        {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
        hbm_gbps=1555,
        intra_gbps=300,
        inter_gbps=25,
        per_node=8,
        runtime_bytes=4 * GiB,
        source="NVIDIA A100 datasheet (SXM4 40GB), dense",
    ),
    "b200-180gb": Accelerator(
        "B200 180GB",
        "gpu",
        183359 * MiB,
        {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
        hbm_gbps=8000,
        intra_gbps=900,
        inter_gbps=50,
        per_node=8,
        runtime_bytes=4 * GiB,
        source="NVIDIA HGX B200 datasheet, dense (sparse figures halved); fp32 approximate",
    ),
    "tpu-v5p": Accelerator(
        "TPU v5p",
        "tpu",
        95 * GB,
        {"bf16": 459.0, "fp16": None, "tf32": None, "fp32": None},
        hbm_gbps=2765,
        intra_gbps=100,
        inter_gbps=100,
        per_node=4,
        runtime_bytes=1 * GiB,
        latency_s=(5e-6, 5e-6),
        source="Google Cloud TPU v5p system architecture page; for comparison only",
    ),
}
ALIASES = {"h100": "h100-80gb", "h200": "h200-141gb", "a100": "a100-80gb", "b200": "b200-180gb", "v5p": "tpu-v5p"}


CPU_LATENCY_S = 1e-3
"""Seconds per collective hop on CPU ranks: gloo over loopback plus torch's dispatch around it (DTensor's
redistribution for tp). bench/planner_bench.py profiled tp=2 on this machine at about 3 ms per tp
collective in all (its wait and the DTensor dispatch); 1 ms per hop is the stated middle."""


def cpu_measured(
    tflops: float | None = None,
    memory_bytes: int | None = None,
    link_gbps: float = 1.0,
    per_node: int | None = None,
    threads: int = 1,
    latency_s: float = CPU_LATENCY_S,
) -> Accelerator:
    """This machine's CPU as an accelerator: `tflops` as measured (by default a matmul measured now with
    `parallel.flops.measure_cpu_matmul_tflops` at `threads` threads, a rank's own: ranks run one thread
    each unless resources.cpus_per_rank gives more; the trainer's MFU measures the same way), its
    physical memory, and gloo over loopback TCP for both links (`link_gbps` and `latency_s`, stated
    guesses: measure and pass them)."""
    if tflops is None:
        from parallel.flops import measure_cpu_matmul_tflops  # torch only when asked to measure

        tflops = measure_cpu_matmul_tflops(threads=threads)
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Accelerator(
        "CPU (measured)", "cpu", int(memory_bytes), {"bf16": tflops, "fp16": tflops, "tf32": tflops, "fp32": tflops},
        hbm_gbps=10.0, intra_gbps=link_gbps, inter_gbps=link_gbps, per_node=per_node or (os.cpu_count() or 1),
        runtime_bytes=512 * MiB, latency_s=(latency_s, latency_s), source="measured on this machine",
    )  # fmt: skip


def accelerator(name: str) -> Accelerator:
    """The table entry for a key or alias (case-insensitive); `cpu` measures this machine."""
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return cpu_measured()
    if key not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; known: {', '.join([*ACCELERATORS, 'cpu'])}")
    return ACCELERATORS[key]


@dataclass(frozen=True)
class Cluster:
    """`nodes` nodes of `per_node` identical accelerators; bandwidths in bytes/s (None: the accelerator's)."""

    nodes: int
    per_node: int
    accelerator: Accelerator
    intra_bw: float | None = None
    inter_bw: float | None = None

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.per_node < 1:
            raise ValueError(f"a cluster needs at least one node and one device per node, got {self}")

    @property
    def world(self) -> int:
        return self.nodes * self.per_node

    def bandwidth(self, link: str) -> float:
        """Bytes/s per device per direction over `intra` or `inter` links."""
        if link == "intra":
            return self.intra_bw if self.intra_bw is not None else self.accelerator.intra_gbps * GB
        return self.inter_bw if self.inter_bw is not None else self.accelerator.inter_gbps * GB

    def latency(self, link: str) -> float:
        return self.accelerator.latency_s[0 if link == "intra" else 1]

    @classmethod
    def parse(cls, text: str, accelerators: dict[str, Accelerator] | None = None) -> Cluster:
        """`NODESxPER_NODExACCEL` ("8x8xh100-80gb"), `PER_NODExACCEL` (one node) or `ACCEL` (one node of
        its default size). `accelerators` adds or overrides table entries (a cluster's own numbers)."""
        table = {**ACCELERATORS, **(accelerators or {})}
        m = re.fullmatch(r"\s*(?:(\d+)x)?(?:(\d+)x)?([A-Za-z][\w.-]*)\s*", text)
        if not m:
            raise ValueError(f"cluster {text!r}: expected NODESxPER_NODExACCELERATOR, e.g. 8x8xh100-80gb")
        first, second, name = m.groups()
        key = ALIASES.get(name.lower(), name.lower())
        acc = table[key] if key in table else accelerator(key)
        if second is not None:
            nodes, per_node = int(first), int(second)
        elif first is not None:
            nodes, per_node = 1, int(first)
        else:
            nodes, per_node = 1, acc.per_node
        return cls(nodes, per_node, acc)

    def __str__(self) -> str:
        return f"{self.nodes}x{self.per_node}x{self.accelerator.name}"


# -- where ranks land: the rule of workers/placement.py, restated (parallel/ may not import workers/) --------


def node_of_ranks(p: ParallelConfig, nodes: int, per_node: int) -> list[int] | None:
    """Node index of every global rank as `workers.placement.make_plan` assigns them on `nodes` equal
    nodes (None when the layout cannot be placed). Blocks of consecutive ranks that must share a node
    (tp x cp when every one fits that way, else tp) go round-robin to the next node with room."""
    world = p.world_size
    if p.tp > per_node or world > nodes * per_node:
        return None
    wanted = [p.tp * p.cp * p.ep, p.tp * p.cp, p.tp]  # the ep group, the tp x cp block, the tp group
    blocks = [b for i, b in enumerate(wanted) if b <= per_node and b not in wanted[i + 1 :]] or [p.tp]
    for block in blocks:
        free, out, cursor = [per_node] * nodes, [], 0
        for _start in range(0, world, block):
            for i in range(nodes):
                node = (cursor + i) % nodes
                if free[node] >= block:
                    break
            else:
                break  # this block size leaves a block without a node: try the smaller one
            cursor = (node + 1) % nodes
            free[node] -= block
            out.extend([node] * block)
        if len(out) == world:
            return out
    return None


AXES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def axis_sizes(p: ParallelConfig) -> dict[str, int]:
    return {"pp": p.pp, "dp_replicate": p.dp_replicate, "dp_shard": p.dp_shard, "cp": p.cp, "tp": p.tp}


def axis_links(p: ParallelConfig, cluster: Cluster) -> dict[str, str]:
    """For each mesh axis of more than one rank: "intra" when every group of that axis sits on one node
    once placed, else "inter" (a ring through a node boundary runs at the slower link's rate)."""
    placed = node_of_ranks(p, cluster.nodes, cluster.per_node)
    sizes = axis_sizes(p)
    if placed is None:  # not placeable: assume the worst
        return {a: "inter" for a in AXES if sizes[a] > 1} | ({"ep": "inter"} if p.ep > 1 else {})
    shape = [sizes[a] for a in AXES]
    strides = [0] * len(shape)
    acc = 1
    for i in reversed(range(len(shape))):
        strides[i] = acc
        acc *= shape[i]
    links = {}
    for i, axis in enumerate(AXES):
        if shape[i] == 1:
            continue
        spans = False
        for rank in range(len(placed)):
            if (rank // strides[i]) % shape[i]:
                continue  # visit each group once, from its member with coordinate 0 on this axis
            first = placed[rank]
            if any(placed[rank + j * strides[i]] != first for j in range(1, shape[i])):
                spans = True
                break
        links[axis] = "inter" if spans else "intra"
    if p.ep > 1:  # an ep group: ep consecutive dp_shard coordinates, each a tp x cp block of ranks
        block = p.ep * p.cp * p.tp
        spans = any(len(set(placed[r : r + block])) > 1 for r in range(0, len(placed), block))
        links["ep"] = "inter" if spans else "intra"
    return links
