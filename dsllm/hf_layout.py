"""Where each dsllm weight sits in a Hugging Face checkpoint, one owner for `dsllm export` and `dsllm import`.

A family's layout is a list of `Rule`s, each tying some of our tensors to some of theirs: copied, transposed (GPT-2's
Conv1D stores [in, out]), split (our fused qkv = [q | k | v], SwiGLU fc = [gate | up], along dim 0) or stacked
(Mixtral's experts, one tensor of all of them). `to_hf` applies the rules one way, `from_hf` the other, so the two
commands cannot disagree about a name, an order or an orientation. RoPE is the half-split layout on both sides: no
permutation. `tests/unit/test_export.py` and `tests/unit/test_import.py` prove logits parity both ways.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dsllm.errors import UserError

if TYPE_CHECKING:
    import torch

    from dsllm.model_config import ModelConfig

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mixtral")


@dataclasses.dataclass(frozen=True)
class Rule:
    """`ours` and `theirs` hold the same numbers: kind "copy" and "transpose" tie one tensor to one; "split" one of
    ours to several of theirs (concatenated on dim 0, `sizes` rows each); "stack" several of ours to one of theirs
    (stacked on a new dim 0)."""

    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    kind: str = "copy"
    sizes: tuple[int, ...] = ()


def weight_rules(config: ModelConfig, family: str) -> list[Rule]:
    """The layout of `family` ('gpt2', 'llama', 'qwen2', 'qwen3' or 'mixtral') for a model of `config`; a tied LM
    head has no rule of its own (it is the embedding)."""
    if family == "gpt2":
        return _gpt2_rules(config)
    rules = [Rule(("tok_embeddings.weight",), ("model.embed_tokens.weight",))]
    q, kv = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        rules += [
            Rule((f"{ours}norm1.weight",), (f"{theirs}input_layernorm.weight",)),
            Rule((f"{ours}norm2.weight",), (f"{theirs}post_attention_layernorm.weight",)),
        ]
        if config.qk_norm:
            rules += [
                Rule((f"{ours}attn.q_norm.weight",), (f"{theirs}self_attn.q_norm.weight",)),
                Rule((f"{ours}attn.k_norm.weight",), (f"{theirs}self_attn.k_norm.weight",)),
            ]
        projections = [f"{theirs}self_attn.{name}_proj" for name in "qkv"]
        for kind in ("weight", "bias") if config.has_qkv_bias else ("weight",):
            qkv = tuple(f"{p}.{kind}" for p in projections)
            rules.append(Rule((f"{ours}attn.qkv.{kind}",), qkv, "split", (q, kv, kv)))
        for kind in ("weight", "bias") if config.bias else ("weight",):
            rules.append(Rule((f"{ours}attn.proj.{kind}",), (f"{theirs}self_attn.o_proj.{kind}",)))
            if family == "mixtral":
                continue
            hidden = config.mlp_hidden_size
            gate_up = (f"{theirs}mlp.gate_proj.{kind}", f"{theirs}mlp.up_proj.{kind}")
            rules += [
                Rule((f"{ours}mlp.fc.{kind}",), gate_up, "split", (hidden, hidden)),
                Rule((f"{ours}mlp.proj.{kind}",), (f"{theirs}mlp.down_proj.{kind}",)),
            ]
        if family == "mixtral":  # the router, and the experts stacked: [gate | up] as ours, then down
            moe = f"{ours}mlp.deepspeed_moe."
            experts = [f"{moe}experts.deepspeed_experts.{e}." for e in range(config.moe_experts)]
            rules += [
                Rule((f"{moe}gate.wg.weight",), (f"{theirs}mlp.gate.weight",)),
                Rule(tuple(f"{e}fc.weight" for e in experts), (f"{theirs}mlp.experts.gate_up_proj",), "stack"),
                Rule(tuple(f"{e}proj.weight" for e in experts), (f"{theirs}mlp.experts.down_proj",), "stack"),
            ]
    rules.append(Rule(("norm.weight",), ("model.norm.weight",)))
    if not config.tie_embeddings:
        rules.append(Rule(("lm_head.weight",), ("lm_head.weight",)))
    return rules


def _gpt2_rules(config: ModelConfig) -> list[Rule]:
    rules = [
        Rule(("tok_embeddings.weight",), ("transformer.wte.weight",)),
        Rule(("pos_embeddings.weight",), ("transformer.wpe.weight",)),
    ]
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
            rules += [Rule((f"{ours}{a}.{kind}",), (f"{theirs}{b}.{kind}",)) for kind in ("weight", "bias")]
        for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                     ("mlp.proj", "mlp.c_proj")):  # fmt: skip
            rules += [
                Rule((f"{ours}{a}.weight",), (f"{theirs}{b}.weight",), "transpose"),  # Conv1D: [in, out]
                Rule((f"{ours}{a}.bias",), (f"{theirs}{b}.bias",)),
            ]
    rules += [Rule((f"norm.{kind}",), (f"transformer.ln_f.{kind}",)) for kind in ("weight", "bias")]
    if not config.tie_embeddings:
        rules.append(Rule(("lm_head.weight",), ("lm_head.weight",)))
    return rules


def to_hf(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    """Our state dict (by our names) as the family's tensors (contiguous copies)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = [ours[name] for name in rule.ours]
        if rule.kind == "copy":
            parts = tensors
        elif rule.kind == "transpose":
            parts = [tensors[0].t()]
        elif rule.kind == "split":
            parts = list(tensors[0].split(list(rule.sizes), dim=0))
        else:  # stack
            parts = [torch.stack(tensors)]
        out.update(zip(rule.theirs, parts))
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


def from_hf(theirs: dict[str, torch.Tensor], rules: list[Rule], where: str) -> dict[str, torch.Tensor]:
    """The family's tensors as our state dict. A tensor the rules need and `theirs` lacks, or one they do not use,
    is a UserError naming it (`where`: the checkpoint, for the message)."""
    import torch

    needed = [name for rule in rules for name in rule.theirs]
    missing = [name for name in needed if name not in theirs]
    if missing:
        raise UserError(
            f"{where}: no tensor {missing[0]!r} ({len(missing)} missing); the checkpoint is incomplete or its "
            "config.json describes another model"
        )
    unused = sorted(set(theirs) - set(needed) - {"lm_head.weight"})  # (a tied head may be saved anyway)
    if unused:
        raise UserError(
            f"{where}: tensor {unused[0]!r} has no place in the model its config.json describes ({len(unused)} "
            "unused); dsllm cannot import this architecture variant"
        )
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        tensors = [theirs[name] for name in rule.theirs]
        if rule.kind == "copy":
            parts = tensors
        elif rule.kind == "transpose":
            parts = [tensors[0].t()]
        elif rule.kind == "split":
            parts = [torch.cat(tensors, dim=0)]
        else:  # stack (each expert its own storage: safetensors refuses views of one)
            parts = [expert.clone() for expert in tensors[0].unbind(0)]
        out.update(zip(rule.ours, parts))
    return {name: tensor.contiguous() for name, tensor in out.items()}
