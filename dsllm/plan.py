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
from dsllm.experts import check_expert_split
from dsllm.metrics import GPU_KINDS
from dsllm.model_config import PRESETS, ModelConfig, resolve_model_config
from dsllm.plan_layouts import (
    BYTES_PER_ACTIVATION,
    CHECKPOINTING_FLAG,
    PCIE_KINDS,
    activation_bytes,
    layout_advice,
    layout_table,
    layouts,
    recommend_layout,
    yes_no,
)

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
    """Activations kept for backward for one micro batch, unsplit (`plan_layouts.activation_bytes`)."""
    return sum(activation_bytes(model, micro_batch, seq_len, checkpointing, bytes_per_value)) / 2**30


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
    expert_parallel: int = 1,
) -> dict:
    """Every config's memory per GPU and per node against `gpu` and `host_ram_gib`, the recommendation, and the
    expected speed; `gpus` per node. `expert_parallel`: a Mixture-of-Experts model's experts split over this many
    GPUs (`dsllm pretrain --expert-parallel`)."""
    seq_len = seq_len or model.max_seq_len
    model.check_seq_len(seq_len)
    check_expert_split(model, expert_parallel, gpus * nodes, unit="GPU")
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
    # Mixture-of-Experts: DeepSpeed trains MoE layers on ZeRO-0/1/2 only, without dsllm's pipeline or tensor layouts
    configs = [c for c in CONFIGS if not (model.moe_experts and c.startswith("zero3"))]
    for config in configs:
        device, host = model_state_gib(params, largest, config, gpus, nodes)
        if expert_parallel > 1:
            # a GPU holds 1/E of the experts (ZeRO-partitioned over the ranks holding the same ones) and builds only
            # those; offloaded optimizer states stay one share of every parameter per rank, as without the split
            experts = model.expert_parameters
            device = model_state_gib(params - experts, largest, config, gpus, nodes)[0]
            device += model_state_gib(experts // expert_parallel, largest, config, world // expert_parallel, 1)[0]
            if not config.endswith("offload"):
                host = model_state_gib(params - experts + experts // expert_parallel, largest, config, gpus, nodes)[1]
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
    layout_rows = [] if model.moe_experts else layouts(model, gpus, nodes, micro_batch, seq_len, usable, headroom)
    interconnect = interconnect or ("pcie" if gpu.name in PCIE_KINDS else "nvlink")
    active = model.num_parameters(active=True)  # (a sparse block: its router and top-k experts)
    flops = 6 * active + 12 * model.n_layers * model.d_model * seq_len  # PaLM, as dsllm.model.flops_per_token
    tokens_per_second = mfu * gpu.peak_tflops * 1e12 * world / flops
    budget = CHINCHILLA_TOKENS_PER_PARAM * params
    return {
        "parameters": params,
        "active_parameters": active,
        "model": model.to_dict(),
        "gpus_per_node": gpus,
        "nodes": nodes,
        "expert_parallel": expert_parallel,
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


def _active(result: dict) -> str:
    """', N active' for a Mixture-of-Experts model (what a token goes through), else ''."""
    active, split = result["active_parameters"], result["expert_parallel"]
    if active == result["parameters"]:
        return ""
    held = f"the experts split over {split} GPUs" if split > 1 else "every GPU holding all experts"
    return f" ({active:,} active per token; ZeRO-0/1/2, {held})"


def render(result: dict, name: str, host_source: str) -> str:
    lines = [
        f"{name}: {result['parameters']:,} parameters{_active(result)} on {result['nodes']} node(s) x "
        f"{result['gpus_per_node']} "
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
            f"{yes_no(r['host_fits']):>5} {a['gib_per_gpu']:>10.1f} {yes_no(a['fits']):>5} "
            f"{a['largest_micro_batch']:>7} "
            f"{b['gib_per_gpu']:>10.1f} {yes_no(b['fits']):>5} {b['largest_micro_batch']:>7}"
        )
    lines += layout_table(result["layouts"])
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
    p.add_argument(
        "--expert-parallel",
        type=positive,
        default=1,
        metavar="E",
        help="a Mixture-of-Experts model's experts split over E GPUs (pretraining's --expert-parallel)",
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
        expert_parallel=args.expert_parallel,
    )
    result["host_ram_source"] = host_source
    print(json.dumps(result, indent=2) if args.json else render(result, args.model, host_source))
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
