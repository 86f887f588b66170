"""`dsllm import --hf HF_DIR --output MODEL_DIR`: a Hugging Face checkpoint as a dsllm model folder, to continue
pretraining from (`pretrain.py --init MODEL_DIR`), fine-tune, evaluate, generate with or export again.

Families: GPT-2 (`GPT2LMHeadModel`), Llama 1/2/3 (grouped-query heads, linear / YaRN / llama3 RoPE scaling),
Mistral, Qwen2 (biases on q, k, v alone), Qwen3 (QK-norm) and Mixtral. The config maps field by field
(`model_config_of`); anything dsllm's model does not compute the same way is refused, naming the field. The weights
(safetensors, one file or sharded; `pytorch_model.bin` files read with `torch.load(weights_only=True)`) go through
`dsllm.hf_layout`'s rules backwards, the ones export writes with, and every tensor must find its place. They are
stored in fp32, as every dsllm model folder. `tokenizer.json` is copied as it is; `tests/unit/test_import.py` proves
logits parity with transformers for each family, and through export back.

Dropout is 0 whatever the checkpoint's config says (GPT-2's 0.1 was for its own training): set --model.dropout to
train with it. Mistral's sliding window becomes the model's context (max_seq_len = the window), within which the
window never binds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsllm.errors import ArgumentParser, UserError
from dsllm.hf_layout import from_hf, weight_rules
from dsllm.model_config import ConfigError, ModelConfig
from dsllm.tokenizer import TOKENIZER_FILE

if TYPE_CHECKING:
    import torch

# transformers' model_type -> dsllm's layout family (Mistral's weights are Llama's)
MODEL_TYPES = {
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "mixtral": "mixtral",
}
_ROPE_TYPES = {"default": "none", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}
_GELUS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# tensors some checkpoints carry that are buffers, not weights (GPT-2's causal mask, old Llama's RoPE frequencies)
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


class _Fields:
    """The HF config's values, each read once; `refuse` names a field in the one-line error."""

    def __init__(self, values: dict, where: str):
        self.values, self.where = values, where

    def get(self, name: str, default: Any = None) -> Any:
        value = self.values.get(name)
        return default if value is None else value

    def need(self, name: str) -> Any:
        if self.values.get(name) is None:
            raise UserError(f"{self.where}: no {name!r}; it is not a complete {self.values.get('model_type')} config")
        return self.values[name]

    def refuse(self, name: str, why: str) -> UserError:
        return UserError(f"{self.where}: {name} = {self.values.get(name)!r}: {why}")


def model_config_of(hf: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """(the dsllm ModelConfig, the hf_layout family) of a transformers config.json's values; refuses what dsllm's
    model would compute otherwise, naming the field."""
    f = _Fields(hf, where)
    model_type = f.get("model_type")
    if model_type not in MODEL_TYPES:
        raise f.refuse("model_type", f"not importable; dsllm imports {', '.join(MODEL_TYPES)}")
    if f.get("quantization_config") is not None:
        raise f.refuse("quantization_config", "a quantized checkpoint; import the full-precision one")
    family = MODEL_TYPES[model_type]
    common = dict(vocab_size=f.need("vocab_size"), init_std=float(f.get("initializer_range", 0.02)), dropout=0.0)
    if family == "gpt2":
        fields = _gpt2_fields(f)
    else:
        fields = _llama_fields(f, family)
    try:
        return ModelConfig(**common, **fields), family
    except ConfigError as err:
        raise UserError(f"{where}: {err}") from None


def _gpt2_fields(f: _Fields) -> dict:
    activation = f.get("activation_function", "gelu_new")
    if activation not in _GELUS:
        raise f.refuse("activation_function", f"dsllm's GPT-2 MLP computes {', '.join(_GELUS)}")
    if not f.get("scale_attn_weights", True) or f.get("scale_attn_by_inverse_layer_idx", False):
        name = "scale_attn_weights" if not f.get("scale_attn_weights", True) else "scale_attn_by_inverse_layer_idx"
        raise f.refuse(name, "dsllm scales attention scores by 1/sqrt(head size) only")
    d = f.need("n_embd")
    return dict(
        max_seq_len=f.need("n_positions"),
        n_layers=f.need("n_layer"),
        d_model=d,
        n_heads=f.need("n_head"),
        positions="learned",
        norm="layernorm",
        norm_eps=float(f.get("layer_norm_epsilon", 1e-5)),
        mlp=_GELUS[activation],
        mlp_hidden=f.get("n_inner", 4 * d),
        bias=True,
        tie_embeddings=bool(f.get("tie_word_embeddings", True)),
    )


def _llama_fields(f: _Fields, family: str) -> dict:
    if f.get("hidden_act", "silu") != "silu":
        raise f.refuse("hidden_act", "dsllm's SwiGLU MLP computes silu(gate) x up")
    d, heads = f.need("hidden_size"), f.need("num_attention_heads")
    if f.get("head_dim", d // heads) != d // heads:
        raise f.refuse("head_dim", f"dsllm's heads are hidden_size / num_attention_heads = {d // heads} wide")
    max_seq_len = f.need("max_position_embeddings")
    window = f.get("sliding_window") if f.get("use_sliding_window", family in ("llama", "mixtral")) else None
    if window is not None and window < max_seq_len:
        max_seq_len = window  # within the window every token sees all before it: full causal attention
    fields = dict(
        max_seq_len=max_seq_len,
        n_layers=f.need("num_hidden_layers"),
        d_model=d,
        n_heads=heads,
        n_kv_heads=f.get("num_key_value_heads", heads),
        positions="rope",
        norm="rmsnorm",
        norm_eps=float(f.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        mlp_hidden=f.need("intermediate_size"),
        bias=False,
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        **_rope_fields(f),
    )
    attention_bias = bool(f.get("attention_bias", False))
    if family == "llama":
        if attention_bias != bool(f.get("mlp_bias", attention_bias)):
            raise f.refuse(
                "mlp_bias", f"dsllm's biases are on attention and MLP together (attention_bias is {attention_bias})"
            )
        fields["bias"] = attention_bias
    elif attention_bias:
        raise f.refuse("attention_bias", f"{f.get('model_type')} has no output-projection bias in dsllm's layout")
    if family == "qwen2":
        fields["qkv_bias"] = True
    if family == "qwen3":
        fields["qk_norm"] = True
    if family == "mixtral":
        if f.get("num_experts_per_tok", 2) != 2:
            raise f.refuse("num_experts_per_tok", "dsllm's Mixtral routes each token to 2 experts")
        fields.update(
            moe_experts=f.need("num_local_experts"),
            moe_top_k=2,
            moe_every=1,
            moe_aux_loss_coef=float(f.get("router_aux_loss_coef", 0.01)),
        )
    return fields


def _rope_fields(f: _Fields) -> dict:
    """RoPE's base and scaling from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (before)."""
    params = f.get("rope_parameters") or f.get("rope_scaling") or {}
    name = "rope_parameters" if f.get("rope_parameters") else "rope_scaling"
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise UserError(
            f"{f.where}: {name} type {kind!r}: dsllm computes {', '.join(_ROPE_TYPES)} RoPE (dynamic scaling changes "
            "with the sequence length)"
        )
    if float(f.get("partial_rotary_factor", 1.0)) != 1.0:
        raise f.refuse("partial_rotary_factor", "dsllm rotates every dimension of a head")
    theta = float(params.get("rope_theta", f.get("rope_theta", 10000.0)))
    fields = dict(rope_theta=theta, rope_scaling=_ROPE_TYPES[kind])
    if kind == "default":
        return fields
    fields["rope_scaling_factor"] = float(params["factor"])
    if kind in ("yarn", "llama3"):
        fields["rope_original_max_seq_len"] = params.get("original_max_position_embeddings")
    if kind == "yarn":
        for key, value in (("beta_fast", 32.0), ("beta_slow", 1.0), ("attention_factor", None), ("mscale", None)):
            if params.get(key) not in (None, value):
                raise UserError(f"{f.where}: {name} {key} = {params[key]!r}: dsllm's YaRN uses {key} = {value}")
    if kind == "llama3":
        fields.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
        )
    return fields


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `hf_dir`, by its name: model.safetensors (or its shards, by
    model.safetensors.index.json), else pytorch_model.bin (or its shards) loaded with weights_only=True."""
    import torch
    from safetensors import SafetensorError, safe_open

    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (hf_dir / index).is_file():
            try:
                files = sorted(set(json.loads((hf_dir / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, AttributeError) as err:
                raise UserError(f"{hf_dir / index}: not a shard index ({err}); the download is damaged") from None
        elif (hf_dir / single).is_file():
            files = [single]
        else:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise UserError(f"{path}: missing, named by {hf_dir / index}; the download is incomplete")
            try:
                if name.endswith(".safetensors"):
                    with safe_open(str(path), framework="pt") as shard:
                        tensors.update({key: shard.get_tensor(key) for key in shard.keys()})
                else:
                    tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            except (SafetensorError, OSError, RuntimeError, ValueError) as err:
                detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise UserError(f"{path}: cannot read it ({detail}); the file is damaged") from None
        return tensors
    raise UserError(f"{hf_dir}: no model.safetensors or pytorch_model.bin (nor a shard index); not a checkpoint folder")


def _stacked_experts(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Mixtral's checkpoints keep each expert apart (block_sparse_moe.experts.E.w1 / w3 / w2: gate, up, down; what
    transformers still saves); its model, and `dsllm.hf_layout`, stack them (mlp.experts.gate_up_proj, down_proj)."""
    import torch

    out = dict(weights)
    for i in range(config.n_layers):
        old, new = f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp."
        if f"{old}gate.weight" not in out:
            continue
        out[f"{new}gate.weight"] = out.pop(f"{old}gate.weight")
        experts = [{w: out.pop(f"{old}experts.{e}.{w}.weight", None) for w in ("w1", "w2", "w3")}
                   for e in range(config.moe_experts)]  # fmt: skip
        if any(t is None for expert in experts for t in expert.values()):
            raise UserError(f"model.layers.{i}: an expert's w1, w2 or w3 is missing; the checkpoint is incomplete")
        out[f"{new}experts.gate_up_proj"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in experts])
        out[f"{new}experts.down_proj"] = torch.stack([x["w2"] for x in experts])
    return out


def import_hf(hf_dir: str | Path, output: str | Path, overwrite: bool = False) -> tuple[Path, ModelConfig]:
    """Write the model folder for the checkpoint in `hf_dir` (staged, renamed when whole)."""
    import torch

    from dsllm.model import GPT
    from dsllm.model_dir import save_model_dir
    from dsllm.paths import staged_folder

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"{hf_dir}: no config.json; pass a Hugging Face model folder (save_pretrained's output)")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as err:
        raise UserError(f"{config_file}: not JSON ({err})") from None
    config, family = model_config_of(hf, str(config_file))
    tokenizer = hf_dir / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise UserError(
            f"{hf_dir}: no {TOKENIZER_FILE}; write it with transformers: "
            f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) (a fast tokenizer saves {TOKENIZER_FILE})"
        )
    with staged_folder(output, overwrite) as stage:  # (an output in the way is said before the weights are read)
        weights = {k: v for k, v in read_hf_weights(hf_dir).items() if not (k.endswith(_BUFFERS) and "weight" not in k)}
        if family == "gpt2" and not any(k.startswith("transformer.") for k in weights):  # saved from GPT2Model
            weights = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in weights.items()}
        if family == "mixtral":
            weights = _stacked_experts(weights, config)
        state = from_hf(weights, weight_rules(config, family), str(hf_dir))
        with torch.device("meta"):
            model = GPT(config, seed=0)  # no values drawn: every one comes from the checkpoint
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
            state["lm_head.weight"] = state["tok_embeddings.weight"]
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
        except RuntimeError as err:
            detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:200])
            raise UserError(
                f"{hf_dir}: the weights do not fit its config.json ({detail}); the folder is inconsistent"
            ) from None
        if config.tie_embeddings:
            model.lm_head.weight = model.tok_embeddings.weight
        imported = {
            "from": str(hf_dir.resolve()),
            "model_type": hf["model_type"],
            "architectures": hf.get("architectures"),
            "torch_dtype": hf.get("torch_dtype", hf.get("dtype")),
        }
        save_model_dir(model, stage, tokenizer, extra={"imported": imported})
        for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, stage / f"hf_{name}")
    return Path(output), config


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm import",
        description="Import a Hugging Face checkpoint (GPT-2, Llama 1/2/3, Mistral, Qwen2, Qwen3, Mixtral) as a dsllm "
        "model folder, to continue pretraining from (--init), fine-tune, evaluate, generate or export.",
    )
    parser.add_argument(
        "--hf",
        required=True,
        metavar="HF_DIR",
        help="a Hugging Face model folder: config.json, safetensors (or .bin) weights, tokenizer.json",
    )
    parser.add_argument("--output", required=True, metavar="MODEL_DIR", help="the model folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace MODEL_DIR when it already holds files")
    return parser


def main(argv=None) -> int:
    """`dsllm import --hf HF_DIR --output MODEL_DIR`."""
    args = build_parser().parse_args(argv)
    from dsllm.paths import check_output_apart

    check_output_apart(args.output, "--output", [("--hf", args.hf)])
    out, config = import_hf(args.hf, args.output, overwrite=args.overwrite)
    print(f"imported {config.num_parameters():,} parameters ({args.hf}) to {out}")
    return 0
