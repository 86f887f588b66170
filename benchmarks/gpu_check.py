#!/usr/bin/env python
"""What the CUDA path of dsllm actually runs on this GPU, before any benchmark: the device and its versions, the
bf16 matrix rate it reaches (the honest ceiling for MFU), and which scaled_dot_product_attention kernel our own
Attention module gets (flash, memory-efficient, cuDNN or math), for the three ways dsllm calls it: GPT-2
(learned positions, MHA, causal), llama (RoPE, GQA, causal) and packed fine-tuning rows (RoPE, GQA, a
block-diagonal boolean mask). Forward and backward under bf16 autocast, kernels read off torch.profiler.

    python benchmarks/gpu_check.py --out DIR            # DIR/gpu_check.json, and a summary on stdout
    python benchmarks/gpu_check.py --allow-cpu          # rehearsal without CUDA (tiny shapes, no kernels)

Without CUDA (and without --allow-cpu) it exits 2 with one line that says so.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli

# the aten op SDPA dispatches to, by backend (what decides; kernel names below are the evidence)
BACKEND_OPS = {
    "flash": "aten::_scaled_dot_product_flash_attention",
    "memory-efficient": "aten::_scaled_dot_product_efficient_attention",
    "cudnn": "aten::_scaled_dot_product_cudnn_attention",
    "math": "aten::_scaled_dot_product_attention_math",
}
# kernel-name fragments of each SDPA backend's CUDA kernels (torch 2.5-2.11)
BACKEND_KERNELS = {
    "flash": ("flash_fwd", "flash_bwd", "pytorch_flash::", "flash::"),
    "memory-efficient": ("fmha_cutlass", "efficient_attention", "mem_efficient", "attention_kernel_backward"),
    "cudnn": ("cudnn", "sdpa_cudnn", "cudnn_generated_fort_native_sdpa"),
}
CASES = {  # (model preset, model overrides, mask): dsllm's three attention calls
    "gpt2 (MHA, learned positions, causal)": ("gpt2-124m", {}, False),
    "llama (GQA, RoPE, causal)": ("llama-1.3b", {}, False),
    "packed SFT rows (GQA, RoPE, block-diagonal bool mask)": ("llama-1.3b", {}, True),
}


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpu_check.py", description=__doc__)
    p.add_argument("--out", help="folder for gpu_check.json (default: print only)")
    p.add_argument("--allow-cpu", action="store_true", help="rehearse on CPU: tiny shapes, no kernel names")
    return p


def matmul_tflops(device, size: int) -> float:
    """bf16 matrix-product rate on random data: median of 10 timed products after 3 warm-ups."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            a @ b
            seconds = time.perf_counter() - began
        if i >= 3:
            times.append(seconds)
    times.sort()
    return 2 * size**3 / times[len(times) // 2] / 1e12


def packed_mask(batch: int, seq_len: int, device):
    """A block-diagonal causal boolean mask of documents of varied length, as dsllm.sft_data packs rows."""
    import torch

    seg = torch.zeros(batch, seq_len, dtype=torch.long)
    for row in range(batch):
        cut, doc = 0, 0
        while cut < seq_len:
            length = max(16, (seq_len // 3) >> (doc % 3))
            seg[row, cut : cut + length] = doc
            cut, doc = cut + length, doc + 1
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return mask[:, None].to(device)


def attention_backend(case: tuple, device, seq_len: int, batch: int) -> dict:
    """Which SDPA kernels one Attention block of the preset runs, forward and backward, bf16 autocast."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dsllm.model import Attention, rotary_embedding
    from dsllm.model_config import resolve_model_config

    preset, overrides, with_mask = case
    config = resolve_model_config(preset, overrides)
    attention = Attention(config).to(device)
    x = torch.randn(batch, seq_len, config.d_model, device=device, requires_grad=True)
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    rotary = rotary_embedding(positions, config, torch.bfloat16) if config.positions == "rope" else None
    mask = packed_mask(batch, seq_len, device) if with_mask else None

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = attention(x, rotary, mask)
        y.float().square().mean().backward()

    step()  # warm-up: kernels chosen, libraries loaded
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})
    ops = sorted({e.name for e in prof.events() if "attention" in e.name.lower() and e.name.startswith("aten::")})
    found = [b for b, op in BACKEND_OPS.items() if any(o == op or o.startswith(op + "_for_") for o in ops)]
    return {
        "preset": preset,
        "heads": config.n_heads,
        "kv_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "seq_len": seq_len,
        "batch": batch,
        "mask": with_mask,
        "backend": "+".join(found) or "unknown",
        "aten_ops": ops,
        "attention_kernels": [n for n in names if any(p in n for parts in BACKEND_KERNELS.values() for p in parts)],
        "kernel_count": len(names),
    }


def versions() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as err:  # the suite installs it from wheels: say what failed instead of stopping here
        info["deepspeed"] = f"not importable: {err}"
    return info


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from dsllm.metrics import peak_tflops

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise UserError(
            f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): this suite measures a GPU; "
            "run it on a GPU machine, or benchmarks/cpu_suite.sh here"
        )
    device = torch.device("cuda" if cuda else "cpu")
    report = {"versions": versions()}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        report["device"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30,
            "multiprocessors": props.multi_processor_count,
            "table_peak_tflops": peak_tflops(),
        }
    report["matmul_bf16_tflops"] = matmul_tflops(device, 8192 if cuda else 512)
    seq_len, batch = (2048, 4) if cuda else (64, 2)
    report["attention"] = {name: attention_backend(case, device, seq_len, batch) for name, case in CASES.items()}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["versions"]))
    if cuda:
        print(json.dumps(report["device"]))
    print(f"bf16 matmul: {report['matmul_bf16_tflops']:.0f} TFLOP/s")
    for name, found in report["attention"].items():
        print(f"SDPA {name}: {found['backend']}  {found['attention_kernels'][:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
