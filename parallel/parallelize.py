"""How a rank's parallel model is made: one order, the same for every layout.

    parts = build_model(cfg, stage_ids(layout.coord("pp"), cfg.parallel))   # step 1
    parallelize(parts, layout, cfg)                                          # steps 2-8
    optimizer = build_optimizer(parts, layout, cfg)

1. build on the meta device (no memory): the whole model, or with pp > 1 one stage model per
   pipeline stage this rank holds (`build_model`);
2. tensor parallel (`apply_tp`) and expert parallel (`apply_ep`), while the weights are still only
   shapes, so a rank allocates just its TP shard of each and its experts;
3. materialise (`to_empty`) and seed (`init_weights`): each rank generates every full tensor from
   (seed, name) and keeps its shard, so every layout starts from the weights one process has;
4. load pretrained weights (`model.init_from`) the same way, over the seeded ones;
5. context parallel (`apply_cp`): the attention cores and the shard's RoPE positions are set on
   the blocks before checkpointing wraps them;
6. activation checkpointing (`apply_ac`) wraps each block;
7. autocast (`apply_autocast`) of each part's forward when computing below fp32;
8. with train.compile, regional compilation (`apply_compile`): each block, as the steps above left
   it, compiled in place (under TP its attention and feed-forward);
9. ZeRO-3 (`apply_fsdp`, FSDP2), last and over all parts: it shards the parameters as the steps
   above left them (TP shards included) and gathers them around the wrapped blocks.

Steps 2-8 run part by part. ZeRO 0-2 leave the model as it is: their optimizer, which
`build_optimizer` makes next, shards the optimizer states (and at stage 2 the gradients). With
pp > 1 the trainer then hands the parts to the pipeline schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard

from parallel.activation_checkpointing import apply_ac
from parallel.config import Config
from parallel.context_parallel import apply_cp
from parallel.data_parallel import DataParallelOptimizer, ShardedAdamW
from parallel.expert_parallel import ExpertSplitOptimizer, apply_ep, is_expert_param
from parallel.fsdp_adamw import FSDPAdamW
from parallel.hf import load_hf
from parallel.mesh import Layout
from parallel.model import Transformer
from parallel.moe import moe_layers
from parallel.pipeline_parallel import build_stage_model
from parallel.tensor_parallel import apply_tp


def build_model(cfg: Config, stage_ids: list[int]) -> list[Transformer]:
    """Step 1: this rank's parts on the meta device, one per pipeline stage in `stage_ids`
    (the whole model when pp is 1)."""
    seq_len = cfg.train.seq_len
    with torch.device("meta"):
        if cfg.parallel.pp == 1:
            return [Transformer(cfg.model, max_seq_len=seq_len)]
        return [build_stage_model(cfg.model, i, cfg.parallel.stages, seq_len) for i in stage_ids]


def parallelize(parts: list[Transformer], layout: Layout, cfg: Config) -> None:
    """Steps 2-9 of the module docstring, in place, on the parts `build_model` made."""
    p = cfg.parallel
    dtype = compute_dtype(cfg, layout.device)
    if cfg.train.compile:
        # Forget what an earlier model in this process compiled: dynamo would reuse it (its guards do
        # not cover process groups), and under TP its collectives name groups that a rebuilt mesh
        # (an in-place resize, the next run of a test) no longer has.
        torch._dynamo.reset()
    if cfg.train.compile and p.tp > 1:
        # Inductor's on-disk caches hand a graph with TP's collectives to another layout with the
        # same graph but other group sizes (torch 2.13: "allgather_coalesced: invalid size of output
        # tensor"), so under TP every process compiles afresh.
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    for model in parts:
        if p.tp > 1:
            apply_tp(model, layout.mesh["tp"])
        if p.ep > 1:
            apply_ep(model, layout.expert_mesh["ep"])
        model.to_empty(device=layout.device)
        model.init_weights(cfg.train.seed)
        if cfg.model.init_from:
            load_hf([model], cfg.model.init_from, cfg.model)
        if p.cp > 1:
            apply_cp(model, layout.group("cp"), cfg.train.seq_len, p.cp_mode)
        apply_ac(model, p.activation_checkpointing)
        if dtype != torch.float32:
            apply_autocast(model, layout.device.type, dtype)
        if cfg.train.compile:
            apply_compile(model, sublayers=p.tp > 1)
    if p.zero == 3:
        # Under pipelining, blocks stay gathered from forward to the end of the step (apply_fsdp).
        experts = (layout.expert_dp_mesh, p.dp) if p.ep > 1 else None
        apply_fsdp(parts, layout.dp_mesh, reshard_after_forward=p.pp == 1, experts=experts)


def build_optimizer(
    parts: list[nn.Module], layout: Layout, cfg: Config
) -> DataParallelOptimizer | ExpertSplitOptimizer:
    """The optimizer of the parts `parallelize` made: on FSDP2's shards for ZeRO 3, else on the
    elements of the flat vector this rank owns."""
    named = [(n, q) for part in parts for n, q in part.named_parameters() if q.requires_grad]
    if cfg.parallel.ep == 1:
        return _dp_optimizer([q for _, q in named], layout, cfg)
    dense = _dp_optimizer([q for n, q in named if not is_expert_param(n)], layout, cfg)
    return ExpertSplitOptimizer(dense, _expert_optimizer([q for n, q in named if is_expert_param(n)], layout, cfg))


def _expert_optimizer(params: list[nn.Parameter], layout: Layout, cfg: Config) -> DataParallelOptimizer:
    """The experts' optimizer under expert parallelism: their gradients hold the tokens of the whole ep
    group, so they are reduced over the ranks holding the same experts (edp, dp_replicate, cp) and divided
    by all dp x cp ranks; ZeRO shards them over edp; the norm adds up over ep (other experts)."""
    p = cfg.parallel
    if p.zero == 3:  # apply_fsdp sharded them over the expert dp mesh, dividing by dp
        return FSDPAdamW(params, layout.group("cp"), norm_groups=layout.groups("pp"), train=cfg.train)
    shards = [layout.expert_group("edp")] if p.zero >= 1 else []
    norm = [layout.expert_group("ep"), *shards, *layout.groups("tp", "pp")]
    return ShardedAdamW(
        params, p.zero, shard_group=layout.expert_group("edp"), replicate_groups=layout.groups("dp_replicate", "cp"),
        norm_groups=[g for g in norm if g is not None], tp=p.tp, train=cfg.train, grad_divisor=p.dp * p.cp,
    )  # fmt: skip


def _dp_optimizer(params: list[nn.Parameter], layout: Layout, cfg: Config) -> DataParallelOptimizer:
    p = cfg.parallel
    if p.zero == 3:
        return FSDPAdamW(params, layout.group("cp"), norm_groups=layout.groups("pp"), train=cfg.train)
    # The squared norm adds up over disjoint pieces: tp shards and pipeline stages
    # always, dp_shard slices from stage 1 on (stage 0 keeps whole gradients everywhere).
    norm_axes = ("tp", "pp") if p.zero == 0 else ("dp_shard", "tp", "pp")
    return ShardedAdamW(
        params,
        p.zero,
        shard_group=layout.group("dp_shard"),
        replicate_groups=layout.groups("dp_replicate", "cp"),
        norm_groups=layout.groups(*norm_axes),
        tp=p.tp,
        train=cfg.train,
        overlap=p.pp == 1 and p.tp == 1,  # backward is the trainer's own and gradients are plain tensors
        bucket_bytes=int(p.bucket_mb * 2**20),
    )


def apply_compile(model: Transformer, sublayers: bool = False) -> None:
    """Regional compilation, as the leading trainers do it: `torch.compile` each transformer block in
    place (`Module.compile` keeps the module, its parameter names and room for the hooks ZeRO-3 adds
    after). The blocks share one structure, so the graph compiled for the first serves every block;
    the embedding, the final norm and the output stay eager. What the block holds is compiled with
    it: the CP attention core, activation checkpointing's recomputation.

    sublayers=True (tensor parallel) compiles each block's attention and feed-forward instead, with
    TP's input and output redistributions (their module hooks): a whole compiled block under
    sequence parallelism hands its DTensor input's gradient back as a plain tensor, and the
    redistribution before it fails in backward (torch 2.13). The norms and residual adds between
    them, on sequence shards, stay eager."""
    for block in model.layers.values():
        if sublayers:
            block.attention.compile()
            block.feed_forward.compile()
        else:
            block.compile()


def compile_seconds() -> float:
    """Seconds torch.compile has spent in this process so far (0.0 where torch does not say)."""
    try:
        from torch._dynamo.utils import calculate_time_spent  # no public counter in torch 2.13

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except (ImportError, AttributeError):
        return 0.0


def apply_autocast(model: torch.nn.Module, device_type: str, dtype: torch.dtype) -> None:
    """Run the model's forward (only the forward) under autocast: matmuls in `dtype`, weights and
    optimizer in fp32. Set on the module itself so pipeline stages, which call it from the
    schedule, get it too; backward then follows the dtypes the forward used."""
    inner = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type, dtype=dtype):
            return inner(*args, **kwargs)

    model.forward = forward


def apply_fsdp(
    parts: list[nn.Module], dp_mesh: DeviceMesh, reshard_after_forward: bool = True,
    experts: tuple[DeviceMesh, int] | None = None,
) -> None:  # fmt: skip
    """ZeRO-3: FSDP2 `fully_shard` on every block, then on each part's root, over the dp mesh.

    experts=(mesh, dp): under expert parallelism each MoE block's experts are sharded first, on their
    own, over the ranks holding the same experts (`mesh`), their gradients divided by all `dp` ranks.

    reshard_after_forward=False keeps each block's gathered parameters from its forward until
    the end of the step; `parallelize` sets it under pipelining. There it saves an all-gather per
    micro-batch, and the zero-bubble schedule needs it to be right: its split backward finds the
    weights by `stage.submod.parameters()`, which after a resharding forward are the sharded
    parameters, not the gathered ones the autograd graph used. The deferred weight-gradient pass
    then leaves every stage but the first with wrong gradients (grad norm 0.80 instead of 0.90 on
    the tiny model at pp=2, dp=2)."""
    for model in parts:
        blocks = list(model.layers.values())
        for moe in moe_layers(model) if experts is not None else []:
            fully_shard(moe.experts, mesh=experts[0], reshard_after_forward=reshard_after_forward)
            moe.experts.set_gradient_divide_factor(float(experts[1]))
            # gloo has no PREMUL_SUM: reduce with SUM and divide apart. Not on a one-rank shard axis, where
            # torch 2.13 would divide twice (its copy-instead-of-reduce-scatter path divides already).
            if experts[0].size(experts[0].ndim - 1) > 1:
                moe.experts.set_force_sum_reduction_for_comms(True)
        for block in blocks:
            fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
        # Explicit prefetch: each block starts the next one's all-gather (the one before it in
        # backward) before its own compute, so the transfer overlaps it. Without it, a block's
        # all-gather starts only when the block is called: on CPU (no CUDA streams) nothing overlaps.
        for before, after in zip(blocks, blocks[1:], strict=False):
            before.set_modules_to_forward_prefetch([after])
            after.set_modules_to_backward_prefetch([before])


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: train.dtype, or with `auto` bf16 on CUDA and fp32 on CPU."""
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.train.dtype)
