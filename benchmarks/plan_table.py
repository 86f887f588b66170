#!/usr/bin/env python
"""The README's "Which preset fits where" table: `dsllm plan` for every model preset on common machines.

    python benchmarks/plan_table.py              # the caption and the markdown table, on stdout

Each cell is `dsllm.plan.plan` at micro batch 1 and the preset's max_seq_len, with the host memory a machine of
that kind usually has (stated in the column header and the caption): the recommended config, "ckpt" when it needs
activation checkpointing, the largest micro batch per GPU, and the host memory per node when it offloads.
The same answer, one cell at a time: `dsllm plan --model PRESET --gpus 8xA100-80GB --host-ram-gib 1024`.
"""

from __future__ import annotations

import sys
import textwrap

from dsllm.errors import ArgumentParser
from dsllm.model_config import PRESETS
from dsllm.plan import HEADROOM_FRACTION, RESERVED_GIB, model_for, parse_gpus, plan

COLUMNS = [  # (header, --gpus, --host-ram-gib: host memory per node that such a machine usually has)
    ("1× 4090", "1x4090", 128),  # a workstation
    ("4× 4090", "4x4090", 256),  # a 4-GPU workstation or server
    ("1× A100-40GB", "1xA100-40GB", 128),  # a one-GPU cloud instance
    ("8× A100-40GB", "8xA100-40GB", 1024),  # a DGX-class node
    ("8× A100-80GB", "8xA100-80GB", 1024),
    ("8× H100-SXM", "8xH100-SXM", 1024),
    ("1× H200", "1xH200", 256),  # a one-GPU cloud instance
]
COMMAND = "python benchmarks/plan_table.py"


def cell(result: dict) -> str:
    """The recommendation of one `plan` result in a few words."""
    best = result["recommended"]
    if best is not None:
        words = [best["config"]]
        if best["activation_checkpointing"]:
            words.append("ckpt")
        words.append(f"mb {best['largest_micro_batch']}")
        text = " ".join(words)
        if best["config"].endswith("offload"):
            text += f", {best['host_gib_per_node']:.0f} GiB host"
        return text
    fit_gpus = [r for r in result["configs"] if r["no_checkpointing"]["fits"] or r["checkpointing"]["fits"]]
    if fit_gpus:  # the GPUs would hold it; the host memory is what is short
        row = min(fit_gpus, key=lambda r: r["host_gib_per_node"])
        return f"none: {row['config']} needs {row['host_gib_per_node']:.0f} GiB host"
    return "none fits the GPUs"


def table() -> str:
    headers = [f"{name}, {ram:,} GiB host" for name, _, ram in COLUMNS]
    lines = [
        f"| preset (seq len) | {' | '.join(headers)} |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    machines = [(*parse_gpus(gpus), ram) for _, gpus, ram in COLUMNS]
    for preset in PRESETS:
        model = model_for(preset)
        cells = [cell(plan(model, count, gpu, host_ram_gib=ram)) for count, gpu, ram in machines]
        lines.append(f"| `{preset}` ({model.max_seq_len}) | {' | '.join(cells)} |")
    return "\n".join(lines)


def caption() -> str:
    text = (
        f"**Which preset fits where** (`{COMMAND}`: `dsllm plan --model PRESET --gpus N×KIND --host-ram-gib H` "
        "for each cell, i.e. DeepSpeed's estimators plus activations, bf16, micro batch 1 at the preset's sequence "
        f"length, {RESERVED_GIB} GiB per GPU kept for the CUDA context and NCCL and {100 * HEADROOM_FRACTION:.0f}% "
        "of the rest left spare; the first config that fits in order ZeRO-0 → 3, then offload; `mb` is the largest "
        'micro batch per GPU; "ckpt" means only with activation checkpointing '
        "(`--model.activation_checkpointing deepspeed`); offload needs the host memory shown. Host memory per node "
        "is an assumption, stated in each column's header: what a machine of that kind usually has; pass your "
        "machines' own to `dsllm plan`):"
    )
    return textwrap.fill(text, width=110, break_long_words=False, break_on_hyphens=False)


def build_parser() -> ArgumentParser:
    return ArgumentParser(prog=COMMAND, description=__doc__)


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    print(caption())
    print()
    print(table())
    return 0


if __name__ == "__main__":
    from dsllm.errors import run_cli

    sys.exit(run_cli(main))
