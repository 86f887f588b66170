"""`dsllm plan`'s memory model for activations, and its parallel layouts: every tensor-parallel (within a node),
pipeline-parallel and 3D layout of the world with ZeRO-1, its memory on the busiest GPU, and the layout advised.

Activations per block are those of Korthikanti et al. 2022 with flash attention (no s x s scores): 34·s·b·h values
unsplit, 10 + 24/T under tensor parallelism without sequence parallelism; the logits (and their fp32 copy and
gradient for the loss) are split T ways by the vocabulary-parallel head.
"""

from __future__ import annotations

import dataclasses
import math

from dsllm.model_config import ModelConfig
from dsllm.tensor_parallel import unsplittable

BYTES_PER_ACTIVATION = 2  # bf16
CHECKPOINTING_FLAG = "--model.activation_checkpointing deepspeed"
# GPUs whose peers talk over PCIe (no NVLink in the usual servers): tensor parallelism's per-block all-reduces
# would cross it, so plan prefers pipeline stages there
PCIE_KINDS = frozenset({"A10", "A40", "L4", "L40", "L40S", "H100-PCIe", "RTX3090", "RTX4090", "RTX5090"})


def activation_bytes(
    model: ModelConfig,
    micro_batch: int,
    seq_len: int,
    checkpointing: bool,
    bytes_per_value: int = BYTES_PER_ACTIVATION,
    tensor: int = 1,
) -> tuple[float, float]:
    """(the blocks', the logits') bytes kept for backward for one micro batch on one of `tensor` ranks. Per block
    (10 + 24/T)·s·b·h values scaled by 2 bytes (34 unsplit); with checkpointing each block keeps its input
    (2·s·b·h) and one block at a time is recomputed whole. The logits, their fp32 copy for the loss and its
    gradient, split T ways."""
    sbh = seq_len * micro_batch * model.d_model
    block = (10 + 24 / tensor) * sbh * bytes_per_value / 2
    blocks = model.n_layers * (2 * sbh * bytes_per_value / 2) + block if checkpointing else model.n_layers * block
    logits = seq_len * micro_batch * model.vocab_size * (bytes_per_value + 4 + 4) / tensor
    return blocks, logits


def _tensor_splits(model: ModelConfig, size: int) -> bool:
    """Whether --tensor-parallel `size` splits the model (`dsllm.tensor_parallel.unsplittable`; the trainer pads the
    vocabulary to a multiple of 64)."""
    vocabulary = 64 * math.ceil(model.vocab_size / 64)
    return unsplittable(dataclasses.replace(model, vocab_size=vocabulary), size) is None


def layout_gib(
    model: ModelConfig, tensor: int, stages: int, data: int, micro_batch: int, seq_len: int, checkpointing: bool
) -> tuple[float, float]:
    """(model states, activations) in GiB on the busiest GPU of a tensor- or pipeline-parallel layout with ZeRO-1
    over the `data` replicas (DeepSpeed's ZeRO-2 estimator at `data` GPUs: 16-bit parameters and gradients whole,
    fp32 Adam partitioned). Tensor parallelism splits every weight and the logits T ways and the activations
    inside attention and the MLP (Korthikanti et al. 2022 without sequence parallelism: 10 + 24/T per block
    instead of 34, s·b·h units). A pipeline's first stage holds ceil(L/P) blocks and the embedding, and under 1F1B
    keeps P micro batches in flight, so its activations are the whole model's; the last stage adds the logits to
    its share."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    one, two = (dataclasses.replace(model, n_layers=n).num_parameters() for n in (1, 2))
    if stages > 1:
        shard = (math.ceil(model.n_layers / stages) * (two - one) + model.vocab_size * model.d_model) / tensor
    else:
        shard = model.num_parameters() / tensor
    states = estimate_zero2_model_states_mem_needs(int(shard), data, 1, cpu_offload=False)[1]
    blocks, logits = activation_bytes(model, micro_batch, seq_len, checkpointing, tensor=tensor)
    activations = max(blocks, blocks / stages + logits) if stages > 1 else blocks + logits
    return states / 2**30, activations / 2**30


def layouts(
    model: ModelConfig, gpus: int, nodes: int, micro_batch: int, seq_len: int, usable: float, headroom: float
) -> list[dict]:
    """Every tensor-parallel (within a node), pipeline-parallel and 3D (both) layout of the world with ZeRO-1, and
    its memory on the busiest GPU with and without activation checkpointing."""
    world, rows = gpus * nodes, []
    sizes = [t for t in range(2, gpus + 1) if gpus % t == 0 and _tensor_splits(model, t)]
    depths = [p for p in range(2, min(world, model.n_layers) + 1) if world % p == 0]
    candidates = [(t, 1) for t in sizes] + [(1, p) for p in depths]
    candidates += [(t, p) for t in sizes for p in depths if world % (t * p) == 0]
    for tensor, stages in candidates:
        data = world // (tensor * stages)
        row = {"tensor_parallel": tensor, "pipeline_parallel": stages, "data_parallel": data}
        for key, checkpointing in (("no_checkpointing", False), ("checkpointing", True)):
            states, activations = layout_gib(model, tensor, stages, data, micro_batch, seq_len, checkpointing)
            row["model_states_gib"] = states  # (the same either way)
            total = states + activations
            row[key] = {"gib_per_gpu": total, "spare_gib": usable - total, "fits": usable - total >= headroom}
        rows.append(row)
    return rows


def recommend_layout(recommended: dict | None, layout_rows: list[dict], interconnect: str) -> dict:
    """Which ranks hold what. Data parallelism alone when a ZeRO-0/1/2 config fits (no model parallelism is
    fastest); else the first tensor- or pipeline-parallel layout that fits (without activation checkpointing, else
    with it), fewest-way first: with NVLink tensor parallelism inside a node before pipeline stages, over PCIe (two
    all-reduces per block would cross it) pipeline stages first, 3D after both; only then ZeRO-3 or offload,
    whose per-layer gathers cross the slowest link (ZeRO-3 across nodes is reported several times slower than
    stage 2: DeepSpeed #1069, gpt-neox #211)."""
    if recommended is not None and recommended["config"] in ("zero0", "zero1", "zero2"):
        return {"kind": "data", "tensor_parallel": 1, "pipeline_parallel": 1, "config": recommended["config"]}
    tensor = [r for r in layout_rows if r["pipeline_parallel"] == 1]
    pipeline = [r for r in layout_rows if r["tensor_parallel"] == 1]
    both = [r for r in layout_rows if r["tensor_parallel"] > 1 and r["pipeline_parallel"] > 1]
    ordered = (tensor + pipeline if interconnect == "nvlink" else pipeline + tensor) + both
    for row in ordered:
        for key, checkpointing in (("no_checkpointing", False), ("checkpointing", True)):
            if row[key]["fits"]:
                kinds = {(True, False): "tensor", (False, True): "pipeline", (True, True): "3d"}
                return {
                    "kind": kinds[row["tensor_parallel"] > 1, row["pipeline_parallel"] > 1],
                    "tensor_parallel": row["tensor_parallel"],
                    "pipeline_parallel": row["pipeline_parallel"],
                    "data_parallel": row["data_parallel"],
                    "config": "zero1",
                    "activation_checkpointing": checkpointing,
                    **row[key],
                }
    if recommended is not None:  # ZeRO-3 or offload
        return {"kind": "data", "tensor_parallel": 1, "pipeline_parallel": 1, "config": recommended["config"]}
    return {"kind": None}


def layout_advice(result: dict) -> str:
    best = result["recommended_layout"]
    if best["kind"] is None and result["model"]["moe_experts"]:
        return (
            "layout: none fits; dsllm's tensor and pipeline parallelism do not take Mixture-of-Experts blocks yet "
            "(--expert-parallel splits the experts over data-parallel ranks)"
        )
    if best["kind"] is None:
        return "layout: none fits, with tensor or pipeline parallelism either"
    if best["kind"] == "data":
        split = best["config"] in ("zero0", "zero1", "zero2")
        why = "no model split needed" if split else "no tensor or pipeline layout fits"
        return f"layout: data parallelism only, {best['config']}.json ({why})"
    checkpointing = f" and {CHECKPOINTING_FLAG}" if best["activation_checkpointing"] else ""
    memory = f"{best['gib_per_gpu']:.1f} GiB on the busiest GPU, {best['spare_gib']:.1f} spare"
    link = result["interconnect"]
    if best["kind"] == "tensor":
        return (
            f"layout: --tensor-parallel {best['tensor_parallel']} ({best['tensor_parallel']} x "
            f"{best['data_parallel']} data-parallel; a tensor group's ranks on one node) with ds_configs/zero1.json"
            f"{checkpointing}: {memory} (over {link}: tensor parallelism first, then pipeline stages, then ZeRO-3)"
        )
    stages = best["pipeline_parallel"]
    if best["kind"] == "3d":
        return (
            f"layout: --pipeline-parallel {stages} --tensor-parallel {best['tensor_parallel']} ({stages} stages x "
            f"{best['tensor_parallel']} tensor-parallel x {best['data_parallel']} data-parallel) with "
            f"ds_configs/zero1.json{checkpointing} and --grad-accum {4 * stages} or more: {memory} (no 2-D layout fits)"
        )
    return (
        f"layout: --pipeline-parallel {stages} ({stages} stages x {best['data_parallel']} data-parallel) with "
        f"ds_configs/zero1.json{checkpointing} and --grad-accum {4 * stages} or more (1F1B bubble "
        f"(P-1)/(M+P-1) = {100 * (stages - 1) / (5 * stages - 1):.0f}% at M = {4 * stages}): {memory} (over {link}: "
        "pipeline stages first, then tensor parallelism, then ZeRO-3)"
    )


def layout_table(rows: list[dict]) -> list[str]:
    """`layouts`' rows as text: the layout, its model states, and its total with and without checkpointing."""
    if not rows:
        return []
    lines = [
        "",
        f"{'layout (ZeRO-1)':<22} {'states GiB':>10} {'total GiB':>10} {'fits':>5} {'+ckpt GiB':>10} {'fits':>5}",
    ]
    for r in rows:
        a, b = r["no_checkpointing"], r["checkpointing"]
        kind = " x ".join(
            f"{name} {r[key]}" for name, key in (("PP", "pipeline_parallel"), ("TP", "tensor_parallel")) if r[key] > 1
        )
        lines.append(
            f"{kind + ' x DP ' + str(r['data_parallel']):<22} {r['model_states_gib']:>10.1f} {a['gib_per_gpu']:>10.1f} "
            f"{yes_no(a['fits']):>5} {b['gib_per_gpu']:>10.1f} {yes_no(b['fits']):>5}"
        )
    return lines


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"
