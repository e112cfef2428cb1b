"""Hugging Face Llama format (Mixtral for mixture-of-experts models): export a checkpoint, start a job
from an export or a hub directory.

    fourfold ckpt export runs/x/ckpt/step-00000010 --hf runs/x/hf     # config.json + model.safetensors
    fourfold train --set model.init_from=runs/x/hf ...                 # start from it

Names map one to one (`layers.0.attention.wq.weight` <->
`model.layers.0.self_attn.q_proj.weight`). One difference is in the numbers: our
RoPE rotates adjacent pairs (x[2i], x[2i+1]) while HF's rotates the two halves of
each head, so the rows of wq and wk are permuted per head on the way out and back
on the way in. A permutation moves values without touching them: a round trip is
bit-exact. Mixture-of-experts models take the hub's Mixtral layout both ways
(`block_sparse_moe.gate`, and one `experts.<j>.w1/w3/w2` per expert, stacked into our (E, ...) tensors
on the way in), for the models Mixtral can express (`_mixtral_refusal`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from parallel.config import ConfigError, ModelConfig

WEIGHTS = "model.safetensors"
# Our name suffix within a block -> HF's.
_BLOCK = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_TOP["output.weight"] = "lm_head.weight"
# HF config.json key -> our ModelConfig field; the fields that fix the model's shape.
_CONFIG_KEYS = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "intermediate_size": "ffn_dim",
    "vocab_size": "vocab_size",
}


def hf_name(name: str) -> str:
    """Our parameter name -> the HF Llama name."""
    if name in _TOP:
        return _TOP[name]
    _, index, rest = name.split(".", 2)  # layers.<i>.<rest>
    return f"model.layers.{index}.{_BLOCK[rest]}"


def _heads_of(name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows must be permuted for this parameter (None: no RoPE inside)."""
    if name.endswith("attention.wq.weight"):
        return cfg.n_heads
    if name.endswith("attention.wk.weight"):
        return cfg.n_kv_heads
    return None


def pairs_to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from (0, 1, 2, 3, ...) pairs to (evens, odds) halves: (H*Dh, C)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of pairs_to_halves."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_config(cfg: ModelConfig, max_position_embeddings: int = 4096) -> dict[str, Any]:
    out: dict[str, Any] = {hf: getattr(cfg, ours) for hf, ours in _CONFIG_KEYS.items()}
    out.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        head_dim=cfg.head_dim,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        torch_dtype="float32",
    )
    if cfg.moe is not None:  # Mixtral: the same attention, every MLP a sparse MoE block
        out.update(
            architectures=["MixtralForCausalLM"],
            model_type="mixtral",
            intermediate_size=cfg.moe.expert_ffn_dim,
            num_local_experts=cfg.moe.n_experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=cfg.moe.aux_loss_coef,
            output_router_logits=False,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
        out.pop("mlp_bias")
    return out


def _mixtral_refusal(cfg: ModelConfig) -> str | None:
    """Why an MoE model cannot be written as Mixtral (None: it can). Mixtral: every block an MoE block,
    softmax router, top-k weights renormalised, no shared experts, no routing bias."""
    moe = cfg.moe
    assert moe is not None
    mixtral = {"score": "softmax", "norm_topk": True, "n_shared_experts": 0, "first_dense": 0, "every": 1,
               "bias_update_rate": 0.0}  # fmt: skip
    for field, want in mixtral.items():
        value = getattr(moe, field)
        if value != want:
            return f"model.moe.{field}={value}: Mixtral has {field}={want}; no Hugging Face layout takes this model"
    return None


def _mixtral_tensors(name: str, w: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """An MoE block's tensor under Mixtral's hub names (None: not an MoE tensor). The stacked experts
    (E, F, C) / (E, C, F) become one w1, w3, w2 per expert, as the hub's Mixtral checkpoints hold them
    (transformers fuses them on load)."""
    parts = name.split(".")
    if len(parts) < 4 or parts[2] != "feed_forward" or parts[3] not in ("router", "experts"):
        return None
    base = f"model.layers.{parts[1]}.block_sparse_moe"
    if parts[3] == "router":
        return {f"{base}.gate.weight": w}
    return {f"{base}.experts.{j}.{parts[4]}.weight": w[j] for j in range(w.shape[0])}


def export_hf(weights: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path) -> Path:
    """Write full (unsharded) weights under our names as an HF Llama directory (Mixtral for MoE models)."""
    if cfg.moe is not None and (why := _mixtral_refusal(cfg)) is not None:
        raise ConfigError(why)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, w in weights.items():
        if name.endswith("expert_bias"):
            continue  # zero here (Mixtral has none: bias_update_rate is 0)
        heads = _heads_of(name, cfg)
        w = w.detach().cpu()
        moe = _mixtral_tensors(name, w) if cfg.moe is not None else None
        for key, t in (moe or {hf_name(name): pairs_to_halves(w, heads) if heads else w}).items():
            tensors[key] = t.contiguous()
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    return out


def _mixtral_names(name: str, experts: int) -> list[str] | None:
    """The hub's Mixtral names of one of our MoE tensors, one per expert for a stacked experts' weight
    (None: not an MoE tensor): the inverse of `_mixtral_tensors`."""
    parts = name.split(".")
    if len(parts) < 4 or parts[2] != "feed_forward" or parts[3] not in ("router", "experts"):
        return None
    base = f"model.layers.{parts[1]}.block_sparse_moe"
    if parts[3] == "router":
        return [f"{base}.gate.weight"]
    return [f"{base}.experts.{j}.{parts[4]}.weight" for j in range(experts)]


def _expected_config(cfg: ModelConfig) -> dict[str, tuple[str, Any]]:
    """HF config.json key -> (our field, its value) for the keys that fix the model's shape."""
    out = {hf: (ours, getattr(cfg, ours)) for hf, ours in _CONFIG_KEYS.items()}
    if cfg.moe is not None:  # Mixtral: intermediate_size is each expert's width
        out["intermediate_size"] = ("moe.expert_ffn_dim", cfg.moe.expert_ffn_dim)
        out["num_local_experts"] = ("moe.n_experts", cfg.moe.n_experts)
        out["num_experts_per_tok"] = ("moe.top_k", cfg.moe.top_k)
    return out


def check_hf_dir(path: str, cfg: ModelConfig) -> None:
    """Refuse (ConfigError) a directory that is not an HF Llama (Mixtral for an MoE model) export of this
    model's shape."""
    if cfg.moe is not None and (why := _mixtral_refusal(cfg)) is not None:
        raise ConfigError(f"model.init_from={path}: {why}")
    root = Path(path)
    if not (root / "config.json").is_file():
        raise ConfigError(f"model.init_from={path}: no config.json there (expected an HF Llama directory)")
    if not list(root.glob("*.safetensors")):
        raise ConfigError(f"model.init_from={path}: no *.safetensors weights there")
    try:
        saved = json.loads((root / "config.json").read_text())
    except ValueError as err:
        raise ConfigError(f"model.init_from={path}: config.json is not JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"model.init_from={path}: config.json is not a JSON object")
    for hf, (ours, want) in _expected_config(cfg).items():
        if saved.get(hf, want if hf == "num_key_value_heads" else None) != want:
            raise ConfigError(
                f"model.init_from={path}: {hf} is {saved.get(hf)} there but model.{ours} is {want}; "
                "set the model's dimensions to match"
            )
    # What changes the numbers without changing any shape: a mismatch would load silently and be wrong.
    same = {"rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "head_dim": cfg.head_dim}
    ours = {"rope_theta": "model.rope_theta", "rms_norm_eps": "model.norm_eps", "head_dim": "model.dim/n_heads"}
    for hf, want in same.items():
        if hf in saved and saved[hf] is not None and float(saved[hf]) != float(want):
            raise ConfigError(f"model.init_from={path}: {hf} is {saved[hf]} there but {ours[hf]} is {want}")
    if saved.get("tie_word_embeddings"):
        raise ConfigError(f"model.init_from={path}: tie_word_embeddings is true there; our output head is untied")


@torch.no_grad()
def load_hf(models: list[nn.Module], path: str, cfg: ModelConfig) -> None:
    """Copy HF weights into freshly built (possibly TP-sharded, pipeline-split) models.

    Like `init_weights`, every rank reads each full tensor and keeps its own shard."""
    where = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    experts = cfg.moe.n_experts if cfg.moe is not None else 0
    for model in models:
        for name, param in model.named_parameters():
            keys = (_mixtral_names(name, experts) if experts else None) or [hf_name(name)]
            for key in keys:
                if key not in where:
                    raise ConfigError(f"model.init_from={path}: tensor {key} is missing")
            pieces = []
            for key in keys:
                with safe_open(str(where[key]), framework="pt") as f:
                    pieces.append(f.get_tensor(key))
            key = keys[0] if len(keys) == 1 else keys[0].replace(".experts.0.", ".experts.*.")
            full = pieces[0] if len(keys) == 1 else torch.stack(pieces)  # one per expert -> (E, ...)
            if tuple(full.shape) != tuple(param.shape):
                raise ConfigError(
                    f"model.init_from={path}: {key} has shape {tuple(full.shape)}, want {tuple(param.shape)}"
                )
            heads = _heads_of(name, cfg)
            full = (halves_to_pairs(full, heads) if heads else full).to(param.dtype)
            if isinstance(param, DTensor):
                full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(full.to(param.device))
