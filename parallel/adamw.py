"""What the two data-parallel optimizers share (`parallel.data_parallel.ShardedAdamW` for ZeRO 0-2,
`parallel.fsdp_adamw.FSDPAdamW` for ZeRO 3): torch's AdamW built from the run's hyper-parameters, the
names of its per-element states, and loading saved states back into it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.optim import AdamW

from parallel.config import TrainConfig
from parallel.flat_layout import _local

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element states


def decays(param: nn.Parameter) -> bool:
    return param.ndim >= 2  # norms (1-D) get no weight decay


def adamw(decay: list[nn.Parameter], no_decay: list[nn.Parameter], t: TrainConfig) -> AdamW:
    """torch's AdamW with the run's hyper-parameters, weight decay on `decay` only."""
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


@torch.no_grad()
def load_local(
    opt: AdamW, params: list[nn.Parameter], owners: list[torch.Tensor], values: list[torch.Tensor],
    states: list[torch.Tensor], step: int, make: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:  # fmt: skip
    """Copy `values` into the parameters' local tensors and give each optimizer-owned tensor (in
    `owners`' order) its AdamW states from `states` (exp_avg, exp_avg_sq each), made by `make`."""
    for p, t in zip(params, values, strict=True):
        _local(p).copy_(t)
    pairs = iter(states)
    for owner in owners if states else []:
        opt.state[owner] = {"step": torch.tensor(float(step))} | {k: make(owner, next(pairs)) for k in STATE_KEYS}
