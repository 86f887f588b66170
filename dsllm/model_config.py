"""Model configuration: one dataclass field per architecture option, presets by name, overrides.

`resolve_model_config("gpt2-124m", {"norm": "rmsnorm"})`, or a JSON file path instead of a preset.
Every combination is checked here, before any tensor is built; a bad one raises ConfigError naming
the field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path
from typing import Any

from dsllm.errors import UserError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu", "relu2")
CHECKPOINTING = ("none", "torch", "deepspeed")
ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")
# What no weight's shape depends on: a run that starts from trained weights (--init) may change these. max_seq_len
# only with RoPE (computed per position; learned positions are a table of max_seq_len rows).
WEIGHT_FREE_FIELDS = (
    "max_seq_len",
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_original_max_seq_len",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "dropout",
    "activation_checkpointing",
    "z_loss",
)


class ConfigError(UserError):
    """An invalid model option; the message names the field."""


@dataclasses.dataclass
class ModelConfig:
    """The architecture: every option a field, checked in __post_init__; `--model.FIELD VALUE` sets one."""

    vocab_size: int = 50257
    """token ids the embedding and LM head cover"""
    max_seq_len: int = 1024
    """longest sequence (learned position table size; RoPE cache size)"""
    n_layers: int = 12
    """transformer blocks"""
    d_model: int = 768
    """hidden size"""
    n_heads: int = 12
    """attention (query) heads"""
    n_kv_heads: int | None = None
    """key/value heads: None = n_heads (MHA), 1 = MQA, in between = GQA"""
    positions: str = "learned"
    """'learned' (GPT-2) or 'rope' (rotary)"""
    rope_theta: float = 10000.0
    """rotary base wavelength"""
    rope_scaling: str = "none"
    """RoPE scaling for a context longer than trained: 'none', 'linear' (positions interpolated), 'ntk' (NTK-aware:
    the base raised so the lowest frequency stretches by the factor, the highest kept), 'yarn', or 'llama3' (Llama
    3.1's: wavelengths longer than original / low_freq_factor divided by the factor, shorter than original /
    high_freq_factor kept, a smooth blend between)"""
    rope_scaling_factor: float = 1.0
    """how many times the trained context the scaled RoPE covers"""
    rope_original_max_seq_len: int | None = None
    """the context the model was trained at (YaRN's and llama3's original_max_position_embeddings)"""
    rope_low_freq_factor: float = 1.0
    """llama3 scaling: wavelengths above original context / this are divided by the factor"""
    rope_high_freq_factor: float = 4.0
    """llama3 scaling: wavelengths below original context / this are kept"""
    norm: str = "layernorm"
    """'layernorm' or 'rmsnorm'"""
    norm_eps: float = 1e-5
    """epsilon of the norm layers"""
    mlp: str = "gelu"
    """'gelu' (exact erf GELU), 'gelu_tanh' (its tanh approximation: GPT-2's gelu_new), 'swiglu', or 'relu2' (squared
    ReLU: W2 relu(W1 x)^2, as the modded-nanogpt speedrun)"""
    mlp_hidden: int | None = None
    """MLP hidden size: None = 4*d_model (gelu, relu2) or ~8/3*d_model rounded (swiglu)"""
    mlp_multiple_of: int = 256
    """the rounding of the default SwiGLU hidden size"""
    bias: bool = True
    """biases in the attention and MLP linear layers (and LayerNorm)"""
    qkv_bias: bool | None = None
    """biases in the query, key and value projections alone (Qwen2); None: as `bias`"""
    dropout: float = 0.0
    """dropout on attention weights, residual branches and embeddings"""
    tie_embeddings: bool = True
    """LM head shares the token embedding matrix"""
    qk_norm: bool = False
    """normalise each head's queries and keys before RoPE (the model's norm kind over the head dimension, a learned
    scale per head dimension shared by the heads, as Qwen3; OLMo2 normalises the whole projection instead)"""
    logit_softcap: float | None = None
    """cap the logits smoothly at +-C: C tanh(logits / C), in training, evaluation and generation (None or 0: off)"""
    z_loss: float = 0.0
    """weight of the z-loss, W x mean(logsumexp(logits)^2), added to the training loss only (0: off)"""
    value_embeddings: int = 0
    """value embeddings (the modded-nanogpt speedrun's): K more token-embedding tables of the values' width; table i
    is added to the values of block i and of block n_layers - K + i, each block through a learned scale (0: off; at
    most n_layers // 2)"""
    unet_skips: bool = False
    """U-net skip connections (the modded-nanogpt speedrun's): block n_layers - 1 - i adds the output of block i
    (i < n_layers // 2) to its input, through a learned weight per pair"""
    init_std: float = 0.02
    """normal init std; residual output projections get init_std / sqrt(2 * n_layers)"""
    activation_checkpointing: str = "none"
    """recompute each block in backward: 'none', 'torch' or 'deepspeed'"""
    moe_experts: int = 0
    """experts of a sparse (Mixture-of-Experts) block's MLP, DeepSpeed's MoE layer; 0 = every block dense"""
    moe_top_k: int = 2
    """experts each token is routed to (1 or 2)"""
    moe_every: int = 1
    """every K-th block is sparse (blocks K-1, 2K-1, ...); 1 = all of them"""
    moe_capacity_factor: float = 1.0
    """in training an expert takes at most top_k x tokens / experts x this many tokens of a batch, the rest are
    dropped (evaluation and generation drop none)"""
    moe_min_capacity: int = 4
    """an expert's capacity is never below this many tokens"""
    moe_aux_loss_coef: float = 0.01
    """weight of the load-balancing loss (summed over the sparse blocks) added to the training loss"""

    def __post_init__(self) -> None:
        self.validate()

    # -- derived ------------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden_size(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp != "swiglu":
            return 4 * self.d_model
        m = self.mlp_multiple_of
        return m * math.ceil(8 * self.d_model / 3 / m)

    def is_sparse(self, block: int) -> bool:
        """Whether block `block` (0-based) has a Mixture-of-Experts MLP."""
        return self.moe_experts > 0 and (block + 1) % self.moe_every == 0

    def value_embedding_of(self, block: int) -> int | None:
        """The value-embedding table block `block` (0-based) adds to its values, or None: the first and the last
        `value_embeddings` blocks use tables 0, 1, ... in order."""
        k = self.value_embeddings
        if block < k:
            return block
        if block >= self.n_layers - k:
            return block - (self.n_layers - k)
        return None

    @property
    def value_embedding_blocks(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.value_embedding_of(i) is not None]

    @property
    def sparse_blocks(self) -> int:
        return sum(self.is_sparse(i) for i in range(self.n_layers))

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count without building the model (a tied embedding/head counts once). `active`: what one token
        goes through, a sparse block's MLP counted top_k times (not once per expert) and its router once."""
        d, hd = self.d_model, self.head_dim
        bias = int(self.bias)
        qkv = (self.n_heads + 2 * self.kv_heads) * hd
        attention = d * qkv + d * d + int(self.has_qkv_bias) * qkv + bias * d
        mlp = self.mlp_parameters
        norm = d * (2 if self.norm == "layernorm" and self.bias else 1)
        attention += 2 * (norm // d) * hd if self.qk_norm else 0
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        positions = self.max_seq_len * d if self.positions == "learned" else 0
        dense = self.n_layers * (attention + mlp + 2 * norm) + norm + embeddings + positions
        dense += self.value_embeddings * self.vocab_size * self.kv_heads * hd + len(self.value_embedding_blocks)
        dense += self.n_layers // 2 if self.unet_skips else 0
        experts = self.moe_top_k if active else self.moe_experts
        return dense + self.sparse_blocks * ((experts - 1) * mlp + d * self.moe_experts)

    @property
    def rope_base(self) -> float:
        """RoPE's base wavelength: rope_theta, raised by NTK-aware scaling ('ntk') to theta x factor^(d / (d - 2)),
        which divides the lowest frequency by the factor and keeps the highest."""
        if self.rope_scaling != "ntk":
            return self.rope_theta
        return self.rope_theta * self.rope_scaling_factor ** (self.head_dim / (self.head_dim - 2))

    @property
    def mlp_parameters(self) -> int:
        """One MLP's parameters (a dense block's, or one expert's)."""
        fc_out = self.mlp_hidden_size * (2 if self.mlp == "swiglu" else 1)
        return self.d_model * fc_out + self.mlp_hidden_size * self.d_model + int(self.bias) * (fc_out + self.d_model)

    @property
    def expert_parameters(self) -> int:
        """Every expert of every sparse block (what --expert-parallel splits over ranks; the routers stay whole)."""
        return self.sparse_blocks * self.moe_experts * self.mlp_parameters

    # -- checks -------------------------------------------------------------------------------------
    def validate(self) -> None:
        for name, allowed in (
            ("positions", POSITIONS),
            ("norm", NORMS),
            ("mlp", MLPS),
            ("activation_checkpointing", CHECKPOINTING),
            ("rope_scaling", ROPE_SCALINGS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} = {getattr(self, name)!r}: unknown; use one of {', '.join(allowed)}")
        for name in ("vocab_size", "max_seq_len", "n_layers", "d_model", "n_heads", "mlp_multiple_of"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model.{name} = {getattr(self, name)!r}: must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model = {self.d_model} is not divisible by model.n_heads = {self.n_heads}; "
                "pick heads that divide the hidden size"
            )
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads = {self.n_kv_heads} does not divide model.n_heads = {self.n_heads}; "
                "use a divisor of n_heads (1 for MQA, n_heads for MHA)"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ConfigError(
                f"model.positions = 'rope' needs an even head size, got d_model/n_heads = {self.head_dim}"
            )
        if self.mlp_hidden is not None and self.mlp_hidden < 1:
            raise ConfigError(f"model.mlp_hidden = {self.mlp_hidden}: must be positive (or null for the default)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout = {self.dropout}: must be in [0, 1)")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps, model.rope_theta and model.init_std must be positive")
        if self.logit_softcap is not None and not self.logit_softcap >= 0:
            raise ConfigError(f"model.logit_softcap = {self.logit_softcap}: must be above 0 (or 0 / null: off)")
        if not self.z_loss >= 0:
            raise ConfigError(f"model.z_loss = {self.z_loss}: must be 0 (off) or more, e.g. 1e-4")
        if not isinstance(self.value_embeddings, int) or not 0 <= self.value_embeddings <= self.n_layers // 2:
            raise ConfigError(
                f"model.value_embeddings = {self.value_embeddings!r}: must be 0 (off) to n_layers // 2 = "
                f"{self.n_layers // 2} (a table serves one of the first and one of the last blocks)"
            )
        if self.unet_skips and self.n_layers < 2:
            raise ConfigError("model.unet_skips needs at least 2 blocks (a first half to skip from); set n_layers >= 2")
        self._validate_moe()
        self._validate_rope_scaling()

    def _validate_rope_scaling(self) -> None:
        if self.rope_scaling == "none":
            return
        if self.positions != "rope":
            raise ConfigError(
                f"model.rope_scaling = {self.rope_scaling!r} scales rotary positions; set positions = 'rope'"
            )
        if not self.rope_scaling_factor > 1:
            raise ConfigError(
                f"model.rope_scaling_factor = {self.rope_scaling_factor}: must be above 1 (how many times the trained "
                "context the model should cover)"
            )
        if self.rope_scaling in ("yarn", "llama3") and not (self.rope_original_max_seq_len or 0) >= 1:
            raise ConfigError(
                f"model.rope_scaling = {self.rope_scaling!r} needs model.rope_original_max_seq_len: the context it was "
                "trained at"
            )
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ConfigError(
                f"model.rope_low_freq_factor = {self.rope_low_freq_factor} and model.rope_high_freq_factor = "
                f"{self.rope_high_freq_factor}: llama3 scaling needs 0 < low < high (Llama 3.1: 1 and 4)"
            )

    def _validate_moe(self) -> None:
        if self.moe_experts == 0:
            return
        if not isinstance(self.moe_experts, int) or self.moe_experts < 2:
            raise ConfigError(f"model.moe_experts = {self.moe_experts!r}: use 0 (dense) or at least 2 experts")
        if self.moe_top_k not in (1, 2) or self.moe_top_k > self.moe_experts:
            raise ConfigError(
                f"model.moe_top_k = {self.moe_top_k!r}: DeepSpeed's MoE routes each token to 1 or 2 experts; use 1 or 2"
            )
        if not isinstance(self.moe_every, int) or not 1 <= self.moe_every <= self.n_layers:
            raise ConfigError(
                f"model.moe_every = {self.moe_every!r}: must be 1 (every block sparse) to n_layers = {self.n_layers}"
            )
        if self.moe_capacity_factor <= 0 or self.moe_min_capacity < 0 or self.moe_aux_loss_coef < 0:
            raise ConfigError(
                "model.moe_capacity_factor must be positive, model.moe_min_capacity and model.moe_aux_loss_coef "
                "not negative"
            )
        if self.activation_checkpointing == "deepspeed":
            raise ConfigError(
                "model.activation_checkpointing = 'deepspeed' with model.moe_experts: DeepSpeed's recompute would "
                "drop the load-balancing loss's gradient (it is not a block output); use 'torch'"
            )

    def check_seq_len(self, seq_len: int) -> None:
        """A training or generation length must fit the position table / RoPE cache."""
        if seq_len > self.max_seq_len:
            what = "learned positions allow" if self.positions == "learned" else "the rotary cache holds"
            raise ConfigError(
                f"seq_len {seq_len} is longer than model.max_seq_len = {self.max_seq_len} ({what}); "
                f"use --seq-len {self.max_seq_len} or less, or raise model.max_seq_len"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _llama(
    d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, max_seq_len: int = 2048, mlp_hidden: int | None = None
) -> dict:
    return dict(
        vocab_size=32000,
        max_seq_len=max_seq_len,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        positions="rope",
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        mlp_hidden=mlp_hidden,
        bias=False,
        tie_embeddings=False,
    )


def _gpt2(d_model: int, n_layers: int, n_heads: int) -> dict:
    return dict(vocab_size=50257, max_seq_len=1024, n_layers=n_layers, d_model=d_model, n_heads=n_heads)


# CPU demo: llama-style, ~5M parameters at an 8k vocabulary
_TINY = dict(
    vocab_size=8192,
    max_seq_len=256,
    n_layers=4,
    d_model=256,
    n_heads=4,
    n_kv_heads=2,
    positions="rope",
    norm="rmsnorm",
    mlp="swiglu",
    mlp_multiple_of=64,
    bias=False,
    tie_embeddings=True,
)

PRESETS: dict[str, dict] = {
    "tiny": _TINY,
    # GPT-2 (learned positions, LayerNorm, GELU, biases, tied): 124M / 355M / 774M / 1.56B parameters
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-350m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    "gpt2-1.5b": _gpt2(1600, 48, 25),
    # Llama-style (RoPE, RMSNorm, SwiGLU, GQA, untied, 32k vocab): 125M / 336M / 1.26B / 3.0B / 7.2B
    "llama-125m": _llama(768, 12, 12, 4),
    "llama-350m": _llama(1024, 24, 16, 4),
    "llama-1.3b": _llama(2048, 24, 16, 8),
    "llama-3b": _llama(3072, 28, 24, 8),
    "llama-7b": _llama(4096, 32, 32, 8, max_seq_len=4096, mlp_hidden=14336),  # Mistral-7B shape
    # Mixture-of-Experts (DeepSpeed's MoE layer, top-2 as Mixtral): the CPU demo with 4 experts per block, and
    # Mixtral-8x7B's shape (46.7B parameters, 12.9B active per token)
    "tiny-moe": {**_TINY, "moe_experts": 4, "moe_top_k": 2},
    "mixtral-8x7b": {
        **_llama(4096, 32, 32, 8, max_seq_len=32768, mlp_hidden=14336),
        "rope_theta": 1e6,
        "moe_experts": 8,
        "moe_top_k": 2,
    },
}


def _parse_value(name: str, hint: Any, raw: Any) -> Any:
    """Turn a command-line string into the field's type, from its type hint (JSON values pass through)."""
    if not isinstance(raw, str):
        return raw
    options = typing.get_args(hint) or (hint,)
    kind = next((t for t in (bool, int, float) if t in options), str)
    if raw.lower() in ("none", "null") and type(None) in options:
        return None
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        return kind(raw)
    except ValueError:
        expected = " or ".join(getattr(t, "__name__", str(t)) for t in options)
        raise ConfigError(f"model.{name} = {raw!r}: expected {expected}") from None


def resolve_model_config(spec: str, overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A preset name or a JSON file, then `overrides` ({field: value}, values may be strings)."""
    if spec in PRESETS:
        values = dict(PRESETS[spec])
    elif spec.endswith(".json") or Path(spec).is_file():
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{spec}: no such model JSON file; pass a preset ({', '.join(PRESETS)}) or a JSON path")
        try:
            values = json.loads(path.read_text())
        except ValueError as err:
            raise ConfigError(f"{spec}: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{spec}: must hold a JSON object of model fields")
        values = values.get("model", values)
    else:
        raise ConfigError(f"--model {spec!r}: unknown preset; use one of {', '.join(PRESETS)} or a JSON file")
    return ModelConfig.from_dict(_with_overrides(values, overrides), where=spec)


def _with_overrides(values: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """`values` with each `--model.FIELD VALUE` of `overrides` parsed into the field's type."""
    hints = typing.get_type_hints(ModelConfig)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, raw in (overrides or {}).items():
        if name not in fields:
            raise ConfigError(f"--model.{name}: unknown model field; known fields: {', '.join(sorted(fields))}")
        values[name] = _parse_value(name, hints[name], raw)
    return values


def continued_model_config(trained: ModelConfig, overrides: dict[str, Any], where: str) -> ModelConfig:
    """The model of a run that starts from `trained`'s weights (`where` names them): its config with `overrides`,
    which may change only WEIGHT_FREE_FIELDS (an override equal to the trained value changes nothing)."""
    values = _with_overrides(trained.to_dict(), overrides)
    for name in overrides:
        if values[name] == getattr(trained, name):
            continue
        if name not in WEIGHT_FREE_FIELDS:
            raise ConfigError(
                f"--model.{name} {values[name]}: changes the shape of the weights of {where} ({name} = "
                f"{getattr(trained, name)!r} there); a run from trained weights may change only "
                f"{', '.join(WEIGHT_FREE_FIELDS)}: drop it"
            )
        if name == "max_seq_len" and trained.positions == "learned":
            raise ConfigError(
                f"--model.max_seq_len {values[name]}: {where} has learned positions, a table of {trained.max_seq_len} "
                "rows that cannot be resized; drop the override (only a RoPE model's context can be extended)"
            )
    return ModelConfig.from_dict(values, where=where)
