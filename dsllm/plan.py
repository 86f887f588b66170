"""`python -m dsllm plan`: will this model train on this hardware, with which DeepSpeed config, and for how long?

    python -m dsllm plan --model llama-1.3b --gpus 8xA100-80GB
    python -m dsllm plan --model 7e9 --gpus 4x4090 --nodes 2 --seq-len 4096 --json

Memory per GPU = model states from DeepSpeed's own estimators (`estimate_zero2/zero3_model_states_mem_needs`,
the same formulas `deepspeed.runtime.zero.*.estimate_*_all_live` print) + activations of one micro batch (the
per-layer count of Korthikanti et al. 2022 with flash attention, i.e. no s x s scores; with activation
checkpointing one block input per layer plus one block recomputed) + the logits and their fp32 loss copy.
Expected tokens/s assumes an MFU (`--mfu`); the Chinchilla budget is 20 tokens per parameter.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys

from dsllm.errors import ArgumentParser, UserError, positive
from dsllm.metrics import peak_tflops
from dsllm.model_config import PRESETS, ModelConfig, resolve_model_config


@dataclasses.dataclass(frozen=True)
class GPU:
    memory_gib: float  # what nvidia-smi reports as total
    name: str  # as torch.cuda.get_device_name() has it: the key of dsllm.metrics.PEAK_TFLOPS

    @property
    def peak_tflops(self) -> float:  # dense bf16 (RTX 4090: with fp32 accumulate)
        return peak_tflops(self.name)


GPUS = {
    "A100-40GB": GPU(40.0, "A100"),
    "A100-80GB": GPU(80.0, "A100"),
    "H100-SXM": GPU(79.6, "H100 SXM"),
    "H100-PCIe": GPU(79.6, "H100 PCIe"),
    "H200": GPU(140.4, "H200"),
    "4090": GPU(24.0, "RTX 4090"),
    "3090": GPU(24.0, "RTX 3090"),
}
ALIASES = {"A100": "A100-80GB", "H100": "H100-SXM", "RTX4090": "4090", "RTX3090": "3090", "H100-80GB": "H100-SXM"}
RESERVED_GIB = 2.5  # CUDA context, NCCL buffers, allocator fragmentation: never available to tensors
CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
CHINCHILLA_TOKENS_PER_PARAM = 20
BYTES_PER_ACTIVATION = 2  # bf16


def parse_gpus(spec: str) -> tuple[int, str]:
    """'8xA100-80GB' -> (8, 'A100-80GB'); 'H100' -> (1, 'H100-SXM')."""
    match = re.fullmatch(r"(?:(\d+)\s*[xX*]\s*)?([A-Za-z0-9-]+)", spec.strip())
    table = {k.upper(): k for k in GPUS} | {k.upper(): v for k, v in ALIASES.items()}
    if not match or match.group(2).upper() not in table:
        raise UserError(
            f"--gpus {spec!r}: unknown GPU kind; use COUNTxKIND with KIND one of {', '.join(GPUS)} (e.g. 8xA100-80GB)"
        )
    count = int(match.group(1) or 1)
    if count < 1:
        raise UserError(f"--gpus {spec!r}: the count must be 1 or more")
    return count, table[match.group(2).upper()]


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
    zero_init=False rows: the trainer builds the whole model on every rank before DeepSpeed partitions it."""
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
            params, largest, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload, zero_init=False
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


def plan(
    model: ModelConfig,
    gpus: int,
    kind: str,
    nodes: int = 1,
    micro_batch: int = 1,
    seq_len: int | None = None,
    mfu: float = 0.4,
) -> dict:
    seq_len = seq_len or model.max_seq_len
    model.check_seq_len(seq_len)
    params, largest, gpu = model.num_parameters(), largest_layer_params(model), GPUS[kind]
    usable = gpu.memory_gib - RESERVED_GIB
    world = gpus * nodes
    rows = []
    for config in CONFIGS:
        device, host = model_state_gib(params, largest, config, gpus, nodes)
        row = {"config": config, "model_states_gib": device, "host_gib_per_node": host}
        for ckpt in (False, True):
            key = "checkpointing" if ckpt else "no_checkpointing"
            total = device + activation_gib(model, micro_batch, seq_len, ckpt)
            room = usable - device
            per_sample = activation_gib(model, 1, seq_len, ckpt)
            row[key] = {
                "gib_per_gpu": total,
                "fits": total <= usable,
                "largest_micro_batch": max(0, int(room // per_sample)) if room > 0 else 0,
            }
        rows.append(row)
    flops = 6 * params + 12 * model.n_layers * model.d_model * seq_len  # PaLM, as dsllm.model.flops_per_token
    tokens_per_second = mfu * gpu.peak_tflops * 1e12 * world / flops
    budget = CHINCHILLA_TOKENS_PER_PARAM * params
    fitting = [r["config"] for r in rows if r["no_checkpointing"]["fits"] or r["checkpointing"]["fits"]]
    return {
        "parameters": params,
        "model": model.to_dict(),
        "gpus_per_node": gpus,
        "nodes": nodes,
        "gpu": kind,
        "gpu_memory_gib": gpu.memory_gib,
        "usable_gib": usable,
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "configs": rows,
        "recommended": fitting[0] if fitting else None,
        "mfu_assumed": mfu,
        "tokens_per_second": tokens_per_second,
        "chinchilla_tokens": budget,
        "chinchilla_days": budget / tokens_per_second / 86400,
    }


def render(result: dict, name: str) -> str:
    lines = [
        f"{name}: {result['parameters']:,} parameters on {result['nodes']} node(s) x {result['gpus_per_node']} "
        f"{result['gpu']} ({result['gpu_memory_gib']:.0f} GiB, {result['usable_gib']:.1f} usable); micro batch "
        f"{result['micro_batch']} x {result['seq_len']} tokens",
        "",
        f"{'config':<14} {'states GiB':>10} {'host GiB/node':>13} {'total GiB':>10} {'fits':>5} {'max mb':>7}"
        f" {'+ckpt GiB':>10} {'fits':>5} {'max mb':>7}",
    ]
    for r in result["configs"]:
        a, b = r["no_checkpointing"], r["checkpointing"]
        lines.append(
            f"{r['config']:<14} {r['model_states_gib']:>10.1f} {r['host_gib_per_node']:>13.1f} "
            f"{a['gib_per_gpu']:>10.1f} {'yes' if a['fits'] else 'no':>5} {a['largest_micro_batch']:>7} "
            f"{b['gib_per_gpu']:>10.1f} {'yes' if b['fits'] else 'no':>5} {b['largest_micro_batch']:>7}"
        )
    advice = (
        result["recommended"] + ".json"
        if result["recommended"]
        else "none fits: more GPUs, a shorter --seq-len, or a smaller model"
    )
    lines += [
        "",
        f"recommended: {advice} (the first that fits, in order of speed)",
        f"expected: {result['tokens_per_second']:,.0f} tokens/s at {100 * result['mfu_assumed']:.0f}% MFU; "
        f"Chinchilla budget {result['chinchilla_tokens'] / 1e9:,.1f}B tokens in {result['chinchilla_days']:,.1f} days",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="python -m dsllm plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="preset, model JSON, or parameter count (125M, 1.3e9, 7B)")
    p.add_argument("--gpus", required=True, help=f"COUNTxKIND per node, KIND one of {', '.join(GPUS)}")
    p.add_argument("--nodes", type=positive, default=1)
    p.add_argument("--micro-batch-size", type=positive, default=1)
    p.add_argument("--seq-len", type=positive, help="default: the model's max_seq_len")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise UserError(f"--mfu {args.mfu}: must be in (0, 1]")
    gpus, kind = parse_gpus(args.gpus)
    result = plan(model_for(args.model), gpus, kind, args.nodes, args.micro_batch_size, args.seq_len, args.mfu)
    print(json.dumps(result, indent=2) if args.json else render(result, args.model))
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
