"""parallel/moe.py in one process: routing, capacity, the load-balancing loss and its gradient, the
bias update, a skewed router, and the parameter counts of parallel/flops.py against the real model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from parallel.config import ConfigError, ModelConfig, build_config
from parallel.flops import flops_per_token, param_count
from parallel.model import FeedForward, Transformer
from parallel.moe import MoE, RouterStats
from parallel.moe_config import MoEConfig


def _layer(seed: int = 0, **moe: object) -> MoE:
    cfg = MoEConfig(**({"n_experts": 4, "top_k": 2, "expert_ffn_dim": 12} | moe))
    torch.manual_seed(seed)
    shared = FeedForward(8, cfg.n_shared_experts * 12) if cfg.n_shared_experts else None
    layer = MoE(8, cfg, shared)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _reference(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: each chosen expert's SwiGLU on the token, weighted, plus the shared experts;
    capacity counted per sequence in token order. Returns (output, kept choices)."""
    cfg, ex = layer.cfg, layer.experts
    scores = layer.router(x).float()
    scores = scores.softmax(-1) if cfg.score == "softmax" else scores.sigmoid()
    B, T, _ = x.shape
    out = torch.zeros_like(x)
    kept = torch.zeros(B, T, cfg.top_k, dtype=torch.bool)
    capacity = (
        math.inf if cfg.capacity_factor is None else math.ceil(cfg.capacity_factor * T * cfg.top_k / cfg.n_experts)
    )
    for b in range(B):
        taken = [0] * cfg.n_experts
        for t in range(T):
            chosen = torch.topk(scores[b, t] + layer.expert_bias, cfg.top_k).indices
            w = scores[b, t, chosen]
            w = w / w.sum() if cfg.norm_topk else w
            for j, (e, we) in enumerate(zip(chosen.tolist(), w, strict=True)):
                if taken[e] >= capacity:
                    continue
                taken[e] += 1
                kept[b, t, j] = True
                h = F.silu(ex.w1[e] @ x[b, t]) * (ex.w3[e] @ x[b, t])
                out[b, t] += we * (ex.w2[e] @ h)
    if layer.shared is not None:
        out = out + layer.shared(x)
    return out, kept


@pytest.mark.parametrize(
    "moe",
    [{}, {"score": "sigmoid"}, {"n_shared_experts": 1}, {"norm_topk": False}, {"capacity_factor": 0.5}, {"top_k": 1}],
)
def test_moe_equals_token_by_token_reference(moe: dict) -> None:
    layer = _layer(**moe)
    x = torch.randn(3, 10, 8)
    want, kept = _reference(layer, x)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)
    assert layer.stats["dropped"].item() == (~kept).sum().item()
    if moe.get("capacity_factor"):
        assert layer.stats["dropped"].item() > 0  # the test drops something
    assert layer.stats["tokens"].sum().item() == 3 * 10 * layer.cfg.top_k


def test_aux_loss_value_and_its_gradient() -> None:
    layer = _layer(aux_loss_coef=0.1)
    layer.aux_scale = 0.25
    x = torch.randn(2, 6, 8)
    chosen, _, probs = layer.route(x)
    f = F.one_hot(chosen.reshape(2, -1), 4).float().mean(1)  # (B, E) share of each sequence's choices
    want = 0.1 * 4 * (f * probs.mean(1)).sum(-1).mean()
    assert torch.allclose(layer.aux_loss(chosen, probs), want)

    layer(x).sum().backward()  # the block's output carries the aux loss's gradient, scaled
    got = layer.router.weight.grad.clone()
    layer.zero_grad()
    layer.cfg.aux_loss_coef = 0.0  # the plain output, then the aux loss added by hand
    out = layer(x)
    layer.cfg.aux_loss_coef = 0.1
    chosen, _, probs = layer.route(x)
    (out.sum() + 0.25 * layer.aux_loss(chosen, probs)).backward()
    torch.testing.assert_close(got, layer.router.weight.grad)


def test_skewed_router_every_token_to_one_expert() -> None:
    layer = _layer(top_k=1, capacity_factor=1.0)
    layer.expert_bias[0] = 1e3  # the bias picks the expert: every token goes to expert 0
    x = torch.randn(2, 8, 8, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert layer.stats["tokens"].tolist() == [16.0, 0.0, 0.0, 0.0]
    # capacity ceil(1.0 * 8 * 1 / 4) = 2 per sequence: 6 of each sequence's 8 tokens dropped
    assert layer.stats["dropped"].item() == 12
    metrics = RouterStats([layer], layer.cfg, 1.0, [], []).step(torch.device("cpu"))
    assert metrics["moe_max_load"] == pytest.approx(4.0)  # 16 tokens against a mean of 4
    assert metrics["moe_dropped_frac"] == pytest.approx(12 / 16)
    assert layer.stats["tokens"].sum().item() == 0  # reset for the next step


def test_bias_update_moves_towards_the_mean_load() -> None:
    layer = _layer(bias_update_rate=0.01)
    layer.stats["tokens"] = torch.tensor([10.0, 2.0, 5.0, 3.0])
    RouterStats([layer], layer.cfg, 1.0, [], []).step(torch.device("cpu"))
    assert layer.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.01])  # mean 5


def test_recomputation_counts_a_step_once() -> None:
    from parallel.activation_checkpointing import apply_ac

    model = Transformer(ModelConfig(preset="tiny-moe"), max_seq_len=16)
    model.init_weights(0)
    apply_ac(model, "full")
    model(torch.randint(0, 256, (2, 16))).float().mean().backward()
    for m in [m for m in model.modules() if isinstance(m, MoE)]:
        assert m.stats["forwards"].item() == 1 and m.stats["tokens"].sum().item() == 2 * 16 * 2


@pytest.mark.parametrize(
    "moe", [{}, {"first_dense": 2, "every": 1}, {"first_dense": 0, "every": 2}, {"n_shared_experts": 2, "top_k": 1}]
)
@pytest.mark.parametrize("preset", ["tiny-moe", "debug-moe"])
def test_param_counts_total_and_active(preset: str, moe: dict) -> None:
    m = ModelConfig.model_validate({"preset": preset, "moe": moe})
    model = Transformer(m, max_seq_len=16)
    assert param_count(m) == sum(p.numel() for p in model.parameters())
    # active: a token's routed experts are top_k of n_experts; everything else it uses whole
    c, e = m.moe, m.moe.n_experts
    idle = (e - c.top_k) * 3 * m.dim * c.expert_ffn_dim * len(c.moe_layers(m.n_layers))
    assert param_count(m, active=True) == param_count(m) - idle
    assert flops_per_token(m, 64) < flops_per_token(m.model_copy(update={"moe": None}), 64) * 10


def test_mixtral_shape_counts() -> None:
    m = ModelConfig(preset="mixtral-8x7b")
    assert param_count(m) == pytest.approx(46.7e9, rel=0.01)  # Mixtral 8x7B: 46.7B in all, 12.9B active
    assert param_count(m, active=True) == pytest.approx(12.9e9, rel=0.01)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="top_k=5 is more than n_experts=4"):
        ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"top_k": 5}})
    with pytest.raises(ValueError, match="first_dense=4 leaves no MoE block"):
        ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"first_dense": 4}})
    assert ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"top_k": 1}}).moe.n_experts == 4  # preset kept
    for bad in ({"preset": {"a": 1}}, {"preset": ["tiny-moe"]}, {"preset": "tiny-moe", "moe": [1]}):
        with pytest.raises(ValidationError):  # a wrong type is a validation error, never a TypeError (a 500)
            ModelConfig.model_validate(bad)


def test_expert_parallel_config_errors_name_the_field() -> None:
    for spec, message in [
        ({"model": {"preset": "tiny"}, "parallel": {"dp": 2, "ep": 2}}, "parallel.ep=2: expert parallelism needs a mixture"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"dp": 3, "ep": 3}, "train": {"global_batch": 6}}, "parallel.ep=3 does not divide model.moe.n_experts=4; valid ep: 1, 2, 4"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"dp": 2, "ep": 4}}, r"parallel.ep=4: .*dp_shard ranks \(dp / dp_replicate = 2\).*valid ep: 1, 2"),
        ({"model": {"preset": "tiny-moe"}, "parallel": {"dp": 4, "dp_replicate": 2, "zero": 1, "ep": 4}}, "valid ep: 1, 2"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            build_config(spec)
    ok = build_config({"model": {"preset": "tiny-moe"}, "parallel": {"dp": 4, "dp_replicate": 2, "zero": 3, "ep": 2}})
    assert ok.parallel.ep == 2


def test_export_of_a_model_mixtral_cannot_express_is_refused(tmp_path) -> None:  # noqa: ANN001
    from parallel.hf import export_hf

    cfg = build_config({"model": {"preset": "tiny-moe"}})  # shared experts: Mixtral has none
    with pytest.raises(ConfigError, match="model.moe.n_shared_experts=1: Mixtral has n_shared_experts=0"):
        export_hf({}, cfg.model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("preset", ["tiny-moe", "debug-moe", "mixtral-8x7b"])
def test_planner_counts_every_expert_for_memory_and_the_active_ones_for_flops(preset: str) -> None:
    from parallel.expert_parallel import is_expert_param
    from parallel.flops import flops_per_token_terms
    from parallel.planner import state_bytes
    from parallel.planner.shapes import flops_per_token as planner_flops
    from parallel.planner.shapes import total_params

    m = ModelConfig(preset=preset)
    with torch.device("meta"):
        named = [(n, p.numel()) for n, p in Transformer(m, max_seq_len=64).named_parameters()]
    assert total_params(m) == sum(n for _, n in named) == param_count(m)
    weights, attention = flops_per_token_terms(m, 4096)
    assert weights == 6 * param_count(m, include_embedding=False, active=True)  # 6 x active N
    assert planner_flops(m, 4096) == weights + attention
    # one rank's parameters at ep = n_experts, ZeRO 0: every dense tensor, 1/ep of each expert tensor
    ep = m.moe.n_experts
    cfg = build_config({"model": {"preset": preset}, "parallel": {"dp": ep, "ep": ep},
                        "train": {"global_batch": ep, "micro_batch": 1}}, world_size=ep)  # fmt: skip
    mine = sum(n // ep if is_expert_param(name) else n for name, n in named)
    assert state_bytes(cfg)["params"] == 4 * mine


def test_planner_predicts_and_ranks_expert_parallel_layouts() -> None:
    from parallel.planner import Cluster, predict
    from parallel.planner.search import search
    from parallel.planner.shapes import flops_per_token as planner_flops

    cluster = Cluster.parse("2x8xh100-80gb")
    spec = {"model": {"preset": "mixtral-8x7b"}, "train": {"global_batch": 64, "micro_batch": 1, "seq_len": 4096}}
    cfg = build_config({**spec, "parallel": {"dp": 16, "ep": 8, "zero": 3}}, world_size=16)
    pred = predict(cfg, cluster)
    assert "ep8" in pred.layout and pred.links["ep"] == "intra"  # an ep group of 8 on one node of 8
    assert pred.time["comm_ep"] > 0 and pred.comm_bytes["ep"] > 0
    peak = cluster.accelerator.peak_tflops[pred.dtype] * 1e12
    assert pred.mfu == pytest.approx(pred.tokens_per_s * planner_flops(cfg.model, 4096) / (16 * peak))
    found = search(build_config({**spec, "parallel": {"dp": 16}}, world_size=16), cluster, top=5)
    assert found and all(c.prediction.fits for c in found)
    assert any(c.config.parallel.ep > 1 for c in found)


def test_mixtral_export_loads_in_transformers_with_the_same_logits(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    from parallel.hf import export_hf

    m = ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"n_shared_experts": 0, "first_dense": 0}})
    ours = Transformer(m, max_seq_len=32)
    ours.init_weights(3)
    export_hf(ours.state_dict(), m, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(theirs).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, m.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=1e-4, atol=1e-5)


def test_mixtral_import_round_trips_and_refuses_what_mixtral_cannot_express(tmp_path) -> None:  # noqa: ANN001
    """A Mixtral directory (ours, or the hub's layout) loads into a fresh model bit for bit; a model with
    shared experts, or experts of another shape, is refused naming the field."""
    from parallel.hf import check_hf_dir, export_hf, load_hf

    m = ModelConfig.model_validate({"preset": "tiny-moe", "moe": {"n_shared_experts": 0, "first_dense": 0}})
    saved = Transformer(m, max_seq_len=32)
    saved.init_weights(3)
    export_hf(saved.state_dict(), m, tmp_path / "hf")
    check_hf_dir(str(tmp_path / "hf"), m)
    fresh = Transformer(m, max_seq_len=32)
    fresh.init_weights(4)
    load_hf([fresh], str(tmp_path / "hf"), m)
    for name, value in saved.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="model.moe.n_shared_experts=1: Mixtral has n_shared_experts=0"):
        check_hf_dir(str(tmp_path / "hf"), ModelConfig(preset="tiny-moe"))
    other = m.model_copy(update={"moe": m.moe.model_copy(update={"expert_ffn_dim": 64})})
    with pytest.raises(ConfigError, match="intermediate_size is 96 there but model.moe.expert_ffn_dim is 64"):
        check_hf_dir(str(tmp_path / "hf"), other)
