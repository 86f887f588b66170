"""Tensor parallelism: DeepSpeed's AutoTP (training mode) splits the GPT's layers over consecutive ranks.

We hand AutoTP our own layer specs (its `partition_config`) instead of letting it guess from module names:

- `attn.qkv` is column-parallel over three unequal sub-parameters [q | k | v] (GQA), so each rank keeps whole
  query heads and the key/value heads they read; `mlp.fc` (SwiGLU) over two, [gate | up];
- `attn.proj` and `mlp.proj` are row-parallel: one all-reduce after each, the only forward communication;
- the LM head is split over the vocabulary with DeepSpeed's vocabulary-parallel cross-entropy (no rank holds
  the full logits). A tied embedding shares that shard (a vocabulary-parallel lookup). An untied one is split
  over the vocabulary too, by DeepSpeed's own `VocabParallelEmbedding` put in place before the engine starts
  (`split_embedding`): AutoTP would split it only along the hidden size, which our blocks cannot take.

Every other parameter (norms, learned positions) is replicated. AutoTP builds a data x tensor mesh over the
whole world, tensor axis fastest, so rank r is tensor rank r % T of replica r // T: with T up to the GPUs of a
node, the all-reduces stay on NVLink. With pipeline stages (3D) the groups are the pipeline grid's (a stage's
tensor ranks, `dsllm.engine._fit_3d`); the embedding and the head are split over the vocabulary there too, the
head's logits gathered for the pipeline's loss.

A rank builds only its shards (`split_on_meta`): the GPT (`sharded_gpt`), or in 3D each layer of its stage
(`dsllm.pipeline`), on the meta device, split there by AutoTP, each shard then filled from its parameter's whole
initial value (which depends on the seed and the parameter's name only), so the values are those of the whole
model and no rank ever holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dsllm.errors import UserError
from dsllm.model_config import ModelConfig

if TYPE_CHECKING:  # torch is imported where it is used: the command lines build their parsers without it
    import torch


def autotp_section(model: ModelConfig, size: int, vocabulary_parallel: bool = True) -> dict:
    """The DeepSpeed JSON's `tensor_parallel` section for the GPT split over `size` ranks. `vocabulary_parallel`:
    the LM head and its loss split over the vocabulary. Not in a pipeline, whose head is a layer of its own and
    whose loss sees whole logits: there an untied head (`HeadPipe`) is split column-wise, by the vocabulary too,
    and its logits gathered (`dsllm.pipeline` splits the embedding and gathers a tied head's logits itself)."""
    q, kv = model.n_heads * model.head_dim, model.kv_heads * model.head_dim
    fc = {"patterns": [r".*\.mlp\.fc\.weight$"], "partition_type": "column"}
    if model.mlp == "swiglu":
        fc.update(shape=[2, -1], partition_dim=0)
    specs = [
        {
            "patterns": [r".*\.attn\.qkv\.weight$"],
            "partition_type": "column",
            "shape": [[q, kv, kv], -1],
            "partition_dim": 0,
        },
        fc,
        {"patterns": [r".*\.attn\.proj\.weight$", r".*\.mlp\.proj\.weight$"], "partition_type": "row"},
    ]
    if model.qk_norm:  # replicated, but each rank normalises its own heads: the gradients summed over the ranks
        specs.append({"patterns": [r".*\.attn\.[qk]_norm\.weight$"], "partition_type": "skip", "grad_allreduce": True})
    if not vocabulary_parallel:  # (split where a stage is built, under GPT's own names: dsllm.pipeline)
        specs.append({"patterns": [r"^lm_head\.weight$"], "partition_type": "column", "gather_output": True})
    return {
        "autotp_size": size,
        "vocab_parallel_lm_head": vocabulary_parallel,
        "partition_config": {"use_default_specs": False, "layer_specs": specs},
    }


def split_embedding(owner, name: str, group) -> None:
    """Replace the token embedding `owner.<name>` by DeepSpeed's VocabParallelEmbedding over the tensor-parallel
    `group`: each rank keeps (and trains) its rows of the vocabulary, looks up the tokens they hold and an
    all-reduce sums the lookups. The parameter stays the same object (its data becomes the shard), so an optimizer
    group holding it still does; marked replaced, so AutoTP leaves it as it is and records how it is split."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding, set_autotp_mode

    set_autotp_mode(training=True)  # (as deepspeed.initialize sets it later) else the layer freezes its weight
    embedding = VocabParallelEmbedding(getattr(owner, name), mp_group=group, name=name)
    embedding.replaced = True
    setattr(owner, name, embedding)


@dataclasses.dataclass(frozen=True)
class TensorSplit:
    """How a rank splits what it builds: the DeepSpeed JSON's `tensor_parallel` section (`autotp_section`) and the
    rank's tensor-parallel process group."""

    section: dict
    group: Any


def split_on_meta(
    build: Callable[[], torch.nn.Module], config: ModelConfig, seed: int, split: TensorSplit, embedding=None
):
    """`build()` (the GPT, or a part of it nested under the GPT's own names) built on the meta device, split there by
    AutoTP with `split.section`, as DeepSpeed's engine would split it, and `embedding` (the name of a token
    embedding directly under the built module) over the vocabulary; then every parameter filled, a shard with its
    whole `initial_value` cut by its layer's own partition function: a rank holds its shards and one whole
    parameter at a time, never the whole module. The split layers are marked replaced, so a later AutoTP pass (the
    engine's, over a pipeline's stage) leaves them. Returns (the module, the AutoTP instance). The steps are those
    of DeepSpeed 0.19.8's engine (`_apply_autotp_partitioning` with a partition_config)."""
    import torch
    import torch.nn as nn
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.layers import TensorParallel_Layer, set_autotp_mode
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config

    from dsllm.model import initial_value

    with torch.device("meta"):
        module = build()
    shapes = {name: p.shape for name, p in module.named_parameters()}  # a tied weight: under its first name
    if embedding is not None:
        split_embedding(module, embedding, split.group)
    tp = get_tensor_parallel_config({"tensor_parallel": split.section})
    set_autotp_mode(training=True)
    autotp = AutoTP(
        module=module,
        all_reduce_linears=(),
        prefix="",
        state_dict=None,
        linear_layer_setting=(nn.Linear, nn.Embedding),
        orig_layer_impl=None,
        keep_module_on_host=tp.keep_module_on_host,
        partition_config=tp.get_partition_config_object(),
        vocab_parallel_lm_head=tp.vocab_parallel_lm_head is True,
        model_config=config,
        tp_grain_size=tp.tensor_parallel.tp_grain_size,
        training_mode=True,
    )
    # (in training mode AutoTP takes the group from DeepSpeed's `groups`, where the callers have put this one)
    autotp.set_tensor_parallel_config(split.section["autotp_size"], split.group)
    autotp.update_linear_policies()
    autotp._replace_module(module)
    names = {id(p): name for name, p in module.named_parameters()}
    with torch.no_grad():
        for layer in module.modules():
            params = [p for p in layer.parameters(recurse=False) if p.is_meta]  # a tied weight: filled once
            for p in params:
                _fill(p, initial_value(names[id(p)], shapes[names[id(p)]], config, seed))
            if isinstance(layer, TensorParallel_Layer):
                if params:
                    layer._tp_partition([layer.weight, getattr(layer, "bias", None)])  # the whole value -> its shard
                layer.replaced = True
    leftover = [name for name, p in module.named_parameters() if p.is_meta]
    if leftover:  # a parameter of no module's own (cannot happen with GPT's modules)
        raise RuntimeError(f"split_on_meta left {leftover} without values")
    return module, autotp


def sharded_gpt(config: ModelConfig, seed: int, split: TensorSplit) -> torch.nn.Module:
    """The GPT of `config` and `seed` as this tensor-parallel rank's shards (`split_on_meta`), finished as
    DeepSpeed's engine finishes AutoTP's split (gradient hooks, the vocabulary-parallel loss, the universal
    checkpoint's layout); the engine then finds the model marked split (`ds_autotp_parsed`) and takes it as it is."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.module_inject.layers import VocabParallelLinear, collect_autotp_universal_checkpoint_info
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config
    from deepspeed.sequence.cross_entropy import configure_vocab_parallel_loss

    from dsllm.model import GPT

    embedding = None if config.tie_embeddings else "tok_embeddings"  # (a tied one: the LM head's shard)
    gpt, autotp = split_on_meta(lambda: GPT(config, seed), config, seed, split, embedding)
    autotp.register_replicated_grad_hooks(gpt)
    heads = [m for m in gpt.modules() if isinstance(m, VocabParallelLinear)]
    if heads:
        backend = get_tensor_parallel_config({"tensor_parallel": split.section}).vocab_parallel_ce_backend
        configure_vocab_parallel_loss(gpt, heads[0], backend=backend)
    setattr(gpt, UNIVERSAL_CHECKPOINT_INFO, collect_autotp_universal_checkpoint_info(gpt))
    gpt.ds_autotp_parsed = True
    return gpt


def _fill(param, value) -> None:
    """`param` (on the meta device) becomes `value`, keeping its identity and the attributes AutoTP set on it."""
    import torch

    attributes = dict(param.__dict__)
    torch.utils.swap_tensors(param, torch.nn.Parameter(value, requires_grad=param.requires_grad))
    param.__dict__.update(attributes)


def unsplittable(model: ModelConfig, size: int) -> tuple[str, int, str] | None:
    """The first of the model's sizes `size` ranks cannot split evenly, as (its name, its value, what it counts),
    or None when AutoTP can split them all."""
    for what, count, fix in (
        ("model.n_heads", model.n_heads, "attention heads"),
        ("model.n_kv_heads", model.kv_heads, "key/value heads"),
        ("the MLP hidden size (model.mlp_hidden)", model.mlp_hidden_size, "MLP columns"),
        ("model.vocab_size", model.vocab_size, "vocabulary rows"),
    ):
        if count % size:
            return what, count, fix
    return None


def check_tensor_parallel(
    model: ModelConfig, world_size: int, size: int, pipeline_stages: int, compile_: bool, zero_stage: int
) -> None:
    """A tensor-parallel layout that cannot run is one line before any rank starts."""
    if size == 1:
        return
    flag = f"--tensor-parallel {size}"
    if model.z_loss:
        raise UserError(
            f"{flag} with --model.z_loss {model.z_loss}: not supported yet (each rank holds a slice of the "
            "vocabulary's logits, and the z-loss needs their whole logsumexp); drop one of them"
        )
    if model.value_embeddings:
        raise UserError(
            f"{flag} with --model.value_embeddings {model.value_embeddings}: not supported yet (each rank holds a "
            "share of the values' heads, the tables all of them); drop one of them"
        )
    if model.qk_norm and pipeline_stages > 1:
        raise UserError(
            f"{flag} with --pipeline-parallel {pipeline_stages} and --model.qk_norm: not supported yet (the norms' "
            "scales are shared by heads that different ranks hold; their gradients are summed over the tensor ranks "
            "without pipeline stages only); drop one of them"
        )
    if zero_stage not in (1, 2):
        raise UserError(
            f"{flag} with ZeRO-{zero_stage}: use ds_configs/zero1.json or zero2.json; dsllm merges the tensor shards "
            "of a checkpoint through DeepSpeed's universal checkpoint, which needs ZeRO's optimizer files (none under "
            "ZeRO-0) and fails on ZeRO-3 AutoTP checkpoints (DeepSpeed 0.19.8)"
        )
    if world_size % (size * pipeline_stages):
        both = size * pipeline_stages
        with_stages = f" x {pipeline_stages} pipeline stages" if pipeline_stages > 1 else ""
        raise UserError(
            f"{flag}: the {world_size} rank(s) do not divide into groups of {size}{with_stages}; launch a multiple of "
            f"{both} ranks (deepspeed --num_gpus N) or change --tensor-parallel"
        )
    problem = unsplittable(model, size)
    if problem is not None:
        what, count, fix = problem
        raise UserError(
            f"{flag}: {what} = {count} is not divisible by {size}, so the {fix} cannot be split evenly; use a "
            f"--tensor-parallel that divides {count}"
        )
    if model.dropout:
        raise UserError(
            f"{flag} with --model.dropout {model.dropout}: the tensor-parallel ranks would draw the same dropout "
            "masks for different heads (no per-rank RNG streams yet); pretrain with dropout 0 or without TP"
        )
    if compile_:
        raise UserError(f"--compile with {flag}: not supported yet; drop one of them")
