"""Hugging Face export: safetensors + config.json + tokenizer files that `AutoModelForCausalLM` and
`AutoTokenizer` load with no extra code.

GPT-2 options (learned positions, LayerNorm, GELU, biases, no GQA) map to `GPT2LMHeadModel`;
RoPE + RMSNorm + SwiGLU (+GQA) to `LlamaForCausalLM`. Our fused weights are split here, in the
order the model lays them out: qkv = [q | k | v], SwiGLU fc = [gate | up]. GPT-2's Conv1D stores
weights as [in, out], so those are transposed. RoPE uses the half-split layout on both sides, so
no permutation is needed. `tests/test_export.py` proves logits parity for every family.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import ConfigError, ModelConfig
from dsllm.tokenizer import EOT_TOKEN, TOKENIZER_FILE, eot_id, load_tokenizer

_GPT2_NEEDS = {"positions": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True}
_LLAMA_NEEDS = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}


def hf_family(config: ModelConfig) -> str:
    """'gpt2' or 'llama'; any other combination raises ConfigError naming the option with no equivalent."""
    family, needs, name = (
        ("gpt2", _GPT2_NEEDS, "GPT2LMHeadModel")
        if config.positions == "learned"
        else ("llama", _LLAMA_NEEDS, "LlamaForCausalLM")
    )
    for field, value in needs.items():
        if getattr(config, field) != value:
            raise ConfigError(
                f"model.{field} = {getattr(config, field)!r} has no Hugging Face equivalent with "
                f"positions = {config.positions!r}: {name} needs {field} = {value!r}"
            )
    if family == "gpt2" and config.kv_heads != config.n_heads:
        raise ConfigError(
            f"model.n_kv_heads = {config.n_kv_heads} has no Hugging Face equivalent with learned "
            "positions: GPT2LMHeadModel has no grouped-query attention (use positions = 'rope' for GQA)"
        )
    return family


def _split_qkv(weight: torch.Tensor, config: ModelConfig):
    q = config.n_heads * config.head_dim
    kv = config.kv_heads * config.head_dim
    return weight.split([q, kv, kv], dim=0)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    config, family = model.config, hf_family(model.config)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if family == "gpt2":
        out["transformer.wte.weight"] = sd["tok_embeddings.weight"]
        out["transformer.wpe.weight"] = sd["pos_embeddings.weight"]
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[f"{theirs}{b}.weight"], out[f"{theirs}{b}.bias"] = sd[f"{ours}{a}.weight"], sd[f"{ours}{a}.bias"]
            for a, b in (
                ("attn.qkv", "attn.c_attn"),
                ("attn.proj", "attn.c_proj"),
                ("mlp.fc", "mlp.c_fc"),
                ("mlp.proj", "mlp.c_proj"),
            ):
                out[f"{theirs}{b}.weight"] = sd[f"{ours}{a}.weight"].t()  # Conv1D: [in, out]
                out[f"{theirs}{b}.bias"] = sd[f"{ours}{a}.bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = sd["norm.weight"], sd["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_embeddings.weight"]
        for i in range(config.n_layers):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            out[f"{theirs}input_layernorm.weight"] = sd[f"{ours}norm1.weight"]
            out[f"{theirs}post_attention_layernorm.weight"] = sd[f"{ours}norm2.weight"]
            names = ("q_proj", "k_proj", "v_proj")
            for kind in ("weight", "bias") if config.bias else ("weight",):
                for name, part in zip(names, _split_qkv(sd[f"{ours}attn.qkv.{kind}"], config)):
                    out[f"{theirs}self_attn.{name}.{kind}"] = part
                out[f"{theirs}self_attn.o_proj.{kind}"] = sd[f"{ours}attn.proj.{kind}"]
                gate, up = sd[f"{ours}mlp.fc.{kind}"].chunk(2, dim=0)
                out[f"{theirs}mlp.gate_proj.{kind}"], out[f"{theirs}mlp.up_proj.{kind}"] = gate, up
                out[f"{theirs}mlp.down_proj.{kind}"] = sd[f"{ours}mlp.proj.{kind}"]
        out["model.norm.weight"] = sd["norm.weight"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def hf_config(config: ModelConfig, eos: int) -> dict:
    common = {
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
        "initializer_range": config.init_std,
    }
    if hf_family(config) == "gpt2":
        return {
            **common,
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": config.d_model,
            "n_layer": config.n_layers,
            "n_head": config.n_heads,
            "n_positions": config.max_seq_len,
            "n_inner": config.mlp_hidden_size,
            "activation_function": "gelu",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
        }
    return {
        **common,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.d_model,
        "intermediate_size": config.mlp_hidden_size,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
    }


def export_hf(
    model: GPT, tokenizer_file: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the Hugging Face folder; staged under a temporary name and renamed when complete."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another --output")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output}: exists and is not empty; pass --overwrite to replace it or choose another --output")
    tokenizer = load_tokenizer(tokenizer_file)
    eos = eot_id(tokenizer)
    state = hf_state_dict(model)  # refuses unsupported option sets before anything is written
    stage = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(hf_config(model.config, eos), indent=2) + "\n")
        (stage / "generation_config.json").write_text(
            json.dumps({"bos_token_id": eos, "eos_token_id": eos, "max_length": model.config.max_seq_len}, indent=2)
            + "\n"
        )
        shutil.copyfile(tokenizer_file, stage / TOKENIZER_FILE)
        special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
        (stage / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    **special,
                    "model_max_length": model.config.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            )
            + "\n"
        )
        (stage / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        os.replace(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return output


def main(argv=None) -> int:
    """`python -m dsllm export --checkpoint RUN_DIR --output HF_DIR`."""
    from dsllm.checkpoint import load_model_dir, resolve_model_source
    from dsllm.errors import ArgumentParser
    from dsllm.paths import check_output_apart, model_inputs

    parser = ArgumentParser(prog="python -m dsllm export", description="Export a model to a Hugging Face folder.")
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="run folder, checkpoints/stepNNNNNNNN folder (any ZeRO stage), or model folder",
    )
    parser.add_argument("--output", required=True, metavar="HF_DIR", help="folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty HF_DIR")
    args = parser.parse_args(argv)
    check_output_apart(args.output, "--output", model_inputs(args.checkpoint, "--checkpoint"))
    model = load_model_dir(args.checkpoint)
    home = resolve_model_source(args.checkpoint)[2]
    out = export_hf(model, home / TOKENIZER_FILE, args.output, overwrite=args.overwrite)
    print(f"exported {hf_config(model.config, 0)['architectures'][0]} to {out}")
    return 0
