"""Layout planner: predict memory, step time, tokens/s and MFU of a layout on a cluster, and search the
layouts the engine accepts for the best one. Pure arithmetic on the config: no tensors, no Ray.

    from parallel.config import build_config
    from parallel.planner import Cluster, predict, search
    cfg = build_config({"model": {"preset": "8b"}, "train": {"global_batch": 256, "micro_batch": 1,
                        "seq_len": 8192}}, world_size=64)
    for cand in search(cfg, Cluster.parse("8x8xh100-80gb"), top=3):
        print(cand.rank, cand.prediction.layout, cand.reasons)

The model and its assumptions: docs/planner.md.
"""

from parallel.planner.activations import (
    BlockSpec,
    Saved,
    activation_bytes,
    gpt_block,
    inflight,
    korthikanti_layer_bytes,
    layer_bytes,
    llama_block,
    per_layer_bytes,
)
from parallel.planner.comms import Collective, collectives, comm_bytes
from parallel.planner.hardware import ACCELERATORS, Accelerator, Cluster, accelerator, axis_links, cpu_measured
from parallel.planner.memory import memory, memory_phases, state_bytes, zero_paper_bytes
from parallel.planner.search import Candidate, layouts, min_accelerators, search
from parallel.planner.shapes import flops_per_token, local_params, total_params
from parallel.planner.timing import Prediction, bubble_fraction, bubble_time, predict

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "BlockSpec",
    "Candidate",
    "Cluster",
    "Collective",
    "Prediction",
    "Saved",
    "accelerator",
    "activation_bytes",
    "axis_links",
    "bubble_fraction",
    "bubble_time",
    "collectives",
    "comm_bytes",
    "cpu_measured",
    "flops_per_token",
    "gpt_block",
    "inflight",
    "korthikanti_layer_bytes",
    "layer_bytes",
    "layouts",
    "llama_block",
    "local_params",
    "memory",
    "memory_phases",
    "min_accelerators",
    "per_layer_bytes",
    "predict",
    "search",
    "state_bytes",
    "total_params",
    "zero_paper_bytes",
]
