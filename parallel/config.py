"""Typed job configuration for the engine, and every check on it in one place.

A config is YAML with the sections below; `parallel.spec_files.load_config` reads it, applies
`--set section.key=value` overrides, and validates it. Every mistake becomes a
`ConfigError` with one line naming the field, the value and what would be valid,
raised before any process group exists.

    python -c "from parallel.spec_files import load_config; print(load_config('examples/tiny.yaml'))"
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from parallel.auto import expand_auto
from parallel.config_base import ConfigError
from parallel.config_base import Section as _Section
from parallel.config_runs import CheckpointConfig, PlanConfig, ResourcesConfig, RestartConfig
from parallel.moe_config import MOE_PRESETS, MoEConfig, check_moe

# Llama-3-style dimensions. `tiny` is sized for multi-rank CPU tests: 8 query heads
# and 4 KV heads (GQA) so tp in {1, 2, 4} works, 4 layers so pp up to 4 works.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=192, vocab_size=256),
    "debug": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=256),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, vocab_size=32000),
    "1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, vocab_size=128256, rope_theta=500000.0),
    "8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_theta=500000.0),
    "70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672, vocab_size=128256, rope_theta=500000.0),
    # Mixture-of-experts presets: attention shapes here, experts in moe_config.MOE_PRESETS.
    "tiny-moe": dict(dim=64, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=192, vocab_size=256),
    "debug-moe": dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=768, vocab_size=256),
    "mixtral-8x7b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=32000, rope_theta=1000000.0
    ),  # fmt: skip
}


def _field_default(model: BaseModel, name: str) -> Any:
    return type(model).model_fields[name].default


class ModelConfig(_Section):
    preset: Literal["tiny", "debug", "125m", "1b", "8b", "70b", "tiny-moe", "debug-moe", "mixtral-8x7b"] | None = "tiny"
    """Named size (tiny, debug, 125m, 1b, 8b, 70b; mixture-of-experts: tiny-moe, debug-moe, mixtral-8x7b).
    Explicit fields below override it."""
    dim: int | None = Field(None, gt=0)
    """Hidden size of the residual stream."""
    n_layers: int | None = Field(None, gt=0)
    """Number of transformer blocks."""
    n_heads: int | None = Field(None, gt=0)
    """Query heads per attention layer."""
    n_kv_heads: int | None = Field(None, gt=0)
    """Key/value heads (grouped-query attention); must divide n_heads."""
    ffn_dim: int | None = Field(None, gt=0)
    """Hidden size of the SwiGLU MLP."""
    vocab_size: int | None = Field(None, gt=0)
    """Rows of the embedding and the output head."""
    norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of RMSNorm."""
    rope_theta: float | None = Field(None, gt=0)
    """RoPE base frequency (10000 unless the preset says otherwise)."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    init_from: str | None = Field(None, json_schema_extra={"x-storage": "read"})
    """Start from a Hugging Face Llama directory (config.json + safetensors), e.g. a `fourfold ckpt export`."""
    moe: MoEConfig | None = None
    """Mixture of experts (parallel/moe.py): the MLP of some or all blocks becomes routed experts. Unset: dense.
    An MoE preset fills it; fields given here override the preset's."""

    @model_validator(mode="before")
    @classmethod
    def _moe_from_preset(cls, data: Any) -> Any:
        # The preset's experts, under whatever of them the spec sets itself (model.moe.top_k=1 keeps the rest).
        preset = data.get("preset") if isinstance(data, dict) else None
        if isinstance(preset, str) and preset in MOE_PRESETS and data.get("moe", {}) is not None:
            given = data.get("moe") or {}
            if isinstance(given, dict):
                data = {**data, "moe": {**MOE_PRESETS[preset], **given}}
        return data

    @model_validator(mode="after")
    def _fill_from_preset(self) -> ModelConfig:
        base = dict(PRESETS.get(self.preset or "", {}))
        base.setdefault("rope_theta", 10000.0)
        missing = []
        for key, value in base.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if getattr(self, key) is None:
                missing.append(key)
        if missing:
            raise ValueError(f"no preset given, so these are required: {', '.join(missing)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.moe is not None:
            if self.moe.expert_ffn_dim is None:
                object.__setattr__(self.moe, "expert_ffn_dim", self.ffn_dim)
            if not self.moe.moe_layers(self.n_layers):
                raise ValueError(f"moe.first_dense={self.moe.first_dense} leaves no MoE block of the "
                                 f"{self.n_layers} layers; use 0 to {self.n_layers - 1}")  # fmt: skip
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class ParallelConfig(_Section):
    dp: int = Field(1, ge=1)
    """Data-parallel degree in all (dp_replicate x dp_shard); left unset under torchrun or --nproc-per-node
    it is world size / (tp * pp * cp), the one value that fills the processes launched, else 1."""
    tp: int = Field(1, ge=1)
    """Tensor-parallel degree (with sequence parallel); a TP group is consecutive ranks."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel stages."""
    cp: int = Field(1, ge=1)
    """Context-parallel degree (sequence split across ranks with ring attention)."""
    ep: int = Field(1, ge=1)
    """Expert-parallel degree (model.moe): each expert lives on one of ep ranks, taken from the dp_shard
    ranks (it adds no ranks: it divides dp / dp_replicate); tokens reach their experts by all-to-all."""
    zero: Literal[0, 1, 2, 3] = 0
    """ZeRO stage over the data-parallel ranks: 0 none, 1 optimizer states, 2 +gradients, 3 +parameters."""
    bucket_mb: float = Field(4.0, gt=0, le=1024)
    """ZeRO 0-2 (tp=1, pp=1): MiB of gradients per bucket reduced while backward goes on (all-reduced in
    the last micro-batch's at ZeRO 0-1, reduce-scattered in every micro-batch's at ZeRO 2); smaller
    starts sooner, larger sends fewer messages."""
    dp_replicate: int = Field(1, ge=1)
    """Replicas in hybrid sharding (HSDP): ZeRO shards within dp/dp_replicate ranks and replicates across."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zbv"] = "1f1b"
    """Pipeline schedule; left unset with pp > 1 and pp_virtual >= 3 it is interleaved_1f1b (the one that
    runs that many stages per rank)."""
    pp_virtual: int = Field(1, ge=1)
    """Model chunks per pipeline rank (interleaved schedules); left unset it is 2 with pp_schedule=zbv
    and pp > 1 (the one value zbv takes), else 1."""
    microbatches: int | None = Field(None, ge=1)
    """Pipeline micro-batches per step; defaults to the gradient-accumulation count."""
    cp_mode: Literal["ring", "allgather"] = "ring"
    """How context parallelism exchanges K/V."""
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    """Recompute activations in backward: every block (full), or keep matmul outputs (selective)."""
    timeout_s: float = Field(600.0, gt=0)
    """How long a collective may wait before the run fails."""
    dp_min: int | None = Field(None, ge=1)
    """Elastic data parallelism: after losing room, restart with the largest dp that fits, down to this (null = dp)."""

    @field_validator("zero", mode="before")
    @classmethod
    def _zero_not_bool(cls, zero: Any) -> Any:
        # A bool compares equal to 0 or 1, so the Literal alone would take `zero: true` as stage 1.
        if isinstance(zero, bool):
            raise ValueError("Input should be 0, 1, 2 or 3")
        return zero

    @model_validator(mode="after")
    def _take_the_only_valid_value(self) -> ParallelConfig:
        # An unset field that only one value fits, given the others, takes that value instead of a
        # default the checks would refuse. Resolved again on every assignment (validate_assignment),
        # so a field that was filled in follows the fields it depends on; one the user set is kept
        # and checked. dp, which depends on the world size, is filled in by check().
        given = self.model_fields_set
        if "pp_schedule" not in given:
            multi = "pp_virtual" in given and self.pp > 1 and self.pp_virtual > 2
            schedule = "interleaved_1f1b" if multi else _field_default(self, "pp_schedule")
            object.__setattr__(self, "pp_schedule", schedule)
        if "pp_virtual" not in given:
            zbv = self.pp > 1 and self.pp_schedule == "zbv"
            object.__setattr__(self, "pp_virtual", 2 if zbv else _field_default(self, "pp_virtual"))
        return self

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def stages(self) -> int:
        """Pipeline stages in all: pp x pp_virtual (zbv runs pp_virtual=2, the two arms of its V)."""
        return self.pp * self.pp_virtual

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The global stage indices a pp rank holds, in execution order ([0] without pipelining)."""
        if self.pp == 1:
            return [0]
        if self.pp_schedule == "zbv":
            return [pp_rank, self.stages - 1 - pp_rank]
        return [pp_rank + i * self.pp for i in range(self.pp_virtual)]


class TrainConfig(_Section):
    steps: int = Field(10, ge=1)
    """Optimizer steps to run."""
    global_batch: int = Field(8, ge=1)
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = Field(2, ge=1)
    """Sequences per forward/backward on one data-parallel rank."""
    seq_len: int = Field(64, ge=2)
    """Tokens per sequence."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to lr."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay (not applied to norms)."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW first-moment decay."""
    beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW second-moment decay."""
    eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0)
    """Clip the global gradient norm to this (0 turns clipping off)."""
    seed: int = 0
    """Seeds weights and data; every layout starts from the same model."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype: auto = bf16 on GPU (fp32 master weights), fp32 on CPU."""
    compile: bool = False
    """Compile each transformer block with torch.compile (regional: blocks share one compiled graph);
    the first step pays the compile time, reported as `compile_s`."""


class DataConfig(_Section):
    source: Literal["synthetic", "text", "tokens"] = "synthetic"
    """synthetic: seeded random tokens; text: byte-level tokens of a file or directory; tokens: a flat token file."""
    path: str | None = Field(None, json_schema_extra={"x-storage": "read", "x-keywords": ["stdlib"]})
    """File or directory for text (`stdlib` = this Python's standard library source), file for tokens."""
    token_dtype: Literal["uint16", "uint32"] = "uint16"
    """Element type of a `tokens` file."""
    max_bytes: int = Field(64 * 2**20, gt=0)
    """Read at most this many bytes of text (files in sorted order)."""


class MetricsConfig(_Section):
    peak_tflops: float | None = Field(None, gt=0)
    """Peak TFLOP/s of one device for MFU; default: the accelerator table, or a matmul measured at start on CPU."""
    log_every: int = Field(1, ge=1)
    """Print a progress line every this many steps (the metrics file gets every step)."""


class Config(_Section):
    name: str = Field("fourfold", min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    """A name for the run (up to 200 characters, no control characters)."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    restart: RestartConfig = Field(default_factory=RestartConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, data: Any) -> Any:
        return expand_auto(data)

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on one data-parallel rank."""
        return self.train.global_batch // (self.parallel.dp * self.train.micro_batch)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check(cfg: Config, world_size: int | None = None) -> Config:
    """Cross-field checks; raise ConfigError naming the field, the value and what is valid."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    rest = p.tp * p.pp * p.cp
    if world_size is not None and "dp" not in p.model_fields_set and world_size % rest == 0:
        # the one dp that fills the world; still "unset", so another world size fills it anew
        object.__setattr__(p, "dp", world_size // rest)
    if p.dp_min is not None and p.dp_min > p.dp:
        raise ConfigError(f"parallel.dp_min={p.dp_min} is larger than parallel.dp={p.dp}; use 1 to {p.dp}")
    if m.n_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp}: model.n_heads={m.n_heads} is not divisible by it; valid tp: {_divisors(m.n_heads)}"
        )
    if m.n_kv_heads % p.tp:
        raise ConfigError(
            f"parallel.tp={p.tp}: model.n_kv_heads={m.n_kv_heads} is not divisible by it; "
            f"valid tp: {_divisors(m.n_kv_heads)}"
        )
    for field in ("vocab_size", "ffn_dim"):
        if getattr(m, field) % p.tp:
            value = getattr(m, field)
            raise ConfigError(
                f"parallel.tp={p.tp}: model.{field}={value} is not divisible by it; valid tp: {_divisors(value)}"
            )
    if p.dp % p.dp_replicate:
        raise ConfigError(
            f"parallel.dp_replicate={p.dp_replicate} does not divide parallel.dp={p.dp}; valid: {_divisors(p.dp)}"
        )
    if p.dp_replicate > 1 and p.zero == 0:
        raise ConfigError("parallel.dp_replicate>1 means hybrid sharding; it needs parallel.zero in 1-3, got zero=0")
    if t.global_batch % (p.dp * t.micro_batch):
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by dp*micro_batch = {p.dp}*{t.micro_batch}"
            f" = {p.dp * t.micro_batch}; use a multiple of {p.dp * t.micro_batch}"
        )
    if t.seq_len % (p.tp * 2 * p.cp if p.cp > 1 else p.tp):
        need = p.tp * 2 * p.cp if p.cp > 1 else p.tp
        raise ConfigError(
            f"train.seq_len={t.seq_len} is not divisible by {need} (sequence parallel splits it by tp={p.tp}"
            + (f", context parallel into 2*cp={2 * p.cp} chunks" if p.cp > 1 else "")
            + ")"
        )
    _check_pipeline(cfg)
    check_moe(cfg)
    if cfg.checkpoint.resume == "auto" and not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.resume=auto needs checkpoint.dir to look in")
    if cfg.data.source != "synthetic" and not cfg.data.path:
        raise ConfigError(f"data.path is required for data.source={cfg.data.source}")
    if cfg.plan.ranks is not None and not cfg.plan.auto:
        raise ConfigError(
            f"plan.ranks={cfg.plan.ranks}: goes with layout fields left to the planner (parallel: auto); "
            f"this spec fixes its layout at dp*tp*pp*cp = {p.world_size} ranks"
        )
    if world_size is not None and world_size != p.world_size:
        raise ConfigError(
            f"parallel: dp*tp*pp*cp = {p.dp}*{p.tp}*{p.pp}*{p.cp} = {p.world_size} but the world size is "
            f"{world_size}; make the product equal {world_size} or launch {p.world_size} processes"
        )
    return cfg


def _check_pipeline(cfg: Config) -> None:
    p = cfg.parallel
    if p.microbatches is not None and p.microbatches != cfg.grad_accum:
        raise ConfigError(
            f"parallel.microbatches={p.microbatches} must equal train.global_batch/(dp*micro_batch) = "
            f"{cfg.grad_accum}: every micro-batch of the step runs; change micro_batch instead (or leave it unset)"
        )
    if p.pp == 1:
        if p.pp_virtual != 1:
            raise ConfigError(f"parallel.pp_virtual={p.pp_virtual} needs parallel.pp > 1 (stages per pipeline rank)")
        return
    if p.pp_schedule in ("gpipe", "1f1b") and p.pp_virtual != 1:
        multi = "interleaved_1f1b or zbv" if p.pp_virtual == 2 else "interleaved_1f1b"
        raise ConfigError(f"parallel.pp_virtual={p.pp_virtual}: pp_schedule={p.pp_schedule} runs one stage per rank; "
                          f"use pp_virtual=1, or pp_schedule={multi}")  # fmt: skip
    if p.pp_schedule == "interleaved_1f1b" and p.pp_virtual < 2:
        raise ConfigError("parallel.pp_virtual=1: pp_schedule=interleaved_1f1b needs pp_virtual >= 2")
    if p.pp_schedule == "zbv" and p.pp_virtual != 2:
        raise ConfigError(f"parallel.pp_virtual={p.pp_virtual}: pp_schedule=zbv runs exactly 2 stages per rank; "
                          "set pp_virtual=2")  # fmt: skip
    if cfg.model.n_layers < p.stages:
        raise ConfigError(
            f"parallel.pp={p.pp} x pp_virtual={p.pp_virtual} = {p.stages} stages but model.n_layers="
            f"{cfg.model.n_layers}; each stage needs at least one layer"
        )
    m = p.microbatches or cfg.grad_accum
    least = {"gpipe": 1, "1f1b": p.pp, "interleaved_1f1b": p.pp, "zbv": 2 * p.pp - 1}[p.pp_schedule]
    if m < least:
        raise ConfigError(
            f"parallel.microbatches={m}: pp_schedule={p.pp_schedule} with pp={p.pp} needs at least {least} "
            "micro-batches per step; raise train.global_batch or lower train.micro_batch"
        )
    rounds = max(1, m // p.pp)
    if p.pp_schedule == "interleaved_1f1b" and m % rounds:
        raise ConfigError(f"parallel.microbatches={m}: interleaved_1f1b needs a multiple of {rounds} "
                          f"(max(1, microbatches // pp))")  # fmt: skip


def _format_validation(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"{loc}: unknown field; valid: {', '.join(_known_keys(first['loc'][:-1]))}"
    value = first.get("input")
    text = repr(value)
    shown = "" if isinstance(value, dict) else f" (got {text if len(text) <= 80 else text[:77] + '...'})"
    return f"{loc}: {msg}{shown}"


def _known_keys(section: tuple) -> list[str]:
    """The keys YAML may use at a location: a section's fields (by alias), or the sections."""
    model: type[BaseModel] = Config
    for part in section:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [f.alias or name for name, f in model.model_fields.items()]


def storage_fields() -> dict[str, dict[str, Any]]:
    """Every field of a job spec that names a file, directory or URL, as `section.key` -> its marker:
    {"storage": "read" | "write", "keywords": [names that are not paths]}, declared on the field as
    json_schema_extra={"x-storage": ..., "x-keywords": [...]}. The one list the
    service's storage confinement checks (a new path field is marked where it is declared)."""
    found = {}
    for section, info in Config.model_fields.items():
        model = info.annotation
        for name, field in getattr(model, "model_fields", {}).items():
            extra = field.json_schema_extra
            if isinstance(extra, dict) and "x-storage" in extra:  # x-: an extension keyword in the JSON schema
                marker = {"storage": extra["x-storage"]}
                if "x-keywords" in extra:
                    marker["keywords"] = list(extra["x-keywords"])
                found[f"{section}.{field.alias or name}"] = marker
    return found


def build_config(data: dict[str, Any], world_size: int | None = None, strict: bool = False) -> Config:
    """Validate a plain dict into a Config; every mistake is a one-line ConfigError.

    strict: every value already of its field's type, as the spec's JSON schema says (no `"3"` for 3,
    no `true` for 1): what the service asks of a spec sent over HTTP. Read YAML with `spec_files.read_yaml`
    then, so that `lr: 1e-3` is a number."""
    try:
        cfg = Config.model_validate(data, strict=strict)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None
    return check(cfg, world_size)
