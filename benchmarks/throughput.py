#!/usr/bin/env python
"""Training throughput and memory of dsllm's DeepSpeed engine (ZeRO 0-3, offload) against a plain PyTorch loop,
swept over model preset x sequence length x micro batch x activation checkpointing x ranks, in one run.

    python benchmarks/throughput.py                                    # tiny preset, fp32 on CPU, 1 rank
    python benchmarks/throughput.py --seq-len 128 256 --micro-batch-size 4 8 --checkpointing both
    python benchmarks/throughput.py --model gpt2-124m --ranks 1 2 --offload --tag memory   # memory per ZeRO stage
    python benchmarks/throughput.py --compile both                     # torch.compile under the engine, side by side
    python benchmarks/throughput.py --quick --results-dir /tmp/b       # CI-sized smoke run
    python benchmarks/throughput.py --model tiny-moe benchmarks/models/tiny-dense-2x.json --ranks 2 --stages 1 \
        --expert-parallel 2                                            # MoE vs dense of the same active parameters
    python benchmarks/throughput.py --seq-len 512 --model.max_seq_len 512 --stages 1 --sequence-parallel 2

Every point (model, seq len, micro batch, checkpointing, ranks) runs the plain loop and each ZeRO variant on the
same model, data, batch and precision; ppN, tpN, spN and epN are pipeline, tensor-, sequence- (Ulysses) and
expert-parallel layouts on ZeRO-1 (the last three report their time in collectives, by DeepSpeed's comms logger).
plain: torch AdamW over dsllm.optimizer.param_groups, the engine's cosine LR, clipping 1.0, fp32 or bf16 autocast.
zeroN: preflight() -> init_distributed() -> build_engine() on ds_configs/zeroN.json, then Engine.train_batch, the
training loop's own step. Each variant runs in a fresh process (`--_worker`); with N ranks the plain loop stays ONE
process (all cores, or one GPU) with micro batch x N: the same global batch. Writes
YYYY-MM-DD-throughput-<hardware>[-TAG].{md,json,png} to --results-dir.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from throughput_measure import MARK, ds_config_name, layout, processes, train_config, worker
from throughput_report import (
    GPU_TARGETS,
    MEMORY_TARGET,
    PLAN_TOLERANCE,
    POINT_KEYS,
    TARGETS,
    ds_estimates,
    memory_scaling,
    model_ratios,
    plan_prediction,
    point_label,
    scaling_table,
    summarize,
    table,
    write_results,
)

from dsllm.cli_args import split_model_overrides
from dsllm.errors import ArgumentParser, UserError, run_cli
from dsllm.model_config import PRESETS

REPO = Path(__file__).resolve().parents[1]
QUICK_MODEL = {
    "n_layers": "2",
    "d_model": "64",
    "n_heads": "4",
    "n_kv_heads": "2",
    "max_seq_len": "64",
    "mlp_multiple_of": "32",
}  # tests/runs.py SMALL_MODEL
DEFAULTS = {  # full / --quick values of the options left unset
    "full": {
        "seq_len": [None],
        "micro_batch_size": [8],
        "steps": 30,
        "warmup_steps": 5,
        "stages": [0, 1, 2, 3],
        "repeats": 2,
        "threads": None,
    },
    "quick": {
        "seq_len": [32],
        "micro_batch_size": [4],
        "steps": 8,
        "warmup_steps": 2,
        "stages": [0, 2],
        "repeats": 1,
        "threads": 1,
    },  # a 5 ms step on 2 threads is mostly OpenMP hand-offs
}
SETTINGS = (  # the options the results record under "settings"
    "model_overrides",
    "micro_batch_size",
    "seq_len",
    "ranks",
    "checkpointing",
    "compile",
    "precision",
    "steps",
    "warmup_steps",
    "repeats",
    "data",
    "quick",
    "pipeline_stages",
    "micro_batches",
    "pipeline_partition",
    "tensor_parallel",
    "sequence_parallel",
    "expert_parallel",
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="throughput.py", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: small model, seq 32, micro 4, 8 steps, 1 thread, ZeRO 0 and 2",
    )
    p.add_argument(
        "--model", nargs="+", default=["tiny"], help="presets or JSON files; plus --model.FIELD VALUE for all of them"
    )
    p.add_argument("--data", help="prepared dataset folder (default: the embedded default corpus)")
    p.add_argument(
        "--seq-len", type=int, nargs="+", help="tokens per sample (default: the model's max_seq_len; quick 32)"
    )
    p.add_argument("--micro-batch-size", type=int, nargs="+", help="per rank (default 8, quick 4)")
    p.add_argument(
        "--checkpointing",
        choices=["off", "on", "both"],
        default="off",
        help="activation checkpointing of every block (torch.utils.checkpoint): off, on, or both (sweep it)",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the model (engine.compile() for ZeRO): off, on, or both (each variant eager and compiled)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16",
    )
    p.add_argument("--steps", type=int, help="timed steps (default 30, quick 8)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5, quick 2)")
    p.add_argument(
        "--stages", type=int, nargs="+", choices=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3; quick 0 2)"
    )
    p.add_argument("--offload", action="store_true", help="also zero2_offload and zero3_offload")
    p.add_argument(
        "--pipeline-stages",
        type=int,
        nargs="+",
        default=[],
        help="also ppN: N pipeline stages (ZeRO-1) x --ranks replicas, timed against the ideal 1F1B figure",
    )
    p.add_argument(
        "--micro-batches", type=int, default=8, help="micro batches per step of the ppN variants (the 1F1B depth)"
    )
    p.add_argument(
        "--pipeline-partition",
        choices=["blocks", "uniform", "parameters"],
        default="blocks",
        help="how the ppN variants split the layers over the stages (pretraining's --pipeline-partition)",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        nargs="+",
        default=[],
        help="also tpN: N tensor-parallel ranks (AutoTP, ZeRO-1) x --ranks replicas; reports the time in collectives",
    )
    p.add_argument(
        "--sequence-parallel",
        type=int,
        nargs="+",
        default=[],
        help="also spN: N sequence-parallel ranks (DeepSpeed-Ulysses, ZeRO-1) x --ranks replicas; reports the time in "
        "collectives and the all-to-alls' share",
    )
    p.add_argument(
        "--expert-parallel",
        type=int,
        nargs="+",
        default=[],
        help="also epN for Mixture-of-Experts models: the experts split over N of the --ranks data-parallel ranks "
        "(ZeRO-1; N divides every --ranks); reports the time in collectives and the all-to-alls' share",
    )
    p.add_argument("--no-plain", action="store_true", help="skip the plain loop (no ratios)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1], help="data-parallel ranks of the ZeRO variants")
    p.add_argument(
        "--threads", type=int, help="CPU threads per process (default: cores / ranks, plain all cores; quick 1)"
    )
    p.add_argument(
        "--repeats", type=int, help="trials of every variant, interleaved; the best counts (default 2, quick 1)"
    )
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: the GPU table; none on CPU)")
    p.add_argument("--tag", help="suffix of the result file names (several runs on one day)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"), help="where the .md/.json/.png go")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # child mode: run one variant, print one JSON line
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher appends it
    return p


def parse_args(argv):
    """The options, --model.FIELD VALUE as args.model_overrides, the full or --quick defaults filled in."""
    overrides, rest = split_model_overrides(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(rest)
    args.model_overrides = overrides or (dict(QUICK_MODEL) if args.quick and args.model == ["tiny"] else {})
    for name, value in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "repeats", "warmup_steps", "threads", "micro_batches"):
        least = 0 if name == "warmup_steps" else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {least} or more")
    for name in (
        "seq_len",
        "micro_batch_size",
        "ranks",
        "pipeline_stages",
        "tensor_parallel",
        "sequence_parallel",
        "expert_parallel",
    ):
        bad = [v for v in getattr(args, name) if v is not None and v < 1]
        if bad:
            raise UserError(f"--{name.replace('_', '-')} {bad[0]}: must be 1 or more")
    for size, ranks in itertools.product(args.expert_parallel, args.ranks):
        if ranks % size:
            raise UserError(
                f"--expert-parallel {size}: --ranks {ranks} does not divide into groups of {size} (the experts are "
                f"split over {size} of a point's data-parallel ranks); use --ranks that are multiples of {size}"
            )
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise UserError(f"--tag {args.tag!r}: use letters, digits, '.', '_' or '-'")
    return args


def points(args) -> list[dict]:
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    return [
        dict(zip(POINT_KEYS, values))
        for values in itertools.product(args.model, args.seq_len, args.micro_batch_size, checkpointing, args.ranks)
    ]


def variants(args) -> list[str]:
    names = ([] if args.no_plain else ["plain"]) + [f"zero{s}" for s in sorted(set(args.stages))]
    names += ["zero2_offload", "zero3_offload"] if args.offload else []
    names += [f"pp{stages}" for stages in args.pipeline_stages]
    names += [f"tp{size}" for size in args.tensor_parallel]
    names += [f"sp{size}" for size in args.sequence_parallel]
    names += [f"ep{size}" for size in args.expert_parallel]
    return {
        "off": names,
        "on": [n + "+compile" for n in names],
        "both": [x for n in names for x in (n, n + "+compile")],
    }[args.compile]


def check_points(
    args, point_list: list[dict], names: list[str], device_type: str
) -> tuple[dict, dict, dict, dict, dict]:
    """Every input check before any worker starts: each point, and each variant of it on its own world size, through
    preflight. Fills each point's seq_len; returns (shapes by 1-rank point label, DeepSpeed's estimates by (model,
    ranks), models by name, `dsllm plan`'s GiB per GPU by (point label, variant), skips: why by (point label,
    variant), for a variant the model has nothing for: epN of a dense model)."""
    from dsllm.model import flops_per_token
    from dsllm.pretrain import preflight
    from dsllm.world import World

    shapes, estimates, models, plans, skips = {}, {}, {}, {}, {}
    for point in point_list:
        spec = preflight(train_config(args, point, "zero0", device_type)).spec
        point["seq_len"] = spec.seq_len
        label = point_label(point)
        for variant in names:
            sizes = layout(variant)
            if sizes["experts"] > 1 and not spec.model.moe_experts:
                skips[(label, variant)] = f"{point['model']} is dense: no experts to split over ranks"
                continue
            if not variant.startswith("plain"):  # a layout DeepSpeed cannot run is one line now, not a failed row
                world = World(rank=0, local_rank=0, size=processes(variant, point["ranks"]))
                compiled = variant.endswith("+compile")
                preflight(train_config(args, point, ds_config_name(variant), device_type, compiled, **sizes), world)
            plans[(label, variant)] = plan_prediction(spec.model, point, variant)
        parameters = spec.model.num_parameters()
        shapes[point_label({**point, "ranks": 1})] = (
            spec.seq_len,
            flops_per_token(spec.model, spec.seq_len),
            parameters,
        )
        models[point["model"]] = {
            "parameters": parameters,
            "active_parameters": spec.model.num_parameters(active=True),
            "config": spec.model.to_dict(),
        }
        if (point["model"], point["ranks"]) not in estimates:
            estimates[(point["model"], point["ranks"])] = ds_estimates(spec.model, point["ranks"])
    return shapes, estimates, models, plans, skips


def run_trials(args, point_list: list[dict], names: list[str], device_type: str, skips: dict) -> list[dict]:
    """Every variant of every point, --repeats times, interleaved (a slow spell of the machine hits them all); a
    skipped one (`skips`) is recorded as such, never run."""
    trials, total = [], args.repeats * len(point_list) * len(names)
    for trial in range(args.repeats):
        for point in point_list:
            for variant in names:
                label = f"[{len(trials) + 1}/{total}] {point_label(point)} {variant} ..."
                print(label, end=" ", file=sys.stderr, flush=True)
                skipped = skips.get((point_label(point), variant))
                if skipped:
                    trials.append({**point, "variant": variant, "skipped": skipped, "trial": trial})
                    print(f"skipped: {skipped}", file=sys.stderr, flush=True)
                    continue
                trials.append({**run_variant(args, point, variant, device_type), "trial": trial})
                done = trials[-1].get("error") or f"{trials[-1]['tokens_per_second']:,.0f} tokens/s"
                print(done, file=sys.stderr, flush=True)
    return trials


def run_variant(args, point: dict, variant: str, device_type: str) -> dict:
    """One variant of one point in a fresh process (the launcher's N processes for N ranks): its measurement."""
    from dsllm.engine import free_port

    plain = variant.startswith("plain")
    ranks = processes(variant, point["ranks"])
    micro = point["micro_batch_size"] * (point["ranks"] if plain else 1)  # plain: the same global batch
    model = point["model"]  # a model JSON as the worker (in the repository) finds it
    model = model if model in PRESETS or not Path(model).is_file() else str(Path(model).resolve())
    worker_args = [
        str(Path(__file__).resolve()),
        "--_worker",
        variant,
        "--data",
        args.data,
        "--model",
        model,
        *[x for k, v in args.model_overrides.items() for x in (f"--model.{k}", str(v))],
        "--micro-batch-size",
        str(micro),
        "--precision",
        args.precision,
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--micro-batches",
        str(args.micro_batches),
        "--pipeline-partition",
        args.pipeline_partition,
        "--checkpointing",
        "on" if point["checkpointing"] else "off",
        *(["--seq-len", str(point["seq_len"])] if point["seq_len"] else []),
    ]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions"),
    }
    if device_type == "cpu":  # ranks must not oversubscribe the cores; the plain loop gets all of them
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // ranks)))
    command = [sys.executable, *worker_args]
    if ranks > 1:
        launcher = (
            shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed") or "deepspeed"
        )
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(free_port()), *worker_args]
    load = os.getloadavg()[0]  # a shared machine's other work shows here: kept with every trial
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    found = [line.split(MARK, 1)[1] for line in done.stdout.splitlines() if MARK in line]
    if done.returncode or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        return {**point, "variant": variant, "error": f"exit {done.returncode}\n{tail}"}
    measured = json.loads(found[-1])  # its "ranks" are the processes that ran: 1 for plain
    return {
        **measured,
        **point,
        "world_size": measured["ranks"],
        "load_average_before": load,
        "load_average_after": os.getloadavg()[0],
    }


def git_revision() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:  # results files do not make the tree dirty
        return git("rev-parse", "HEAD") + (
            "-dirty" if git("status", "--porcelain", "--", ".", ":!benchmarks/results") else ""
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    info = {"cpu": cpu.group(1).strip() if cpu else platform.processor() or "unknown", "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        info["slug"] = (
            re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().replace("nvidia", "")).strip("-") + f"-x{info['gpus']}"
        )
    else:
        name = re.sub(r"\((r|tm)\)|@.*|\b(cpu|processor)\b", " ", info["cpu"].lower())
        info["slug"] = f"{re.sub(r'[^a-z0-9]+', '-', name).strip('-') or 'unknown-cpu'}-{info['cores']}c"
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker(args)
    import torch

    from dsllm import __version__
    from dsllm.metrics import peak_tflops

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif max(args.ranks) > torch.cuda.device_count():
        raise UserError(f"--ranks {max(args.ranks)}: this machine has {torch.cuda.device_count()} GPU(s)")
    args.precision = args.precision if args.precision != "auto" else "bf16" if device_type == "cuda" else "fp32"
    started = datetime.datetime.now()
    if args.data is None:
        from dsllm.data.default_corpus import build_default_dataset

        size = {"max_bytes": 300_000, "vocab_size": 1000} if args.quick else {}
        args.data = str(build_default_dataset(**size, log=lambda m: print(m, file=sys.stderr)))
    point_list, names = points(args), variants(args)
    shapes, estimates, models, plans, skips = check_points(args, point_list, names, device_type)
    trials = run_trials(args, point_list, names, device_type, skips)
    peak = args.peak_tflops or peak_tflops()
    rows = summarize(trials, point_list, names, estimates, shapes, peak, plans, gpu=device_type == "cuda")
    import deepspeed  # after DS_ACCELERATOR is set

    result = {
        "benchmark": "throughput",
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "git_revision": git_revision(),
        "hardware": hardware(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "dsllm": __version__,
        },
        "settings": {**{k: getattr(args, k) for k in SETTINGS}, "models": models, "peak_tflops": peak},
        "targets": {
            "tokens_per_second_ratio_to_plain": GPU_TARGETS if device_type == "cuda" else TARGETS,
            "model_state_ratio_n_over_1_rank": MEMORY_TARGET,
            "peak_memory_within_plan": PLAN_TOLERANCE,
        },
        "rows": rows,
        "memory_scaling": memory_scaling(rows),
        "model_ratios": model_ratios(rows),
        "trials": trials,
        "ds_estimates": {f"{m} x{n}": e for (m, n), e in estimates.items()},
    }
    stem = write_results(result, estimates, Path(args.results_dir), args.tag)
    print("\n".join(table(rows)))
    if result["memory_scaling"]:
        print("\n".join(scaling_table(result["memory_scaling"])))
    print(f"wrote {stem}.md, .json" + (" and .png" if Path(f"{stem}.png").exists() else ""), file=sys.stderr)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
