"""Tensor parallelism with sequence parallelism, on torch's DTensor `parallelize_module`.

Between blocks the residual stream is split along the sequence (Shard(1)) so
norms and residual adds run on T/tp tokens per rank. Each block all-gathers the
sequence before its column-parallel projections (wq, wk, wv, w1, w3, split by
output features, i.e. by heads) and reduce-scatters back to sequence shards after
its row-parallel projections (wo, w2). The embedding is split by vocabulary rows
and the output head by vocabulary columns; its logits stay sharded over the
vocabulary and the cross entropy is computed in that form (`loss_parallel`), so
no rank ever holds the (B, T, V) logits whole.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from parallel.model import Transformer
from parallel.moe import MoE


def apply_tp(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Shard `model` in place over the tp mesh axis. Call before weights are initialised."""
    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        top["norm"] = SequenceParallel()
    if model.output is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)

    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
        }
        if isinstance(block.feed_forward, MoE):
            # Experts are kept whole on every tp rank (not split by tp): the block's tokens are gathered
            # whole, every tp rank routes and computes all of them alike (router, shared and routed
            # experts as plain tensors), and each keeps its sequence shard of the output.
            plan["feed_forward"] = PrepareModuleInputOutput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_input=True,
                output_layouts=(Replicate(),), desired_output_layouts=(Shard(1),),
            )  # fmt: skip
        else:
            plan |= {
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                "feed_forward.w1": ColwiseParallel(),
                "feed_forward.w3": ColwiseParallel(),
                "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            }
        parallelize_module(block, tp_mesh, plan)


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Where the loss is computed on vocabulary-sharded logits (tp > 1)."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


def is_tp_sharded(param: nn.Parameter) -> bool:
    """True when the parameter's local tensor holds only a slice over the tp axis."""
    placements = getattr(param, "placements", ())
    names = param.device_mesh.mesh_dim_names or () if placements else ()
    # Only the tp axis counts: expert weights are DTensors sharded over ep (parallel/expert_parallel.py).
    return any(isinstance(p, Shard) and name == "tp" for p, name in zip(placements, names, strict=False))
