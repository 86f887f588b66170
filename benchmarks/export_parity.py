#!/usr/bin/env python
"""Logits of a dsllm model and of its Hugging Face export, side by side on one device: the same token windows
through `load_model_dir` and through `transformers.AutoModelForCausalLM.from_pretrained`, in fp32 (the exact
check) and in bf16 autocast (what a user runs on a GPU), with greedy continuations compared token by token.

    python benchmarks/export_parity.py --checkpoint runs/x --hf runs/x-hf --device cuda --out DIR

Prints one JSON line (and writes DIR/export_parity.json); exits 1 when fp32 logits differ by more than --atol.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="export_parity.py", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="the exported run folder, checkpoint or model folder")
    p.add_argument("--hf", required=True, help="the folder `dsllm export` wrote")
    p.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda or cpu")
    p.add_argument("--windows", type=int, default=4, help="token windows compared")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (at most the model's max_seq_len)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest fp32 logit difference that passes")
    p.add_argument("--out", help="folder for export_parity.json")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM

    from dsllm.model_dir import load_model_dir, pick_device

    if not (Path(args.hf) / "config.json").is_file():
        raise UserError(f"--hf {args.hf}: no config.json there; pass the folder `dsllm export --output` wrote")
    device = pick_device(args.device)
    ours = load_model_dir(args.checkpoint, device).eval()
    theirs = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32).to(device).eval()
    seq_len = min(args.seq_len, ours.config.max_seq_len)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, ours.config.vocab_size, (args.windows, seq_len), generator=generator).to(device)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
    with torch.no_grad():
        for precision, enabled in (("fp32", False), ("bf16", True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                a = ours(idx)[0].float()
                b = theirs(idx).logits.float()
            result[f"{precision}_max_abs_diff"] = (a - b).abs().max().item()
            result[f"{precision}_argmax_agreement"] = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        prompt = idx[:1, :16]
        mine = ours.generate(prompt.tolist(), max_new_tokens=32, temperature=0.0)
        hf = theirs.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[0, 16:].tolist()
        result["greedy_tokens_equal"] = list(mine[0]) == hf
    result["ok"] = result["fp32_max_abs_diff"] <= args.atol
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "export_parity.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
