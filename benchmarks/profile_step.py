#!/usr/bin/env python
"""Where a training step's time goes: the engine's own step (dsllm.engine.Engine.train_batch) on a ZeRO config,
profiled.

    python benchmarks/profile_step.py --ds_config ds_configs/zero3.json            # tiny preset, 1 process
    python benchmarks/profile_step.py --ds_config ds_configs/zero2.json --steps 20 --model gpt2-124m --seq-len 256

Prints (1) torch.profiler's operator table (CPU ops, and CUDA kernels on a GPU), (2) Python time by source file
(cProfile's own time per file: DeepSpeed's hooks, partitioning and bookkeeping show up here, not as operators),
and (3) the step time, all over --steps steps after --warmup-steps. The run takes pretraining's options that
shape a step (`dsllm pretrain --help`), --model.FIELD VALUE included; the run folder (never written), resume,
step count and loader workers are the profiler's own, and the learning-rate warmup takes its default.
"""

from __future__ import annotations

import collections
import cProfile
import os
import pstats
import sys
import time
import warnings
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
OWN_OPTIONS = ("out", "resume", "max_steps", "loader_workers", "warmup_steps")  # set here, not taken
NOT_IN_A_STEP = (  # pretraining's options that change nothing in a step: not offered
    "max_time",
    "eval_interval",
    "eval_windows",
    "save_interval",
    "keep_checkpoints",
    "log_interval",
    "max_nonfinite_steps",
    "peak_tflops",
    "stop_grace",
    "sample_tokens",
    "init",  # the weights' values: a step costs the same from any
)


def build_parser() -> ArgumentParser:
    from dsllm.cli_args import add_config_arguments, add_launcher_argument
    from dsllm.train_config import TrainConfig

    parser = ArgumentParser(prog="profile_step.py", description=__doc__)
    profiler = parser.add_argument_group("profiler")
    profiler.add_argument("--steps", type=int, default=10, metavar="N", help="profiled steps")
    profiler.add_argument(
        "--warmup-steps", dest="untimed_steps", type=int, default=3, metavar="N", help="steps before profiling starts"
    )
    profiler.add_argument("--rows", type=int, default=25, metavar="N", help="rows of each table")
    skip = ("model_overrides", *OWN_OPTIONS, *NOT_IN_A_STEP)
    add_config_arguments(parser.add_argument_group("the run (as dsllm pretrain)"), TrainConfig, skip=skip)
    add_launcher_argument(parser)
    return parser


def parse_args(argv: list[str] | None):
    """(the run's TrainConfig, profiled steps, untimed steps first, table rows)."""
    from dsllm.cli_args import split_model_overrides
    from dsllm.train_config import TrainConfig

    overrides, rest = split_model_overrides(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    options = vars(parser.parse_args(rest))
    options.pop("local_rank")
    steps, untimed, rows = options.pop("steps"), options.pop("untimed_steps"), options.pop("rows")
    if min(steps, rows) < 1 or untimed < 0:
        raise UserError("--steps and --rows must be 1 or more, --warmup-steps 0 or more")
    if options["ds_config"] is None:
        parser.error("the following arguments are required: --ds_config")
    config = TrainConfig(
        **options,
        model_overrides=overrides,
        out=str(REPO / ".cache" / "profile-run"),
        resume="none",
        max_steps=steps + untimed + 1,
        loader_workers=0,
    )
    return config, steps, untimed, rows


def main(argv=None) -> int:
    config, steps, untimed, rows = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated collective names, per call
    from dsllm.engine import build_engine, engine_options, init_distributed, new_model, window_loss
    from dsllm.pretrain import make_loader, preflight

    plan = preflight(config)
    spec = plan.spec
    device = init_distributed(spec.world, config.collective_timeout)
    torch.manual_seed(config.seed)
    engine = build_engine(spec, new_model(spec), device, window_loss, **engine_options(config))
    engine.ds.train()
    batches = iter(make_loader(plan, device))
    for _ in range(untimed):
        engine.train_batch(batches)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else []
    )
    python = cProfile.Profile()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        python.enable()
        for _ in range(steps):
            engine.train_batch(batches)
        python.disable()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    if spec.world.is_main:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))
        print_python_time(python, steps, rows)
        print(
            f"step: {1000 * seconds:.1f} ms with both profilers on ({spec.tokens_per_step:,} "
            f"tokens, ZeRO-{spec.zero_stage}, {spec.precision}, {spec.world.size} rank(s))"
        )
    engine.teardown()
    return 0


def print_python_time(python: cProfile.Profile, steps: int, rows: int) -> None:
    """cProfile's own time per source file, ms per step, the largest `rows` files."""
    by_file = collections.Counter()
    marker = "site-packages" + os.sep
    for (filename, _, _), (_, _, own, _, _) in pstats.Stats(python).stats.items():
        name = "(C functions: torch operators, collectives)" if filename == "~" else filename
        by_file[name.split(marker, 1)[-1] if marker in name else name] += own
    total = sum(by_file.values())
    print(
        f"Python time by file (cProfile own time, ms per step; all files: {1000 * total / steps:.1f}; "
        "profiling overhead included):"
    )
    for name, own in by_file.most_common(rows):
        print(f"  {1000 * own / steps:8.2f}  {name}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
