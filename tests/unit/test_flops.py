"""Parameter/FLOP counts, the accelerator peak table, the CPU matmul peak and MFU arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from parallel import flops
from parallel.config import ModelConfig


class _RefBlock(nn.Module):
    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        self.attn_norm = nn.Parameter(torch.ones(m.dim))
        self.wq = nn.Linear(m.dim, q, bias=False)
        self.wk = nn.Linear(m.dim, kv, bias=False)
        self.wv = nn.Linear(m.dim, kv, bias=False)
        self.wo = nn.Linear(q, m.dim, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(m.dim))
        self.w1 = nn.Linear(m.dim, m.ffn_dim, bias=False)
        self.w3 = nn.Linear(m.dim, m.ffn_dim, bias=False)
        self.w2 = nn.Linear(m.ffn_dim, m.dim, bias=False)


class _RefModel(nn.Module):
    """Only the parameter shapes of the Llama-style decoder the counts describe."""

    def __init__(self, m: ModelConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(m.vocab_size, m.dim)
        self.layers = nn.ModuleList(_RefBlock(m) for _ in range(m.n_layers))
        self.norm = nn.Parameter(torch.ones(m.dim))
        self.output = nn.Linear(m.dim, m.vocab_size, bias=False)


def _numel(module: nn.Module, include_embedding: bool = True) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if include_embedding or "tok_embeddings" not in name)


SMALL = dict(preset=None, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16, vocab_size=10)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(preset="tiny"),
        ModelConfig(preset="debug"),
        ModelConfig(**SMALL),
        ModelConfig(preset=None, dim=48, n_layers=3, n_heads=6, n_kv_heads=2, ffn_dim=100, vocab_size=77),
    ],
    ids=["tiny", "debug", "small", "explicit"],
)
def test_param_count_matches_reference_module(cfg: ModelConfig) -> None:
    ref = _RefModel(cfg)
    assert flops.param_count(cfg) == _numel(ref)
    assert flops.param_count(cfg, include_embedding=False) == _numel(ref, include_embedding=False)


def test_param_count_large_presets_on_meta() -> None:
    # Published Llama 3 sizes (untied head): 8B = 8,030,261,248 and 70B = 70,553,706,496 parameters.
    for preset, expected in (("8b", 8_030_261_248), ("70b", 70_553_706_496)):
        cfg = ModelConfig(preset=preset)
        with torch.device("meta"):
            ref = _RefModel(cfg)
        assert flops.param_count(cfg) == _numel(ref) == expected


def test_flops_per_token_hand_computed() -> None:
    cfg = ModelConfig(**SMALL)
    # head_dim 4; per layer: norms 2*8 + wq 8*8 + wk, wv 2*8*4 + wo 8*8 + mlp 3*8*16 = 592;
    # final norm 8 and head 8*10 = 80; the embedding (80) is left out: N = 680.
    assert flops.param_count(cfg, include_embedding=False) == 680
    # 6*680 + 12 * L=1 * D=8 * S=4
    assert flops.flops_per_token(cfg, seq_len=4) == 4080 + 384
    assert flops.flops_per_token(cfg, seq_len=1) == 4080 + 96


def test_flops_per_token_8b_and_bad_seq_len() -> None:
    cfg = ModelConfig(preset="8b")
    n = 8_030_261_248 - 128256 * 4096
    assert flops.flops_per_token(cfg, 8192) == 6 * n + 12 * 32 * 4096 * 8192
    with pytest.raises(ValueError, match="seq_len"):
        flops.flops_per_token(cfg, 0)


@pytest.mark.parametrize(
    ("device_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
        ("Tesla T4", "T4"),
        ("AMD Instinct MI300X", "MI300X"),
        ("AMD Instinct MI300X VF", "MI300X"),
    ],
)
def test_match_accelerator(device_name: str, expected: str) -> None:
    acc = flops.match_accelerator(device_name)
    assert acc is not None and acc.name == expected


def test_unknown_accelerator_is_none() -> None:
    for name in ("NVIDIA GeForce RTX 3090", "NVIDIA A1000", "Quadro P400", ""):
        assert flops.match_accelerator(name) is None


def test_table_values_and_labels() -> None:
    assert flops.table_peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == (989.4, "table: H100 SXM bf16")
    assert flops.table_peak_tflops("NVIDIA H200", torch.bfloat16)[0] == 989.4
    assert flops.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == (312.0, "table: A100 80GB bf16")
    assert flops.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=True) == (
        156.0,
        "table: A100 80GB tf32",
    )
    assert flops.table_peak_tflops("NVIDIA A100-SXM4-80GB", torch.float32, tf32=False) == (
        19.5,
        "table: A100 80GB fp32",
    )
    assert flops.table_peak_tflops("AMD Instinct MI300X", torch.bfloat16)[0] == 1307.4
    # The default follows torch's CUDA matmul precision setting, which is IEEE fp32 out of the box.
    assert flops.table_peak_tflops("NVIDIA L4", torch.float32)[1] == "table: L4 fp32"


def test_table_errors_name_the_override() -> None:
    with pytest.raises(ValueError, match="metrics.peak_tflops"):
        flops.table_peak_tflops("NVIDIA GeForce RTX 3090", torch.bfloat16)
    with pytest.raises(ValueError, match="metrics.peak_tflops"):
        flops.table_peak_tflops("Tesla V100-SXM2-16GB", torch.bfloat16)
    with pytest.raises(ValueError, match="dtype"):
        flops.table_peak_tflops("NVIDIA H200", torch.int8)


def test_measured_cpu_matmul_is_positive_finite() -> None:
    value = flops.measure_cpu_matmul_tflops(size=128, seconds=0.05)
    assert value > 0 and math.isfinite(value)
    with pytest.raises(ValueError):
        flops.measure_cpu_matmul_tflops(size=0)


def test_peak_tflops_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    assert flops.peak_tflops(torch.device("cpu"), torch.float32, 42.0) == (42.0, "metrics.peak_tflops")
    assert flops.peak_tflops(torch.device("cuda"), torch.bfloat16, 7.5) == (7.5, "metrics.peak_tflops")
    monkeypatch.setattr(flops, "measure_cpu_matmul_tflops", lambda dtype=torch.float32: 0.25)
    assert flops.peak_tflops(torch.device("cpu"), torch.float32, None) == (0.25, "measured CPU matmul")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert flops.peak_tflops(torch.device("cuda", 0), torch.bfloat16, None) == (989.4, "table: H100 SXM bf16")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU 9000")
    with pytest.raises(ValueError, match="metrics.peak_tflops"):
        flops.peak_tflops(torch.device("cuda", 0), torch.bfloat16, None)
    with pytest.raises(ValueError):
        flops.peak_tflops(torch.device("cpu"), torch.float32, 0.0)


def test_mfu_arithmetic() -> None:
    # 1e4 tokens/s * 1e9 FLOPs/token = 10 TFLOP/s over 4 devices = 2.5 each; peak 10 -> 25 %.
    assert flops.achieved_tflops(1e4, 1e9, 4) == pytest.approx(2.5)
    assert flops.mfu(1e4, 1e9, 4, 10.0) == pytest.approx(0.25)
    assert flops.mfu(0.0, 1e9, 1, 10.0) == 0.0
    with pytest.raises(ValueError):
        flops.mfu(1e4, 1e9, 0, 10.0)
    with pytest.raises(ValueError):
        flops.mfu(1e4, 1e9, 1, 0.0)
