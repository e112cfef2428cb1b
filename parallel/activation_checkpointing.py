"""Activation checkpointing, applied to a built model from outside.

`full` keeps only each block's input and recomputes the whole block in backward.
`selective` keeps the outputs of the expensive ops (matmuls and attention) and
recomputes the cheap element-wise ones (norms, SiLU, RoPE, residual adds), which
saves most of the activation memory for a few percent of recompute.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.model import Transformer

_aten = torch.ops.aten
_SAVED_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_cudnn_attention.default,
}


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:  # noqa: ANN001 (torch's callback signature)
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_ac(model: Transformer, mode: str) -> None:
    """Wrap every block in place; mode is none | full | selective."""
    if mode == "none":
        return
    for key, block in list(model.layers.items()):
        if mode == "full":
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            context_fn = partial(create_selective_checkpoint_contexts, _policy)
            model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)
