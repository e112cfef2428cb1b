"""Parameter and FLOP counts of the model, accelerator peaks, and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s per device / peak FLOP/s of that device, where "model FLOPs" are the
FLOPs the model needs per token by formula (`flops_per_token`), independent of how the engine
executes them: recomputation under activation checkpointing, padding or redundant work are not
credited. The peak comes from `metrics.peak_tflops` when set, else from a table of datasheet dense
numbers by accelerator name on GPU, else from a square matmul measured once at start-up on CPU.

    python -c "from parallel import flops, config; print(flops.param_count(config.ModelConfig(preset='8b')))"
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch

from parallel.config import ModelConfig

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "achieved_tflops",
    "flops_per_token",
    "flops_per_token_terms",
    "match_accelerator",
    "measure_cpu_matmul_tflops",
    "mfu",
    "param_count",
    "peak_tflops",
    "table_peak_tflops",
]


def param_count(model: ModelConfig, include_embedding: bool = True, active: bool = False) -> int:
    """Exact number of parameters of the Llama-style decoder described by `model`.

    Token embedding (vocab x dim); per block two RMSNorm weights (dim each), wq (dim -> n_heads*head_dim),
    wk and wv (dim -> n_kv_heads*head_dim), wo (n_heads*head_dim -> dim), SwiGLU w1, w3 (dim -> ffn_dim)
    and w2 (ffn_dim -> dim), no biases; a final RMSNorm (dim) and an untied output head (dim -> vocab).
    An MoE block (`model.moe`) has instead a router (dim -> n_experts), n_experts SwiGLU experts of
    expert_ffn_dim and, with shared experts, one SwiGLU of n_shared_experts * expert_ffn_dim.
    `include_embedding=False` leaves out only the input embedding table; the output head still counts.
    `active=True` counts what one token uses: top_k of the routed experts (the rest are in memory, idle).
    """
    d, v, f = model.dim, model.vocab_size, model.ffn_dim
    q = model.n_heads * model.head_dim
    kv = model.n_kv_heads * model.head_dim
    attention = 2 * d + d * q + 2 * d * kv + q * d
    total = model.n_layers * (attention + 3 * d * f) + d + d * v
    moe = model.moe
    if moe is not None and moe.expert_ffn_dim is not None:
        routed = moe.top_k if active else moe.n_experts
        per_moe = d * moe.n_experts + 3 * d * moe.expert_ffn_dim * (routed + moe.n_shared_experts)
        total += len(moe.moe_layers(model.n_layers)) * (per_moe - 3 * d * f)  # in place of the dense MLP
    if include_embedding:
        total += v * d
    return total


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6*N + 12*L*D*S.

    Weights: every parameter outside the embedding table is used once per token in a matmul, one
    multiply and one add = 2 FLOPs forward; backward computes the gradient with respect to the input
    and with respect to the weight, 2 FLOPs each, so 6 FLOPs per parameter per token in all. N is
    `param_count(model, include_embedding=False, active=True)`: the input embedding is a table lookup with
    no matmul, and of a mixture-of-experts block only the top_k experts a token goes to compute on it,
    while the output head is a real matmul and counts. (The RMSNorm weights are in N too; they are a
    negligible dim*(2L+1) parameters.)

    Attention: the score matmul QK^T and the value matmul AV depend on the sequence, not on weights, so
    they are not in N. For one token in one layer, its query (all heads together: D = n_heads*head_dim
    values) is dotted with S keys, 2*S*D FLOPs, and its S attention weights combine S value vectors of
    the same total width, another 2*S*D; with grouped-query attention the key/value heads are shared but
    the work is per query head, so D is the query width. Forward 4*S*D, times 3 for forward + backward
    gives 12*S*D per layer and 12*L*D*S per token. This counts the full S x S score matrix, as if there
    were no causal mask (the convention of the PaLM paper's MFU); a kernel that skips masked blocks does
    about half of this, so MFU by this formula may read slightly high for short-sequence-heavy work.
    Softmax, norms, RoPE, activations and the loss are elementwise and left out.
    """
    weights, attention = flops_per_token_terms(model, seq_len)
    return weights + attention


def flops_per_token_terms(model: ModelConfig, seq_len: int) -> tuple[float, float]:
    """The two terms of `flops_per_token`, `(weights, attention)` = `(6*N, 12*L*D*S)`; they sum to it."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    n = param_count(model, include_embedding=False, active=True)  # a token's matmuls: its top_k experts
    d_attn = model.n_heads * model.head_dim
    return float(6 * n), float(12 * model.n_layers * d_attn * seq_len)


@dataclass(frozen=True)
class Accelerator:
    """Peak dense TFLOP/s of one device (no 2:4 sparsity), from the vendor datasheet.

    `None` marks a dtype without native matrix-unit support (bf16 on V100/T4, tf32 before Ampere):
    no peak is given for it rather than a misleading one.
    """

    name: str
    pattern: str
    """Regular expression (case-insensitive) searched in `torch.cuda.get_device_name()`."""
    bf16: float | None
    fp16: float | None
    tf32: float | None
    fp32: float
    """Non-tensor-core FP32 (what float32 matmuls reach with TF32 off); FP32 matrix cores on MI300X."""


# Order matters: the first pattern that matches wins, so more specific names come first (H100 PCIe
# before H100, A100 before A10, L40S before L40 before L4). Numbers are the datasheet "dense" column,
# i.e. the sparsity figures halved. The A10G (an AWS-only part) has no NVIDIA datasheet; its numbers
# are the ones published for AWS G5 instances (tensor cores at half the A10 rate).
ACCELERATORS: tuple[Accelerator, ...] = (
    Accelerator("GH200", r"\bGH200\b", bf16=989.4, fp16=989.4, tf32=494.7, fp32=67.0),
    Accelerator("H200 NVL", r"\bH200\b.*\bNVL\b", bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0),
    Accelerator("H200", r"\bH200\b", bf16=989.4, fp16=989.4, tf32=494.7, fp32=67.0),
    Accelerator("H100 PCIe", r"\bH100\b.*\bPCIe\b", bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.0),
    Accelerator("H100 NVL", r"\bH100\b.*\bNVL\b", bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0),
    Accelerator("H100 SXM", r"\bH100\b", bf16=989.4, fp16=989.4, tf32=494.7, fp32=67.0),
    Accelerator("A100 80GB", r"\bA100\b.*\b80\s*GB\b", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
    Accelerator("A100 40GB", r"\bA100\b", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5),
    Accelerator("A10G", r"\bA10G\b", bf16=70.0, fp16=70.0, tf32=35.0, fp32=31.52),
    Accelerator("A10", r"\bA10\b", bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2),
    Accelerator("L40S", r"\bL40S\b", bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6),
    Accelerator("L40", r"\bL40\b", bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5),
    Accelerator("L4", r"\bL4\b", bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3),
    Accelerator("V100S PCIe", r"\bV100S\b", bf16=None, fp16=130.0, tf32=None, fp32=16.4),
    Accelerator("V100 PCIe", r"\bV100\b.*\bPCIe\b", bf16=None, fp16=112.0, tf32=None, fp32=14.0),
    Accelerator("V100 SXM2", r"\bV100\b", bf16=None, fp16=125.0, tf32=None, fp32=15.7),
    Accelerator("T4", r"\bT4\b", bf16=None, fp16=65.0, tf32=None, fp32=8.1),
    Accelerator("MI325X", r"\bMI325X\b", bf16=1307.4, fp16=1307.4, tf32=653.7, fp32=163.4),
    Accelerator("MI300X", r"\bMI300X\b", bf16=1307.4, fp16=1307.4, tf32=653.7, fp32=163.4),
)

_COMPILED = tuple((re.compile(a.pattern, re.IGNORECASE), a) for a in ACCELERATORS)


def match_accelerator(device_name: str) -> Accelerator | None:
    """The table entry for a `torch.cuda.get_device_name()` string, or None when unknown.

    For example "NVIDIA H100 80GB HBM3" -> H100 SXM, "NVIDIA A100-SXM4-80GB" -> A100 80GB,
    "Tesla V100-SXM2-16GB" -> V100 SXM2, "AMD Instinct MI300X" -> MI300X.
    """
    for pattern, acc in _COMPILED:
        if pattern.search(device_name):
            return acc
    return None


def _cuda_fp32_uses_tf32() -> bool:
    """Whether float32 matmuls on CUDA run on TF32 tensor cores under the current torch settings."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)  # the newer API; "none" defers to the global one
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


def _dtype_key(dtype: torch.dtype, tf32: bool | None) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32:
        return "tf32" if (_cuda_fp32_uses_tf32() if tf32 is None else tf32) else "fp32"
    raise ValueError(f"no peak FLOP/s for dtype {dtype}; use bfloat16, float16 or float32")


def table_peak_tflops(device_name: str, dtype: torch.dtype, tf32: bool | None = None) -> tuple[float, str]:
    """Peak dense TFLOP/s of one device from the table, and a description such as "table: H100 SXM bf16".

    For float32 the TF32 tensor-core peak applies when TF32 matmuls are on (`tf32`, by default read from
    torch's CUDA matmul precision setting), else the plain FP32 peak. Raises ValueError, telling the user
    to set metrics.peak_tflops, for an unknown device or a dtype the device has no native peak for.
    """
    acc = match_accelerator(device_name)
    if acc is None:
        raise ValueError(
            f"unknown accelerator {device_name!r}: no peak FLOP/s in the table; "
            "set metrics.peak_tflops to its dense peak TFLOP/s for this dtype"
        )
    key = _dtype_key(dtype, tf32)
    value = getattr(acc, key)
    if value is None:
        raise ValueError(
            f"{device_name!r} ({acc.name}) has no native {key} matrix peak in the table; "
            "set metrics.peak_tflops to the peak TFLOP/s you want MFU measured against"
        )
    return float(value), f"table: {acc.name} {key}"


def measure_cpu_matmul_tflops(
    size: int = 1024, seconds: float = 0.5, dtype: torch.dtype = torch.float32, threads: int | None = None
) -> float:
    """Achieved TFLOP/s of repeated `size` x `size` matmuls on the CPU with the current thread setting, or
    with `threads` intra-op threads (restored after): a rank's peak is at the rank's thread count.

    Warms up first (thread pool, caches, kernel selection), then runs matmuls for at least `seconds`
    and counts 2*size^3 FLOPs each. Meant to be called once at start-up as the CPU "peak" for MFU.
    """
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return measure_cpu_matmul_tflops(size, seconds, dtype)
        finally:
            torch.set_num_threads(before)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    with torch.no_grad():
        warm_until = time.perf_counter() + min(0.1, seconds / 4)
        torch.mm(a, b, out=out)
        while time.perf_counter() < warm_until:
            torch.mm(a, b, out=out)
        iters = 0
        start = time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
    return 2.0 * size**3 * iters / elapsed / 1e12


def peak_tflops(device: torch.device | str, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """Peak TFLOP/s of one device and where it came from.

    `override` (metrics.peak_tflops) wins; on CUDA (and ROCm) the table is looked up by device name
    (ValueError for an unknown GPU); on CPU a matmul in `dtype` is measured now.
    """
    if override is not None:
        if not override > 0:
            raise ValueError(f"metrics.peak_tflops must be positive, got {override}")
        return float(override), "metrics.peak_tflops"
    device = torch.device(device)
    if device.type == "cuda":
        return table_peak_tflops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        return measure_cpu_matmul_tflops(dtype=dtype), "measured CPU matmul"
    raise ValueError(f"no peak FLOP/s known for device type {device.type!r}; set metrics.peak_tflops")


def achieved_tflops(tokens_per_s: float, flops_per_token: float, n_devices: int) -> float:
    """Model TFLOP/s achieved per device: job-wide tokens/s times FLOPs/token, shared over n_devices."""
    if n_devices < 1:
        raise ValueError(f"n_devices must be positive, got {n_devices}")
    return tokens_per_s * flops_per_token / n_devices / 1e12


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved model FLOP/s over the peak of all n_devices.

    `tokens_per_s` is the throughput of the whole job (every data-parallel replica) and `n_devices` the
    world size: with tensor or pipeline parallelism several devices share the same tokens.
    """
    if not (peak_tflops_per_device > 0 and math.isfinite(peak_tflops_per_device)):
        raise ValueError(f"peak TFLOP/s must be positive and finite, got {peak_tflops_per_device}")
    return achieved_tflops(tokens_per_s, flops_per_token, n_devices) / peak_tflops_per_device
