"""Hugging Face export: safetensors + config.json + tokenizer files that `AutoModelForCausalLM` and
`AutoTokenizer` load with no extra code.

GPT-2 options (learned positions, LayerNorm, GELU or its tanh approximation, biases, no GQA) map to
`GPT2LMHeadModel`; RoPE + RMSNorm + SwiGLU (+GQA) to `LlamaForCausalLM`, with biases on q, k and v alone to
`Qwen2ForCausalLM`, with QK-norm (no biases) to `Qwen3ForCausalLM`, with experts to `MixtralForCausalLM`. Where each
weight goes (our fused qkv and SwiGLU fc split, GPT-2's Conv1D transposed) is `dsllm.hf_layout`'s, which `dsllm
import` reads backwards. `tests/unit/test_export.py` proves logits parity for every family.

The tokenizer is exported as the model was trained: every document starts with <|endoftext|>, so plain
`AutoTokenizer.from_pretrained(folder)(prompt)` puts it first, as `python -m dsllm generate` does
(`tests/unit/test_hf_parity.py` proves greedy generation gives the same tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, processors

from dsllm.errors import ArgumentParser
from dsllm.hf_layout import to_hf, weight_rules
from dsllm.model_config import ConfigError, ModelConfig
from dsllm.paths import staged_folder
from dsllm.tokenizer import EOT_TOKEN, TOKENIZER_FILE, document_token, eot_id, load_tokenizer

if TYPE_CHECKING:  # torch loads inside the functions that use it, so `--help` answers at once
    import torch

    from dsllm.model import GPT

_GPT2_NEEDS = {"positions": "learned", "norm": "layernorm", "mlp": ("gelu", "gelu_tanh"), "bias": True}
_LLAMA_NEEDS = {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu"}
_QWEN3_NEEDS = {**_LLAMA_NEEDS, "bias": False, "moe_experts": 0}
_MIXTRAL_NEEDS = {"bias": False, "moe_every": 1, "moe_top_k": 2}
_MIXTRAL_WHY = {
    "moe_every": " (every block sparse)",
    "moe_top_k": " (it renormalises the chosen experts' gates, so one expert gets weight 1; DeepSpeed's top-1 keeps "
    "the gate's probability)",
}


def hf_family(config: ModelConfig) -> str:
    """'gpt2', 'llama', 'qwen2', 'qwen3' or 'mixtral' (`dsllm.hf_layout.FAMILIES`); any other combination raises
    ConfigError naming the option with no equivalent."""
    for field in ("value_embeddings", "unet_skips"):
        if getattr(config, field):
            raise ConfigError(
                f"model.{field} = {getattr(config, field)!r} has no Hugging Face architecture (the speedrun's "
                f"blocks are not a transformers model); export refuses it: train with {field} off to export"
            )
    if config.mlp == "relu2":
        raise ConfigError(
            "model.mlp = 'relu2' has no Hugging Face architecture (none pairs a squared-ReLU MLP with these blocks); "
            "export refuses it: train with mlp = 'swiglu' (Llama, Qwen3) or 'gelu' (GPT-2) to export"
        )
    if config.logit_softcap:
        raise ConfigError(
            f"model.logit_softcap = {config.logit_softcap} has no Hugging Face equivalent for these blocks (Gemma2's "
            "final_logit_softcapping comes with Gemma2's own norms, MLP and embedding scale); export refuses a "
            "soft-capped model: train with logit_softcap null to export"
        )
    qwen2_shaped = not config.bias and config.positions == "rope" and not config.qk_norm and not config.moe_experts
    if config.has_qkv_bias != config.bias and not qwen2_shaped:
        raise ConfigError(
            f"model.qkv_bias = {config.qkv_bias!r} with bias = {config.bias!r} has no Hugging Face equivalent: only "
            "Qwen2ForCausalLM (RoPE, RMSNorm, SwiGLU, bias = false, no QK-norm or experts) has q, k, v biases alone"
        )
    if config.qk_norm:  # Qwen3ForCausalLM: Llama's blocks with an RMSNorm over each head's queries and keys
        for field, value in _QWEN3_NEEDS.items():
            if getattr(config, field) != value:
                raise ConfigError(
                    f"model.{field} = {getattr(config, field)!r} has no Hugging Face equivalent with model.qk_norm: "
                    f"Qwen3ForCausalLM needs {field} = {value!r}"
                )
        return "qwen3"
    if config.moe_experts:  # MixtralForCausalLM: Llama's blocks, each MLP sparse
        for field, value in {**_LLAMA_NEEDS, **_MIXTRAL_NEEDS}.items():
            if getattr(config, field) != value:
                raise ConfigError(
                    f"model.{field} = {getattr(config, field)!r} has no Hugging Face equivalent for a "
                    f"Mixture-of-Experts model: MixtralForCausalLM needs {field} = {value!r}"
                    + _MIXTRAL_WHY.get(field, "")
                )
        return "mixtral"
    if config.positions == "learned":
        family, needs, name = "gpt2", _GPT2_NEEDS, "GPT2LMHeadModel"
    elif config.has_qkv_bias and not config.bias:
        family, needs, name = "qwen2", _LLAMA_NEEDS, "Qwen2ForCausalLM"
    else:
        family, needs, name = "llama", _LLAMA_NEEDS, "LlamaForCausalLM"
    for field, value in needs.items():
        allowed = value if isinstance(value, tuple) else (value,)
        if getattr(config, field) not in allowed:
            raise ConfigError(
                f"model.{field} = {getattr(config, field)!r} has no Hugging Face equivalent with "
                f"positions = {config.positions!r}: {name} needs {field} = {' or '.join(map(repr, allowed))}"
            )
    if family == "gpt2" and config.kv_heads != config.n_heads:
        raise ConfigError(
            f"model.n_kv_heads = {config.n_kv_heads} has no Hugging Face equivalent with learned "
            "positions: GPT2LMHeadModel has no grouped-query attention (use positions = 'rope' for GQA)"
        )
    return family


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights by the names (and in the layout) of its Hugging Face family (`dsllm.hf_layout`)."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    return to_hf(sd, weight_rules(model.config, hf_family(model.config)))


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
            "activation_function": "gelu_new" if config.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": config.norm_eps,
            "resid_pdrop": config.dropout,
            "embd_pdrop": config.dropout,
            "attn_pdrop": config.dropout,
            "scale_attn_weights": True,
        }
    if hf_family(config) == "mixtral":
        common = {
            **common,
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": config.moe_experts,
            "num_experts_per_tok": config.moe_top_k,
            "router_aux_loss_coef": config.moe_aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": False,
            "sliding_window": None,
        }
    elif hf_family(config) == "qwen3":
        common = {**common, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False}
    elif hf_family(config) == "qwen2":
        common = {**common, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
    else:
        common = {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {
        **common,
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
        "rope_parameters": hf_rope_parameters(config),
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "attention_dropout": config.dropout,
    }


def hf_rope_parameters(config: ModelConfig) -> dict:
    """transformers' `rope_parameters` for the model's RoPE scaling (`dsllm.model.rope_frequencies`)."""
    if config.rope_scaling in ("none", "ntk"):  # NTK-aware scaling is plain RoPE with a larger base
        return {"rope_type": "default", "rope_theta": config.rope_base}
    parameters = {
        "rope_type": config.rope_scaling,
        "rope_theta": config.rope_theta,
        "factor": config.rope_scaling_factor,
    }
    if config.rope_scaling == "yarn":
        parameters.update(
            original_max_position_embeddings=config.rope_original_max_seq_len, beta_fast=32.0, beta_slow=1.0
        )
    if config.rope_scaling == "llama3":
        parameters.update(
            original_max_position_embeddings=config.rope_original_max_seq_len,
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
        )
    return parameters


def hf_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer with its document token (<|endoftext|> for dsllm's own: `document_token`) put before every text,
    as before every document in training (a pair of texts is two documents). The tokenizer's own post-processor runs
    first when it adds no tokens (a byte-level one only trims offsets); one that adds its own (an imported Llama's
    <s> template) is replaced, as dsllm never runs it (`dsllm generate` encodes without special tokens)."""
    tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: the caller's tokenizer stays as it was
    token = document_token(tokenizer)
    start = processors.TemplateProcessing(
        single=f"{token} $A", pair=f"{token} $A {token}:1 $B:1", special_tokens=[(token, eot_id(tokenizer))]
    )
    own = tokenizer.post_processor
    adds = own is not None and tokenizer.encode("a").ids != tokenizer.encode("a", add_special_tokens=False).ids
    tokenizer.post_processor = start if own is None or adds else processors.Sequence([own, start])
    return tokenizer


def hf_tokenizer_config(max_seq_len: int, token: str = EOT_TOKEN) -> dict:
    """tokenizer_config.json for transformers' PreTrainedTokenizerFast: `token` starts a document (put there by
    tokenizer.json's post-processor; add_bos_token says so to the transformers versions that read it), ends one, and
    pads batches (left, as `dsllm generate` pads, so every row's newest token is last)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **hf_special_tokens(token),
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }


def hf_special_tokens(token: str = EOT_TOKEN) -> dict:
    """The document token (`dsllm.tokenizer.document_token`) in every special role, as dsllm trains and generates."""
    return {"bos_token": token, "eos_token": token, "unk_token": token, "pad_token": token}


def hf_generation_config(eos: int, model_vocab_size: int, tokenizer_vocab_size: int) -> dict:
    """generation_config.json: greedy unless asked, stop at <|endoftext|>, pad with it. No max_length: transformers
    warns on every call that passes max_new_tokens when the config sets max_length. Ids past the tokenizer's
    vocabulary (padding rows of the embedding) are suppressed, as `dsllm generate` never produces them."""
    generation = {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos}
    if model_vocab_size > tokenizer_vocab_size:
        generation["suppress_tokens"] = list(range(tokenizer_vocab_size, model_vocab_size))
    return generation


def export_hf(
    model: GPT, tokenizer_file: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write the Hugging Face folder; staged under a temporary name and renamed when complete."""
    from safetensors.torch import save_file

    tokenizer = load_tokenizer(tokenizer_file)
    eos = eot_id(tokenizer)
    state = hf_state_dict(model)  # refuses unsupported option sets before anything is written

    with staged_folder(output, overwrite) as stage:

        def write_json(name: str, value: dict) -> None:
            (stage / name).write_text(json.dumps(value, indent=2) + "\n")

        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        write_json("config.json", hf_config(model.config, eos))
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        write_json("generation_config.json", hf_generation_config(eos, model.config.vocab_size, vocab_size))
        hf_tokenizer(tokenizer).save(str(stage / TOKENIZER_FILE))
        token = document_token(tokenizer)
        write_json("tokenizer_config.json", hf_tokenizer_config(model.config.max_seq_len, token))
        write_json("special_tokens_map.json", hf_special_tokens(token))
    return Path(output)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm export",
        description="Export a model to a Hugging Face folder that AutoModelForCausalLM and AutoTokenizer load "
        "(GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or MixtralForCausalLM, "
        "safetensors; the tokenizer starts each text with <|endoftext|>).",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR",
        help="the model to export: a run folder (its final weights, else its newest checkpoint), a "
        "checkpoints/stepNNNNNNNN folder (any ZeRO stage and world size), or a model folder",
    )
    parser.add_argument(
        "--output",
        required=True,
        metavar="HF_DIR",
        help="folder to write (config.json, model.safetensors, tokenizer files); it must be new or empty",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace HF_DIR when it already holds files (they are deleted)"
    )
    return parser


def main(argv=None) -> int:
    """`python -m dsllm export --checkpoint RUN_DIR --output HF_DIR`."""
    args = build_parser().parse_args(argv)
    # the heavy imports (torch) come after parsing, so --help and a bad option answer at once
    from dsllm.model_dir import load_model_dir, model_inputs, resolve_model_source
    from dsllm.paths import check_output_apart

    check_output_apart(args.output, "--output", model_inputs(args.checkpoint, "--checkpoint"))
    model = load_model_dir(args.checkpoint)
    home = resolve_model_source(args.checkpoint)[2]
    out = export_hf(model, home / TOKENIZER_FILE, args.output, overwrite=args.overwrite)
    print(f"exported {hf_config(model.config, 0)['architectures'][0]} to {out}")
    return 0
