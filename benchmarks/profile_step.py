#!/usr/bin/env python
"""Where a training step's time goes: the trainer's own step (dsllm.trainer.train_step) on a ZeRO config, profiled.

    python benchmarks/profile_step.py --ds_config ds_configs/zero3.json            # tiny preset, 1 process
    python benchmarks/profile_step.py --ds_config ds_configs/zero2.json --steps 20 --model gpt2-124m --seq-len 256

Prints (1) torch.profiler's operator table (CPU ops, and CUDA kernels on a GPU), (2) Python time by source file
(cProfile's own time per file: DeepSpeed's hooks, partitioning and bookkeeping show up here, not as operators),
and (3) the step time, all over --steps steps after --warmup-steps. Same options as launch/pretrain.py otherwise.
"""

from __future__ import annotations

import collections
import cProfile
import os
import pstats
import sys
import time
import warnings

from dsllm.errors import ArgumentParser, UserError, run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collective names, per call
    from dsllm.train_config import parse_train_args
    from dsllm.trainer import build_engine, init_distributed, make_loader, preflight, train_step

    own = ArgumentParser(prog="profile_step.py", add_help=False)
    own.add_argument("--steps", type=int, default=10)
    own.add_argument("--warmup-steps", type=int, default=3)
    own.add_argument("--rows", type=int, default=25)
    mine, argv = own.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    steps, warmup, rows = mine.steps, mine.warmup_steps, mine.rows
    if min(steps, rows) < 1 or warmup < 0:
        raise UserError("--steps and --rows must be 1 or more, --warmup-steps 0 or more")
    config = parse_train_args(
        argv
        + [
            "--out",
            os.path.join(REPO, ".cache", "profile-run"),
            "--resume",
            "none",
            "--max-steps",
            str(steps + warmup + 1),
            "--loader-workers",
            "0",
        ]
    )
    plan = preflight(config)
    device = init_distributed(plan)
    engine = build_engine(plan, device)
    engine.train()
    batches = iter(make_loader(plan, device))
    for _ in range(warmup):
        train_step(plan, engine, batches, device)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    python = cProfile.Profile()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        python.enable()
        for _ in range(steps):
            train_step(plan, engine, batches, device)
        python.disable()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if plan.rank == 0:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))
        by_file = collections.Counter()
        for (filename, _, _), (_, _, own, _, _) in pstats.Stats(python).stats.items():
            marker = "site-packages" + os.sep
            name = "(C functions: torch operators, collectives)" if filename == "~" else filename
            by_file[name.split(marker, 1)[-1] if marker in name else name] += own
        total = sum(by_file.values())
        print(
            f"Python time by file (cProfile own time, ms per step; all files: {1000 * total / steps:.1f}; "
            "profiling overhead included):"
        )
        for name, own in by_file.most_common(rows):
            print(f"  {1000 * own / steps:8.2f}  {name}")
        print(
            f"step: {1000 * seconds:.1f} ms with both profilers on ({plan.batch.global_size * plan.seq_len:,} "
            f"tokens, ZeRO-{plan.zero_stage}, {plan.precision}, {plan.world_size} rank(s))"
        )
    engine.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
