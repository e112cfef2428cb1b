import math

import pytest
import torch
import torch.nn.functional as F

from parallel.config import ModelConfig, TrainConfig
from parallel.flops import param_count
from parallel.model import Transformer, apply_rope, rope_cache
from parallel.trainer import lr_at


def test_rope_matches_complex_rotation() -> None:
    B, T, H, Dh = 2, 5, 3, 8
    x = torch.randn(B, T, H, Dh)
    got = apply_rope(x, rope_cache(Dh, T, 10000.0))
    freqs = 1.0 / 10000.0 ** (torch.arange(0, Dh, 2).double() / Dh)
    angles = torch.outer(torch.arange(T).double(), freqs)  # (T, Dh/2)
    z = torch.view_as_complex(x.double().reshape(B, T, H, Dh // 2, 2).contiguous())
    want = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[None, :, None]).flatten(-2)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-6)


def test_gqa_attention_equals_repeated_kv_heads() -> None:
    cfg = ModelConfig(preset="tiny")
    model = Transformer(cfg, max_seq_len=16)
    model.init_weights(0)
    attn, x = model.layers["0"].attention, torch.randn(2, 16, cfg.dim)
    rope = model.rope[:16]
    q = apply_rope(attn.wq(x).view(2, 16, cfg.n_heads, -1), rope).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(2, 16, cfg.n_kv_heads, -1), rope).transpose(1, 2)
    v = attn.wv(x).view(2, 16, cfg.n_kv_heads, -1).transpose(1, 2)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(cfg.head_dim)
    scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 16, -1))
    torch.testing.assert_close(attn(x, rope), want, rtol=1e-5, atol=1e-6)


def test_init_depends_on_seed_and_name_only() -> None:
    cfg = ModelConfig(preset="tiny")
    a, b = Transformer(cfg), Transformer(cfg)
    torch.manual_seed(123)  # the global RNG must not matter
    a.init_weights(7)
    del b.layers["0"]  # a pipeline stage without layer 0 still gets the same layer 1
    b.init_weights(7)
    for name, p in b.named_parameters():
        torch.testing.assert_close(p, a.get_parameter(name), rtol=0, atol=0)
    c = Transformer(cfg)
    c.init_weights(8)
    assert not torch.equal(c.output.weight, a.output.weight)


def test_param_count_and_loss_at_init() -> None:
    cfg = ModelConfig(preset="tiny")
    model = Transformer(cfg)
    model.init_weights(0)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, 32))
    loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1  # small init: near-uniform predictions


def test_meta_build_then_materialise_equals_eager() -> None:
    cfg = ModelConfig(preset="tiny")
    with torch.device("meta"):
        meta = Transformer(cfg, max_seq_len=64)
    meta.to_empty(device="cpu")
    meta.init_weights(3)
    eager = Transformer(cfg, max_seq_len=64)
    eager.init_weights(3)
    tokens = torch.randint(0, cfg.vocab_size, (1, 64))
    torch.testing.assert_close(meta(tokens), eager(tokens), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 0.25e-3), (4, 1e-3), (100, 0.1e-3)],
)
def test_lr_schedule_warmup_then_cosine_to_floor(step: int, expected: float) -> None:
    t = TrainConfig(steps=100, lr=1e-3, warmup_steps=4, min_lr_ratio=0.1)
    assert lr_at(step, t) == pytest.approx(expected)
    mid = lr_at(52, t)  # halfway through the decay: midway between peak and floor
    assert mid == pytest.approx(0.55e-3)
