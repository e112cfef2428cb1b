"""The engine at one process against a training loop written here from the docs alone.

The reference below uses none of the engine's trainer, optimizer wrapper, data stream or loss
code: only the model class (`parallel.model.Transformer`, seeded `init_weights`, so both start
from the same weights) and the token source's `sample(i)`. Everything else is what the docs
promise, written out with plain torch:

- data (docs/parallelism.md, "The data position is a global sample index"): step k (0-based)
  covers the global samples [k*G, (k+1)*G), split in order into micro-batches; a sample is a
  window of seq_len + 1 tokens, inputs the first seq_len, labels the last seq_len;
- loss (parallelism.md, "How the loss is averaged"): each micro-batch's mean token cross entropy
  divided by the number of micro-batches, backpropagated and summed (gradient accumulation);
- clipping (parallelism.md, "Gradient clipping by the global norm"): `clip_grad_norm_` to
  train.grad_clip; the reported grad_norm is the norm before clipping;
- optimizer (configuration.md `train.*`, parallelism.md "Weight decay"): `torch.optim.AdamW`,
  weight decay only on tensors with ndim >= 2, none on the (1-D) norm weights;
- LR (configuration.md): step s (1-based) warms up linearly, lr * s / warmup_steps, to lr at
  s = warmup_steps, then decays along a cosine to lr * min_lr_ratio at the last step.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/unit/test_reference.py
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.config import Config, build_config
from parallel.data import build_source
from parallel.model import Transformer

SPEC: dict[str, Any] = {
    "model": {"preset": "tiny"},
    "train": {
        "steps": 12,
        "global_batch": 8,
        "micro_batch": 2,  # 4 micro-batches per step: accumulation happens
        "seq_len": 32,
        "lr": 3e-3,
        "warmup_steps": 3,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "grad_clip": 2.5,  # between the smallest and the largest pre-clip norm of this run
        "seed": 3,
    },
    "data": {"source": "text", "path": "stdlib", "max_bytes": 1 << 18},
    "metrics": {"peak_tflops": 1.0},  # skip the start-up matmul benchmark
}
# Measured on this run: losses within 9e-8 relative (the engine sums the micro-batch losses in
# float32, this loop in float64) and weights within 1.9e-7 (the engine's global norm is summed in
# float64, clip_grad_norm_'s in float32); with grad_clip 0 the final weights are bitwise equal.
LOSS_RTOL = 1e-6  # relative, per step
WEIGHT_ATOL = 1e-6  # max abs difference, every parameter element
# The pre-clip norm on a spike step (step 9 here, norm 4.6 against 2-3) is the most rounding-sensitive
# number of the run: 1.24e-5 apart on one AMD EPYC machine, 2e-7 on the others, while the losses stayed
# within 6e-8 and the weights within 1.4e-7 on both. The clipped update it scales is what the weight bar checks.
GRAD_NORM_RTOL = 5e-5


def reference_lr(step: int, t: Any) -> float:
    if t.warmup_steps and step <= t.warmup_steps:
        return t.lr * step / t.warmup_steps
    progress = (step - t.warmup_steps) / (t.steps - t.warmup_steps)
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def reference_run(cfg: Config, **knobs: Any) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """Train as the docs describe. `knobs` break one promise each (the sensitivity test)."""
    t = cfg.train
    source = build_source(cfg.data, t.seq_len, t.seed, cfg.model.vocab_size)
    model = Transformer(cfg.model, max_seq_len=t.seq_len)
    model.init_weights(t.seed)
    decays = knobs.get("decays", lambda p: p.ndim >= 2)
    params = list(model.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if decays(p)], "weight_decay": t.weight_decay},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
        eps=t.eps,
    )
    n_micro = t.global_batch // t.micro_batch
    first_sample = knobs.get("first_sample", 0)
    history = []
    for k in range(t.steps):
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(n_micro):
            start = first_sample + k * t.global_batch + m * t.micro_batch
            windows = torch.stack([source.sample(i) for i in range(start, start + t.micro_batch)])  # (B, T+1)
            logits = model(windows[:, :-1])  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()) / n_micro
            loss.backward()
            loss_sum += loss.item()
        clip = knobs.get("grad_clip", t.grad_clip)
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        lr = knobs.get("lr_scale", 1.0) * reference_lr(k + 1, t)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        history.append({"loss": loss_sum, "grad_norm": norm.item(), "lr": lr})
    return history, {n: p.detach().clone() for n, p in model.named_parameters()}


def engine_run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """parallel.trainer.Trainer in this process (a group of one), the group destroyed afterwards."""
    from parallel.trainer import Trainer

    assert not dist.is_initialized(), "another test left a process group behind"
    try:
        trainer = Trainer(cfg)
        history = trainer.run()
        weights = trainer.full_state_dict()
        trainer.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return history, weights


def differences(ref: tuple, got: tuple) -> tuple[float, float]:
    """(largest relative loss difference over the steps, largest abs weight difference)."""
    (ref_hist, ref_w), (got_hist, got_w) = ref, got
    assert len(ref_hist) == len(got_hist) and ref_w.keys() == got_w.keys()
    loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(ref_hist, got_hist, strict=True))
    weight = max((ref_w[n] - got_w[n]).abs().max().item() for n in ref_w)
    return loss, weight


@pytest.fixture(scope="module")
def cfg() -> Config:
    return build_config(SPEC, world_size=1)


@pytest.fixture(scope="module")
def engine(cfg: Config) -> tuple:
    return engine_run(cfg)


@pytest.fixture(scope="module")
def reference(cfg: Config) -> tuple:
    return reference_run(cfg)


@pytest.mark.parametrize("run", ["reference", "engine"])
def test_the_run_exercises_warmup_decay_clipping_and_accumulation(cfg: Config, run: str, request: Any) -> None:
    """In both runs: >= 10 steps, several micro-batches per step, the LR rises to lr then falls to
    the floor, and the pre-clip gradient norm is above grad_clip on some steps and below on others."""
    hist, _ = request.getfixturevalue(run)
    t = cfg.train
    assert len(hist) >= 10 and t.global_batch // t.micro_batch > 1
    lrs = [h["lr"] for h in hist]
    peak = lrs.index(max(lrs))
    assert 0 < peak < len(lrs) - 1 and max(lrs) == pytest.approx(t.lr)
    assert all(a < b for a, b in zip(lrs[: peak + 1], lrs[1 : peak + 1], strict=False))  # rises
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :], strict=False))  # then falls
    assert lrs[-1] == pytest.approx(t.lr * t.min_lr_ratio)
    norms = [h["grad_norm"] for h in hist]
    assert sum(n > t.grad_clip for n in norms) >= 2, f"clipping should fire on some steps: {norms}"
    assert any(n < t.grad_clip for n in norms), f"and not on others: {norms}"


def test_engine_matches_reference_losses(engine: tuple, reference: tuple) -> None:
    for step, (ref, got) in enumerate(zip(reference[0], engine[0], strict=True), start=1):
        assert got["step"] == step
        assert abs(got["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), f"step {step}: {got} vs {ref}"
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12), f"step {step}: lr"
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_NORM_RTOL), f"step {step}: grad_norm"


def test_engine_matches_reference_weights(engine: tuple, reference: tuple) -> None:
    ref_w, got_w = reference[1], engine[1]
    assert ref_w.keys() == got_w.keys()
    for name, w in ref_w.items():
        diff = (w - got_w[name]).abs().max().item()
        assert diff <= WEIGHT_ATOL, f"{name}: max abs weight difference {diff:.2e} > {WEIGHT_ATOL}"


@pytest.mark.parametrize(
    "knob",
    [
        {"decays": lambda p: True},  # weight decay on the norms too
        {"grad_clip": 0.0},  # no clipping
        {"lr_scale": 1.001},  # an LR 0.1 % off
        {"first_sample": 1},  # batches one sample later
    ],
    ids=["decay-on-norms", "no-clipping", "lr-off-0.1%", "samples-shifted"],
)
def test_comparison_detects_a_broken_promise(cfg: Config, engine: tuple, knob: dict) -> None:
    """Each promise matters in this run: breaking it moves the result far past the tolerances."""
    loss, weight = differences(reference_run(cfg, **knob), engine)
    assert loss > 100 * LOSS_RTOL or weight > 100 * WEIGHT_ATOL, (loss, weight)
