"""`python -m dsllm plan`: will this model train on this hardware, with which DeepSpeed config, and for how long?

    python -m dsllm plan --model llama-1.3b --gpus 8xA100-80GB --host-ram-gib 1024
    python -m dsllm plan --model 7e9 --gpus 4xRTX4090 --nodes 2 --seq-len 4096 --json
    python -m dsllm plan --model 13B --gpus 8xMYGPU --gpu-memory-gib 96 --peak-tflops 400

Memory per GPU = model states from DeepSpeed's own estimators (`estimate_zero2/zero3_model_states_mem_needs`,
the same formulas `deepspeed.runtime.zero.*.estimate_*_all_live` print) + activations of one micro batch (the
per-layer count of Korthikanti et al. 2022 with flash attention, i.e. no s x s scores; with activation
checkpointing one block input per layer plus one block recomputed) + the logits and their fp32 loss copy.
Host memory per node is DeepSpeed's estimate too: the optimizer states (and parameters) that offload keeps in
host memory, and what building the model takes (ZeRO-3 builds it inside deepspeed.zero.Init: DeepSpeed's zero_init
rows, no rank holds the whole model).

A config fits when
  - the GPU total leaves at least 5% of the usable memory spare (usable = total - 2.5 GiB for the CUDA context,
    NCCL and fragmentation): the estimate is first order, and a plan that fills the GPU to its last few hundred
    MiB runs out of memory in practice;
  - the host memory per node fits --host-ram-gib, by default this machine's RAM (MemTotal of /proc/meminfo):
    give the nodes' RAM when planning for other machines.
The recommendation is the first config that fits in order of speed (ZeRO-0 to 3, then offload), without
activation checkpointing when that fits, else with it. Expected tokens/s assumes an MFU (--mfu); the
Chinchilla budget is 20 tokens per parameter.

Tensor-parallel (within a node) and pipeline-parallel layouts with ZeRO-1 get their own rows, and the layout
advice picks one (`recommend_layout`): data parallelism alone when ZeRO-0/1/2 fits, else the first layout that
fits, tensor parallelism first over NVLink and pipeline stages first over PCIe (--interconnect), ZeRO-3 last.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, finite, positive
from dsllm.metrics import GPU_KINDS
from dsllm.model_config import PRESETS, ModelConfig, resolve_model_config

ALIASES = {
    "A100": "A100-80GB",
    "H100": "H100-SXM",
    "H100-80GB": "H100-SXM",
    "H200-SXM": "H200",
    "3090": "RTX3090",
    "4090": "RTX4090",
    "5090": "RTX5090",
}
RESERVED_GIB = 2.5  # CUDA context, NCCL buffers, allocator fragmentation: never available to tensors
HEADROOM_FRACTION = 0.05  # of the usable memory, left spare: the estimate is first order
CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
CHINCHILLA_TOKENS_PER_PARAM = 20
BYTES_PER_ACTIVATION = 2  # bf16
CHECKPOINTING_FLAG = "--model.activation_checkpointing deepspeed"
# GPUs whose peers talk over PCIe (no NVLink in the usual servers): tensor parallelism's per-block all-reduces
# would cross it, so plan prefers pipeline stages there
PCIE_KINDS = frozenset({"A10", "A40", "L4", "L40", "L40S", "H100-PCIe", "RTX3090", "RTX4090", "RTX5090"})
MEMINFO = Path("/proc/meminfo")


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str  # a dsllm.metrics.GPU_KINDS key, or the user's own name with --gpu-memory-gib and --peak-tflops
    memory_gib: float  # total, as nvidia-smi reports it
    peak_tflops: float  # dense bf16


def _key(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", name.upper())


def parse_gpus(spec: str, memory_gib: float | None = None, peak_tflops: float | None = None) -> tuple[int, GPU]:
    """'8xA100-80GB' -> (8, the A100-80GB); 'h100' -> (1, the H100-SXM). --gpu-memory-gib / --peak-tflops override
    a known kind's values, and name an unknown kind when both are given."""
    match = re.fullmatch(r"(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9][A-Za-z0-9._-]*)", spec.strip())
    if not match:
        raise UserError(f"--gpus {spec!r}: expected COUNTxKIND, e.g. 8xA100-80GB (see --help for the kinds)")
    count, name = int(match.group(1) or 1), match.group(2)
    if count < 1:
        raise UserError(f"--gpus {spec!r}: the count must be 1 or more")
    table = {_key(k): k for k in GPU_KINDS} | {_key(k): v for k, v in ALIASES.items()}
    kind = table.get(_key(name))
    if kind is None:
        if memory_gib is None or peak_tflops is None:
            raise UserError(
                f"--gpus {spec!r}: unknown GPU kind {name!r}; use one of {', '.join(GPU_KINDS)}, "
                "or give its --gpu-memory-gib and --peak-tflops"
            )
        return count, GPU(name, memory_gib, peak_tflops)
    known = GPU_KINDS[kind]
    return count, GPU(kind, memory_gib or known.memory_gib, peak_tflops or known.peak_tflops)


def this_machine_ram_gib() -> float:
    """MemTotal of /proc/meminfo (the physical page count where there is none), in GiB."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 2**30  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        raise UserError(f"cannot read this machine's memory from {MEMINFO}; pass --host-ram-gib") from None


def model_for(spec: str) -> ModelConfig:
    """A preset, a model JSON, or a parameter count ('1.3e9', '7B', '350M': the llama preset shape nearest in
    width, with as many layers as the count needs)."""
    match = re.fullmatch(r"([\d.]+(?:e\d+)?)\s*([kKmMbB]?)", spec.strip())
    if not match:
        return resolve_model_config(spec)
    try:
        target = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
    except ValueError:
        raise UserError(f"--model {spec!r}: not a number, preset or JSON file") from None
    if not math.isfinite(target) or target > 1e15:  # 1e400 is inf: no layer count reaches it
        raise UserError(
            f"--model {spec!r}: {target:g} parameters is beyond any model this plans (at most 1e15); "
            "pass e.g. 125M, 1.3e9 or 70B"
        )
    if target < 1e6:
        raise UserError(f"--model {spec!r}: {target:,.0f} parameters is below 1M; pass e.g. 125M, 1.3e9 or 7B")
    shapes = [resolve_model_config(name) for name in PRESETS if name.startswith("llama-")]
    base = min(shapes, key=lambda m: abs(math.log(m.num_parameters() / target)))
    one, two = (dataclasses.replace(base, n_layers=n).num_parameters() for n in (1, 2))
    layers = max(1, round((target - (2 * one - two)) / (two - one)))  # embeddings + final norm, then per block
    return dataclasses.replace(base, n_layers=layers)


def largest_layer_params(model: ModelConfig) -> int:
    """ZeRO-3 gathers one module's parameters at a time: the biggest is the embedding (or the MLP)."""
    mlp = model.d_model * model.mlp_hidden_size * (2 if model.mlp == "swiglu" else 1)
    return max(model.vocab_size * model.d_model, mlp)


def model_state_gib(params: int, largest: int, config: str, gpus_per_node: int, nodes: int) -> tuple[float, float]:
    """(GPU GiB, host GiB per node) of parameters, gradients and optimizer states, by DeepSpeed's estimators
    (16-bit parameters, fp32 Adam). ZeRO-0/1 have no estimator: they use ZeRO-2's formula at 1 GPU, which keeps
    every state whole (ZeRO-1 partitions the optimizer only, so this overstates it by a little). ZeRO-3 uses the
    zero_init=True rows: under ZeRO-3 every rank builds the model inside deepspeed.zero.Init (dsllm.engine.new_model),
    so no rank holds the whole fp32 model while it is built."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints banners on import
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    if config in ("zero0", "zero1"):
        device = estimate_zero2_model_states_mem_needs(params, 1, 1, cpu_offload=False)[1]
        host = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=False)[0]
    elif config.startswith("zero2"):
        host, device = estimate_zero2_model_states_mem_needs(
            params, gpus_per_node, nodes, cpu_offload=config.endswith("offload")
        )
    else:
        offload = config.endswith("offload")
        host, device, _ = estimate_zero3_model_states_mem_needs(
            params, largest, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload, zero_init=True
        )
    return device / 2**30, host / 2**30


def activation_gib(
    model: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool, bytes_per_value: int = BYTES_PER_ACTIVATION
) -> float:
    """Activations kept for backward for one micro batch. Per block, 34·s·b·h values (Korthikanti et al. 2022,
    flash attention: no s x s term) scaled by 2 bytes; with checkpointing each block keeps its input (2·s·b·h)
    and one block at a time is recomputed whole. Plus the logits, their fp32 copy for the loss and its gradient."""
    sbh = seq_len * micro_batch * model.d_model
    block = 34 * sbh * bytes_per_value / 2
    blocks = model.n_layers * (2 * sbh * bytes_per_value / 2) + block if checkpointing else model.n_layers * block
    logits = seq_len * micro_batch * model.vocab_size * (bytes_per_value + 4 + 4)
    return (blocks + logits) / 2**30


def _tensor_splits(model: ModelConfig, size: int) -> bool:
    """Whether --tensor-parallel `size` can split the model (dsllm.tensor_parallel's checks; the vocabulary is
    padded to a multiple of 64 by the trainer)."""
    return all(n % size == 0 for n in (model.n_heads, model.kv_heads, model.mlp_hidden_size, 64))


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
    sbh, bpv = seq_len * micro_batch * model.d_model, BYTES_PER_ACTIVATION
    per_block = (10 + 24 / tensor) * sbh * bpv / 2
    blocks = model.n_layers * (2 * sbh * bpv / 2) + per_block if checkpointing else model.n_layers * per_block
    logits = seq_len * micro_batch * model.vocab_size * (bpv + 4 + 4) / tensor
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
            row["model_states_gib"] = states
            total = states + activations
            row[key] = {"gib_per_gpu": total, "spare_gib": usable - total, "fits": usable - total >= headroom}
        rows.append(row)
    return rows


def recommend_layout(recommended: dict | None, layout_rows: list[dict], interconnect: str) -> dict:
    """Which ranks hold what. Data parallelism alone when a ZeRO-0/1/2 config fits (no model parallelism is
    fastest); else the first tensor- or pipeline-parallel layout that fits (without activation checkpointing, else
    with it), fewest-way first: with NVLink tensor
    parallelism inside a node before pipeline stages, over PCIe (two all-reduces per block would cross it)
    pipeline stages first; only then ZeRO-3 or offload, whose per-layer gathers cross the slowest link (ZeRO-3
    across nodes is reported several times slower than stage 2: DeepSpeed #1069, gpt-neox #211)."""
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


def _recommend(rows: list[dict], headroom: float) -> tuple[dict | None, list[dict]]:
    """(the first row and column that fits, in order of speed; the faster columns that fit the GPU only without
    the headroom)."""
    too_tight = []
    for row in rows:
        for key, checkpointing in (("no_checkpointing", False), ("checkpointing", True)):
            column = row[key]
            if not row["host_fits"]:
                continue
            if column["fits"]:
                recommended = {"config": row["config"], "activation_checkpointing": checkpointing, **column}
                return recommended | {"host_gib_per_node": row["host_gib_per_node"]}, too_tight
            if 0 <= column["spare_gib"] < headroom:
                too_tight.append({"config": row["config"], "activation_checkpointing": checkpointing, **column})
    return None, too_tight


def plan(
    model: ModelConfig,
    gpus: int,
    gpu: GPU,
    nodes: int = 1,
    micro_batch: int = 1,
    seq_len: int | None = None,
    mfu: float = 0.4,
    *,
    host_ram_gib: float,
    interconnect: str | None = None,
) -> dict:
    """Every config's memory per GPU and per node against `gpu` and `host_ram_gib`, the recommendation, and the
    expected speed; `gpus` per node."""
    seq_len = seq_len or model.max_seq_len
    model.check_seq_len(seq_len)
    if gpu.memory_gib <= RESERVED_GIB:
        raise UserError(
            f"--gpu-memory-gib {gpu.memory_gib:g}: not above the {RESERVED_GIB} GiB every GPU keeps for the CUDA "
            "context and NCCL; pass the device's total memory"
        )
    params, largest = model.num_parameters(), largest_layer_params(model)
    usable = gpu.memory_gib - RESERVED_GIB
    headroom = HEADROOM_FRACTION * usable
    world = gpus * nodes
    rows = []
    for config in CONFIGS:
        device, host = model_state_gib(params, largest, config, gpus, nodes)
        row = {
            "config": config,
            "model_states_gib": device,
            "host_gib_per_node": host,
            "host_fits": host <= host_ram_gib,
        }
        for key, checkpointing in (("no_checkpointing", False), ("checkpointing", True)):
            total = device + activation_gib(model, micro_batch, seq_len, checkpointing)
            per_sample = activation_gib(model, 1, seq_len, checkpointing)
            room = usable - headroom - device
            row[key] = {
                "gib_per_gpu": total,
                "spare_gib": usable - total,
                "fits": usable - total >= headroom,
                "largest_micro_batch": max(0, int(room // per_sample)),
            }
        rows.append(row)
    recommended, too_tight = _recommend(rows, headroom)
    layout_rows = layouts(model, gpus, nodes, micro_batch, seq_len, usable, headroom)
    interconnect = interconnect or ("pcie" if gpu.name in PCIE_KINDS else "nvlink")
    flops = 6 * params + 12 * model.n_layers * model.d_model * seq_len  # PaLM, as dsllm.model.flops_per_token
    tokens_per_second = mfu * gpu.peak_tflops * 1e12 * world / flops
    budget = CHINCHILLA_TOKENS_PER_PARAM * params
    return {
        "parameters": params,
        "model": model.to_dict(),
        "gpus_per_node": gpus,
        "nodes": nodes,
        "gpu": gpu.name,
        "gpu_memory_gib": gpu.memory_gib,
        "peak_tflops": gpu.peak_tflops,
        "usable_gib": usable,
        "headroom_gib": headroom,
        "host_ram_gib": host_ram_gib,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "configs": rows,
        "recommended": recommended,
        "interconnect": interconnect,
        "layouts": layout_rows,
        "recommended_layout": recommend_layout(recommended, layout_rows, interconnect),
        "too_tight": too_tight,
        "mfu_assumed": mfu,
        "tokens_per_second": tokens_per_second,
        "chinchilla_tokens": budget,
        "chinchilla_days": budget / tokens_per_second / 86400,
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _with(checkpointing: bool) -> str:
    return "with activation checkpointing" if checkpointing else "without checkpointing"


def advice(result: dict) -> list[str]:
    """The recommendation in words: config, checkpointing, micro batch, and the margins it leaves."""
    best, host_ram = result["recommended"], result["host_ram_gib"]
    lines = []
    if best is not None:
        checkpointing = (
            f" with activation checkpointing ({CHECKPOINTING_FLAG})" if best["activation_checkpointing"] else ""
        )
        lines += [
            f"recommended: {best['config']}.json{checkpointing}, micro batch up to {best['largest_micro_batch']} "
            "(the first config that fits, in order of speed)",
            f"  at micro batch {result['micro_batch']}: {best['gib_per_gpu']:.1f} of {result['usable_gib']:.1f} "
            f"usable GiB per GPU, {best['spare_gib']:.1f} GiB spare; host {best['host_gib_per_node']:.1f} of "
            f"{host_ram:.1f} GiB per node",
        ]
    else:
        gpu_fits = [r for r in result["configs"] if r["no_checkpointing"]["fits"] or r["checkpointing"]["fits"]]
        if gpu_fits:
            row = min(gpu_fits, key=lambda r: r["host_gib_per_node"])
            lines.append(
                f"recommended: none fits: {row['config']} fits the GPUs but needs {row['host_gib_per_node']:.1f} GiB "
                f"of host memory per node, more than {host_ram:.1f} GiB (--host-ram-gib); more nodes, more host "
                "memory, or a smaller model"
            )
        else:
            lines.append("recommended: none fits the GPUs: more GPUs, a shorter --seq-len, or a smaller model")
    lines.append(layout_advice(result))
    groups: dict[tuple[bool, str], list[str]] = {}  # ZeRO-0/1/2 on one GPU leave the same: one line for them
    for tight in result["too_tight"]:
        groups.setdefault((tight["activation_checkpointing"], f"{tight['spare_gib']:.1f}"), []).append(tight["config"])
    for (checkpointing, spare), configs in groups.items():
        lines.append(
            f"too tight: {', '.join(configs)} {_with(checkpointing)} {'leave' if len(configs) > 1 else 'leaves'} "
            f"{spare} GiB spare per GPU, under the {result['headroom_gib']:.1f} GiB "
            f"({100 * HEADROOM_FRACTION:.0f}%) a config needs to count as fitting"
        )
    return lines


def layout_advice(result: dict) -> str:
    best = result["recommended_layout"]
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


def render(result: dict, name: str, host_source: str) -> str:
    lines = [
        f"{name}: {result['parameters']:,} parameters on {result['nodes']} node(s) x {result['gpus_per_node']} "
        f"{result['gpu']} ({result['gpu_memory_gib']:.1f} GiB, {result['usable_gib']:.1f} usable, "
        f"{result['peak_tflops']:g} TFLOPS bf16); micro batch {result['micro_batch']} x {result['seq_len']} tokens",
        f"host memory {result['host_ram_gib']:.1f} GiB per node ({host_source}); a config fits with at least "
        f"{result['headroom_gib']:.1f} GiB ({100 * HEADROOM_FRACTION:.0f}%) spare per GPU",
        "",
        f"{'config':<14} {'states GiB':>10} {'host GiB/node':>13} {'host':>5} {'total GiB':>10} {'fits':>5}"
        f" {'max mb':>7} {'+ckpt GiB':>10} {'fits':>5} {'max mb':>7}",
    ]
    for r in result["configs"]:
        a, b = r["no_checkpointing"], r["checkpointing"]
        lines.append(
            f"{r['config']:<14} {r['model_states_gib']:>10.1f} {r['host_gib_per_node']:>13.1f} "
            f"{_yes(r['host_fits']):>5} {a['gib_per_gpu']:>10.1f} {_yes(a['fits']):>5} {a['largest_micro_batch']:>7} "
            f"{b['gib_per_gpu']:>10.1f} {_yes(b['fits']):>5} {b['largest_micro_batch']:>7}"
        )
    if result["layouts"]:
        lines += [
            "",
            f"{'layout (ZeRO-1)':<22} {'states GiB':>10} {'total GiB':>10} {'fits':>5} {'+ckpt GiB':>10} {'fits':>5}",
        ]
    for r in result["layouts"]:
        a, b = r["no_checkpointing"], r["checkpointing"]
        kind = " x ".join(
            f"{name} {r[key]}" for name, key in (("PP", "pipeline_parallel"), ("TP", "tensor_parallel")) if r[key] > 1
        )
        lines.append(
            f"{kind + ' x DP ' + str(r['data_parallel']):<22} {r['model_states_gib']:>10.1f} {a['gib_per_gpu']:>10.1f} "
            f"{_yes(a['fits']):>5} {b['gib_per_gpu']:>10.1f} {_yes(b['fits']):>5}"
        )
    lines += [
        "",
        *advice(result),
        f"expected: {result['tokens_per_second']:,.0f} tokens/s at {100 * result['mfu_assumed']:.0f}% MFU; "
        f"Chinchilla budget {result['chinchilla_tokens'] / 1e9:,.1f}B tokens in {result['chinchilla_days']:,.1f} days",
    ]
    return "\n".join(lines)


def _epilog() -> str:
    kinds = "\n".join(
        f"  {kind:<10} {gpu.memory_gib:>6.1f} GiB {gpu.peak_tflops:>7g} TFLOPS" for kind, gpu in GPU_KINDS.items()
    )
    aliases = ", ".join(f"{alias} = {kind}" for alias, kind in ALIASES.items())
    return (
        f"GPU kinds for --gpus (total memory, dense bf16 peak; case and dashes do not matter):\n{kinds}\n"
        f"aliases: {aliases}\nan MI250X is two devices (GCDs) to torch and DeepSpeed: its row is one GCD, so count "
        f"GCDs\n\nmodel presets for --model: {', '.join(PRESETS)}"
    )


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dsllm plan", description=__doc__, epilog=_epilog())
    p.add_argument(
        "--model",
        required=True,
        help="a preset (listed below), a model JSON file, or a parameter count (125M, 1.3e9, 7B: the nearest "
        "llama shape)",
    )
    p.add_argument(
        "--gpus",
        required=True,
        help="GPUs per node as COUNTxKIND (8xA100-80GB, 4x4090); KIND is one listed below, or any name with "
        "--gpu-memory-gib and --peak-tflops",
    )
    p.add_argument("--nodes", type=positive, default=1, help="number of nodes, each with --gpus")
    p.add_argument("--micro-batch-size", type=positive, default=1, help="samples per GPU per forward/backward")
    p.add_argument("--seq-len", type=positive, help="tokens per sample (default: the model's max_seq_len)")
    p.add_argument("--mfu", type=finite, default=0.4, help="assumed model FLOPs utilisation, in (0, 1]")
    p.add_argument(
        "--host-ram-gib",
        type=finite,
        help="host memory per node in GiB, checked against offload and model building (default: this machine's "
        "MemTotal from /proc/meminfo)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=finite,
        help="total memory of one GPU in GiB: overrides the kind's, or describes a kind not listed",
    )
    p.add_argument(
        "--peak-tflops",
        type=finite,
        help="dense bf16 peak TFLOPS of one GPU: overrides the kind's, or describes a kind not listed",
    )
    p.add_argument(
        "--interconnect",
        choices=("nvlink", "pcie"),
        help="how a node's GPUs talk, for the layout advice (default: pcie for the kinds usually without NVLink: "
        + ", ".join(sorted(PCIE_KINDS))
        + "; nvlink otherwise)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: must be in (0, 1]")
    for flag, value in (
        ("--host-ram-gib", args.host_ram_gib),
        ("--gpu-memory-gib", args.gpu_memory_gib),
        ("--peak-tflops", args.peak_tflops),
    ):
        if value is not None and value <= 0:
            raise UserError(f"{flag} {value:g}: must be above 0")
    gpus, gpu = parse_gpus(args.gpus, args.gpu_memory_gib, args.peak_tflops)
    if args.host_ram_gib is not None:
        host_ram, host_source = args.host_ram_gib, "--host-ram-gib"
    else:
        host_ram, host_source = this_machine_ram_gib(), f"this machine's {MEMINFO}; --host-ram-gib for others"
    model = model_for(args.model)
    result = plan(
        model,
        gpus,
        gpu,
        args.nodes,
        args.micro_batch_size,
        args.seq_len,
        args.mfu,
        host_ram_gib=host_ram,
        interconnect=args.interconnect,
    )
    result["host_ram_source"] = host_source
    print(json.dumps(result, indent=2) if args.json else render(result, args.model, host_source))
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
