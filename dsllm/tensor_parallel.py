"""Tensor parallelism: DeepSpeed's AutoTP (training mode) splits the GPT's layers over consecutive ranks.

We hand AutoTP our own layer specs (its `partition_config`) instead of letting it guess from module names:

- `attn.qkv` is column-parallel over three unequal sub-parameters [q | k | v] (GQA), so each rank keeps whole
  query heads and the key/value heads they read; `mlp.fc` (SwiGLU) over two, [gate | up];
- `attn.proj` and `mlp.proj` are row-parallel: one all-reduce after each, the only forward communication;
- the LM head is split over the vocabulary with DeepSpeed's vocabulary-parallel cross-entropy (no rank holds
  the full logits). A tied embedding shares that shard (a vocabulary-parallel lookup); an untied one stays
  replicated (AutoTP splits untied embeddings only along the hidden size, which our blocks cannot take).

Every other parameter (norms, learned positions) is replicated. AutoTP builds a data x tensor mesh over the
whole world, tensor axis fastest, so rank r is tensor rank r % T of replica r // T: with T up to the GPUs of a
node, the all-reduces stay on NVLink. With pipeline stages (3D) AutoTP splits each stage's layers on the pipeline
grid's groups instead (`dsllm.engine._fit_3d`), and the LM head stays whole on the last stage.
"""

from __future__ import annotations

from dsllm.errors import UserError
from dsllm.model_config import ModelConfig


def autotp_section(model: ModelConfig, size: int, vocabulary_parallel: bool = True) -> dict:
    """The DeepSpeed JSON's `tensor_parallel` section for the GPT split over `size` ranks. `vocabulary_parallel`:
    the LM head and its loss split over the vocabulary (not in a pipeline, whose head is a layer of its own)."""
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
    return {
        "autotp_size": size,
        "vocab_parallel_lm_head": vocabulary_parallel,
        "partition_config": {"use_default_specs": False, "layer_specs": specs},
    }


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
