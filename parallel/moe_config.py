"""`model.moe`: the mixture-of-experts part of a model config (parallel/moe.py builds the layer).

A block is a mixture-of-experts block when `moe` is set and the block is at index >= first_dense
with (index - first_dense) % every == 0; the others keep the dense SwiGLU MLP of `model.ffn_dim`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from parallel.config_base import ConfigError, Section

if TYPE_CHECKING:
    from parallel.config import Config

# Router and expert shapes of the MoE presets (their attention shapes are in config.PRESETS).
MOE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-moe": dict(n_experts=4, top_k=2, expert_ffn_dim=96, n_shared_experts=1, first_dense=1),
    "debug-moe": dict(n_experts=8, top_k=2, expert_ffn_dim=384),
    # Mixtral 8x7B: every block's MLP is 8 experts of the Mistral 7B MLP, 2 per token, softmax router.
    "mixtral-8x7b": dict(n_experts=8, top_k=2, expert_ffn_dim=14336),
}


class MoEConfig(Section):
    n_experts: int = Field(8, ge=2, le=1024)
    """Routed experts per MoE block."""
    top_k: int = Field(2, ge=1)
    """Experts each token is sent to (at most n_experts)."""
    expert_ffn_dim: int | None = Field(None, gt=0)
    """Hidden size of each expert's SwiGLU MLP (default: model.ffn_dim)."""
    n_shared_experts: int = Field(0, ge=0, le=64)
    """Experts every token goes through besides the routed ones (one SwiGLU of n x expert_ffn_dim)."""
    first_dense: int = Field(0, ge=0)
    """The first this many blocks keep the dense MLP."""
    every: int = Field(1, ge=1)
    """After them, every n-th block is an MoE block (1: all of them)."""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax over the experts (Mixtral) or an independent sigmoid per expert (DeepSeek-V3)."""
    norm_topk: bool = True
    """Rescale each token's top-k scores to sum to 1 before weighting the experts' outputs."""
    aux_loss_coef: float = Field(0.01, ge=0)
    """Weight of the load-balancing loss n_experts * sum_e f_e * P_e, per sequence (0: none)."""
    bias_update_rate: float = Field(0.0, ge=0)
    """Auxiliary-loss-free balancing (DeepSeek-V3): after each step every expert's routing bias moves by
    this much towards the mean load (up when under-loaded); the bias only picks experts, never weights
    them. 0: off."""
    capacity_factor: float | None = Field(None, gt=0)
    """Tokens an expert takes per sequence, as a multiple of the even share seq_len * top_k / n_experts;
    the rest are dropped (counted in the metrics). Unset: dropless."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k={self.top_k} is more than n_experts={self.n_experts}; use 1 to {self.n_experts}")
        return self

    def is_moe_layer(self, index: int) -> bool:
        """Whether block `index` is an MoE block."""
        return index >= self.first_dense and (index - self.first_dense) % self.every == 0

    def moe_layers(self, n_layers: int) -> list[int]:
        return [i for i in range(n_layers) if self.is_moe_layer(i)]


def check_moe(cfg: Config) -> None:
    """What mixture-of-experts models run with so far: data parallelism (ZeRO 0-3, HSDP), expert
    parallelism within dp_shard, tensor parallelism (experts kept whole), context parallelism, pipelines,
    activation checkpointing, compilation, Hugging Face (Mixtral) import (checked in parallel.hf)."""
    m, p = cfg.model, cfg.parallel
    if m.moe is None:
        if p.ep > 1:
            raise ConfigError(f"parallel.ep={p.ep}: expert parallelism needs a mixture-of-experts model "
                              "(model.moe, or a preset such as tiny-moe); use ep=1 for a dense model")  # fmt: skip
        return
    if m.moe.n_experts % p.ep:
        valid = ", ".join(str(d) for d in range(1, m.moe.n_experts + 1) if m.moe.n_experts % d == 0)
        raise ConfigError(f"parallel.ep={p.ep} does not divide model.moe.n_experts={m.moe.n_experts}; "
                          f"valid ep: {valid}")  # fmt: skip
    if p.dp_shard % p.ep:
        valid = ", ".join(str(d) for d in range(1, p.dp_shard + 1) if p.dp_shard % d == 0)
        raise ConfigError(f"parallel.ep={p.ep}: expert parallelism reuses the dp_shard ranks (dp / dp_replicate = "
                          f"{p.dp_shard}) and must divide them; valid ep: {valid}")  # fmt: skip
