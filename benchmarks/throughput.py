#!/usr/bin/env python
"""Training throughput and memory of our trainer's DeepSpeed engine (ZeRO 0-3, offload) against a plain PyTorch
loop, swept over model preset x sequence length x micro batch x activation checkpointing x ranks, in one run.

    python benchmarks/throughput.py                                    # tiny preset, fp32 on CPU, 1 rank
    python benchmarks/throughput.py --seq-len 128 256 --micro-batch-size 4 8 --checkpointing both
    python benchmarks/throughput.py --model gpt2-124m --ranks 1 2 --offload --tag memory   # memory per ZeRO stage
    python benchmarks/throughput.py --compile both                     # torch.compile under the engine, side by side
    python benchmarks/throughput.py --quick --results-dir /tmp/b       # CI-sized smoke run

Every point (model, seq len, micro batch, checkpointing, ranks) runs the plain loop and each ZeRO variant on the same
model, data, batch and precision. plain: torch AdamW over trainer.param_groups, the trainer's cosine LR, clipping
1.0, fp32 or bf16 autocast. zeroN: preflight() -> init_distributed() -> build_engine() on ds_configs/zeroN.json,
then dsllm.trainer.train_step, the training loop's own step. Each variant runs in a fresh process (`--_worker`);
with N ranks the plain loop stays ONE process (all cores, or one GPU) with micro batch x N: the same global batch.
Writes YYYY-MM-DD-throughput-<hardware>[-TAG].{md,json,png} to --results-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dsllm.errors import ArgumentParser, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
MARK = "THROUGHPUT_RESULT "
NO_RUN_DIR = Path(tempfile.gettempdir()) / "dsllm-throughput-no-run-dir"  # TrainConfig.out: never written
TARGETS = {"zero0": 0.97, "zero1": 0.97, "zero2": 0.90}  # tokens/s as a share of the plain loop (the issue)
MEMORY_TARGET = {"zero2": 0.6}  # model-state memory per rank, N ranks over 1 rank (the issue)
QUICK_MODEL = {
    "n_layers": "2",
    "d_model": "64",
    "n_heads": "4",
    "n_kv_heads": "2",
    "max_seq_len": "64",
    "mlp_multiple_of": "32",
}  # tests/test_pretrain.py SMALL_MODEL
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
POINT_KEYS = ("model", "seq_len", "micro_batch_size", "checkpointing", "ranks")


def parse_args(argv):
    argv, overrides, rest = list(sys.argv[1:] if argv is None else argv), {}, []
    while argv:  # --model.FIELD VALUE / --model.FIELD=VALUE, as launch/pretrain.py takes them
        arg = argv.pop(0)
        if arg.startswith("--model."):
            key, eq, value = arg[len("--model.") :].partition("=")
            if not eq and not argv:
                raise UserError(f"{arg}: needs a value, e.g. {arg} VALUE")
            overrides[key] = value if eq else argv.pop(0)
        else:
            rest.append(arg)
    p = ArgumentParser(prog="throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: small model, seq 32, micro 4, 8 steps, 1 thread, ZeRO 0 and 2",
    )
    p.add_argument(
        "--model",
        nargs="+",
        default=["tiny"],
        help="presets or JSON files (default tiny); plus --model.FIELD VALUE for all of them",
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
        help="activation checkpointing of every block (torch.utils.checkpoint); both: sweep it",
    )
    p.add_argument(
        "--compile",
        choices=["off", "on", "both"],
        default="off",
        help="torch.compile the model (engine.compile() for ZeRO); both: each variant eager and compiled",
    )
    p.add_argument(
        "--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: fp32 on CPU, bf16 on GPU"
    )
    p.add_argument("--steps", type=int, help="timed steps (default 30, quick 8)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5, quick 2)")
    p.add_argument(
        "--stages", type=int, nargs="+", choices=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3; quick 0 2)"
    )
    p.add_argument("--offload", action="store_true", help="also zero2_offload and zero3_offload")
    p.add_argument("--no-plain", action="store_true", help="skip the plain loop (no ratios)")
    p.add_argument(
        "--ranks", type=int, nargs="+", default=[1], help="data-parallel ranks of the ZeRO variants (default 1)"
    )
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
    args = p.parse_args(rest)
    args.model_overrides = overrides or (dict(QUICK_MODEL) if args.quick and args.model == ["tiny"] else {})
    for name, value in DEFAULTS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "repeats", "warmup_steps", "threads"):
        least = 0 if name == "warmup_steps" else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {least} or more")
    for name in ("seq_len", "micro_batch_size", "ranks"):
        bad = [v for v in getattr(args, name) if v is not None and v < 1]
        if bad:
            raise UserError(f"--{name.replace('_', '-')} {bad[0]}: must be 1 or more")
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
    return {
        "off": names,
        "on": [n + "+compile" for n in names],
        "both": [x for n in names for x in (n, n + "+compile")],
    }[args.compile]


def train_config(args, point: dict, ds: str):
    from dsllm.train_config import TrainConfig

    overrides = {**args.model_overrides, **({"activation_checkpointing": "torch"} if point["checkpointing"] else {})}
    config = TrainConfig(
        ds_config=str(REPO / "ds_configs" / f"{ds}.json"),
        data=args.data,
        model=point["model"],
        model_overrides=overrides,
        out=str(NO_RUN_DIR),
        max_steps=args.warmup_steps + args.steps,
        seq_len=point["seq_len"],
        micro_batch_size=point["micro_batch_size"],
        precision=args.precision,
        resume="none",
        loader_workers=0 if args.device == "cpu" else 2,
    )  # CPU: no cores to spare
    config.check()
    return config


# -- child: one variant ---------------------------------------------------------------------------------
def current_gib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    rss = re.search(r"^VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(rss.group(1)) / 2**20 if rss else 0.0


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from dsllm.metrics import live_tensor_gib, memory_gib
    from dsllm.model import GPT
    from dsllm.trainer import (
        build_engine,
        cosine_schedule,
        init_distributed,
        make_loader,
        param_groups,
        preflight,
        train_step,
    )

    variant = args._worker
    base, compiled = variant.removesuffix("+compile"), variant.endswith("+compile")
    plain = base == "plain"
    point = {
        "model": args.model[0],
        "seq_len": args.seq_len[0],
        "micro_batch_size": args.micro_batch_size[0],
        "checkpointing": args.checkpointing == "on",
        "ranks": 1,
    }
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    config = train_config(args, point, "zero0" if plain else base)
    config.compile = compiled
    plan = preflight(config)
    if plain:
        device = torch.device(args.device)
        baseline, live_baseline = current_gib(), live_tensor_gib(device.type)
        torch.manual_seed(config.seed)
        model = GPT(plan.model).to(device).train()
        if compiled:
            model.compile()
        optimizer = torch.optim.AdamW(
            param_groups(model, config.weight_decay),
            lr=config.lr,
            eps=1e-8,
            betas=(config.beta1, config.beta2),
            fused=device.type == "cuda",
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config))
        optimizer_name = type(optimizer).__name__
        batches = iter(make_loader(plan, device))

        def step():  # no host sync: clip_grad_norm_ and AdamW stay on the device
            batch = next(batches).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
                loss = model(batch[:, :-1], batch[:, 1:])[1]  # not the logits: as train_step
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    else:
        device = init_distributed(plan)
        baseline, live_baseline = current_gib(), live_tensor_gib(device.type)
        engine = build_engine(plan, device)
        inner = getattr(engine.optimizer, "optimizer", None)
        optimizer_name = type(engine.optimizer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
        engine.train()
        batches = iter(make_loader(plan, device))

        def step():
            train_step(plan, engine, batches, device)

    compile_start = time.perf_counter()
    step()  # the first step compiles (and builds DeepSpeed's buffers): timed apart
    first_step = time.perf_counter() - compile_start
    for _ in range(args.warmup_steps - 1):
        step()
    if not plain:
        dist.barrier()
    times, cpu_times = [], []  # wall and this process's CPU time (all its threads) per step
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # model states at their peak: after backward (gradients alive, activations freed), before the optimizer step
    stepper = optimizer if plain else engine
    measured, original = [], stepper.step

    def measuring_step(*args, **kwargs):
        measured.append(live_tensor_gib(device.type))
        return original(*args, **kwargs)

    stepper.step = measuring_step
    step()
    stepper.step = original
    live = max(measured[-1], live_tensor_gib(device.type))  # and between steps
    ranks = [
        {
            "rank": plan.rank,
            "step_seconds": times,
            "step_cpu_seconds": cpu_times,
            "peak_memory_gib": memory_gib(),
            "baseline_memory_gib": baseline,
            "model_state_gib": live - live_baseline,
            "first_step_seconds": first_step,
        }
    ]
    if not plain:
        mine, ranks = ranks[0], [None] * plan.world_size
        dist.all_gather_object(ranks, mine)
    if plan.rank == 0:
        steps = [max(r["step_seconds"][i] for r in ranks) for i in range(args.steps)]  # ranks meet every step
        cpu = [sum(r["step_cpu_seconds"][i] for r in ranks) for i in range(args.steps)]  # all ranks' CPU time
        tokens = plan.batch.global_size * plan.seq_len
        for r in ranks:
            r["tokens_per_second"] = plan.batch.micro * plan.seq_len / statistics.median(r.pop("step_seconds"))
            r["cpu_seconds"] = sum(r.pop("step_cpu_seconds"))
        print(
            MARK
            + json.dumps(
                {
                    "variant": variant,
                    "ranks": plan.world_size,
                    "zero_stage": None if plain else plan.zero_stage,
                    "precision": plan.precision,
                    "optimizer": optimizer_name,
                    "threads": torch.get_num_threads(),
                    "micro_batch": plan.batch.micro,
                    "global_batch": plan.batch.global_size,
                    "seq_len": plan.seq_len,
                    "steps": args.steps,
                    "median_step_seconds": statistics.median(steps),
                    "seconds": sum(steps),
                    "tokens_per_second": tokens / statistics.median(steps),
                    "tokens_per_second_mean": tokens * len(steps) / sum(steps),
                    "tokens_per_cpu_second": tokens / statistics.median(cpu),
                    "per_rank": ranks,
                }
            ),
            flush=True,
        )
    if not plain:  # without this teardown 2-rank jobs sometimes abort at exit
        dist.barrier()
        engine.destroy()
        dist.barrier()
        dist.destroy_process_group()
    return 0


# -- parent: run the variants ---------------------------------------------------------------------------
def run_variant(args, point: dict, variant: str) -> dict:
    plain = variant.startswith("plain")
    ranks = 1 if plain else point["ranks"]
    micro = point["micro_batch_size"] * (point["ranks"] if plain else 1)  # plain: the same global batch
    worker_args = [
        str(Path(__file__).resolve()),
        "--_worker",
        variant,
        "--data",
        args.data,
        "--model",
        point["model"],
        *[x for k, v in args.model_overrides.items() for x in (f"--model.{k}", str(v))],
        "--micro-batch-size",
        str(micro),
        "--precision",
        args.precision,
        "--steps",
        str(args.steps),
        "--warmup-steps",
        str(args.warmup_steps),
        "--checkpointing",
        "on" if point["checkpointing"] else "off",
        *(["--seq-len", str(point["seq_len"])] if point["seq_len"] else []),
    ]
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions"),
    }
    if args.device == "cpu":  # ranks must not oversubscribe the cores; the plain loop gets all of them
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // ranks)))
    command = [sys.executable, *worker_args]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = (
            shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed") or "deepspeed"
        )
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *worker_args]
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


def ds_estimates(model_config, ranks: int) -> dict:
    """DeepSpeed's own model-state memory estimates, printed and exact (they assume 16-bit params)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.zero import stage3
        from deepspeed.runtime.zero import stage_1_and_2 as stage12
    from dsllm.model import GPT

    model, printed = GPT(model_config), io.StringIO()
    with contextlib.redirect_stdout(printed):  # these print a table and return nothing
        stage12.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks, num_nodes=1)
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=ranks, num_nodes=1)
    total, largest = stage3.model_to_params(model)

    def z2(gpus, offload):  # the bytes behind the printed rows
        host, device = stage12.estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=offload)
        return {"device_gib": device / 2**30, "host_gib": host / 2**30}

    def z3(offload):  # build_engine does not use zero.Init: the zero_init=0 rows
        host, device, _ = stage3.estimate_zero3_model_states_mem_needs(
            total, largest, ranks, 1, cpu_offload=offload, cpu_offload_params=offload, zero_init=False
        )
        return {"device_gib": device / 2**30, "host_gib": host / 2**30}

    return {
        "total_params": total,
        "largest_layer_params": largest,
        "printed": printed.getvalue(),
        "per_variant": {
            "zero0": z2(1, False),
            "zero1": z2(ranks, False),
            "zero2": z2(ranks, False),
            "zero2_offload": z2(ranks, True),
            "zero3": z3(False),
            "zero3_offload": z3(True),
        },
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


# -- report ---------------------------------------------------------------------------------------------
def point_label(point: dict) -> str:
    return (
        f"{point['model']} T{point['seq_len']} mb{point['micro_batch_size']}"
        f"{' ckpt' if point['checkpointing'] else ''} x{point['ranks']}"
    )


def summarize(
    trials: list[dict], point_list: list[dict], names: list[str], estimates: dict, shapes: dict, peak: float | None
) -> list[dict]:
    from dsllm.metrics import mfu

    rows = []
    for point in point_list:
        label, (_, flops, params) = point_label(point), shapes[point_label({**point, "ranks": 1})]
        mine = []
        for variant in names:
            runs = [t for t in trials if t["variant"] == variant and all(t[k] == point[k] for k in POINT_KEYS)]
            ok = [t for t in runs if "error" not in t]
            if not ok:
                mine.append({**point, "point": label, "variant": variant, "error": runs[0]["error"]})
                continue
            best = max(ok, key=lambda t: t["tokens_per_second"])
            estimate = estimates[(point["model"], point["ranks"])]["per_variant"].get(variant.removesuffix("+compile"))
            mine.append(
                {
                    **best,
                    **point,
                    "point": label,
                    "parameters": params,
                    "flops_per_token": flops,
                    "trials_tokens_per_second": [round(t["tokens_per_second"], 1) for t in ok],
                    "tokens_per_cpu_second": max(t["tokens_per_cpu_second"] for t in ok),
                    "tokens_per_second_per_rank": [r["tokens_per_second"] for r in best["per_rank"]],
                    "peak_memory_gib": max(r["peak_memory_gib"] for r in best["per_rank"]),
                    "memory_over_baseline_gib": max(
                        r["peak_memory_gib"] - r["baseline_memory_gib"] for r in best["per_rank"]
                    ),
                    "model_state_gib": max(r["model_state_gib"] for r in best["per_rank"]),
                    "first_step_seconds": max(r["first_step_seconds"] for r in best["per_rank"]),
                    "tflops": best["tokens_per_second"] * flops / 1e12,
                    "mfu": mfu(best["tokens_per_second"], flops, peak, best["world_size"]),
                    "ds_estimate": estimate,
                    "target": TARGETS.get(variant),
                }
            )
        reference = next(
            (r for r in mine if r["variant"] == "plain" and "error" not in r),
            next((r for r in mine if r["variant"] == "plain+compile" and "error" not in r), None),
        )
        for row in (r for r in mine if "error" not in r):
            row["ratio_to_plain"] = row["tokens_per_second"] / reference["tokens_per_second"] if reference else None
            row["cpu_time_ratio_to_plain"] = (
                row["tokens_per_cpu_second"] / reference["tokens_per_cpu_second"] if reference else None
            )
            row["meets_target"] = (
                None if row["target"] is None or reference is None else row["ratio_to_plain"] >= row["target"]
            )
        rows += mine
    return rows


def memory_scaling(rows: list[dict]) -> list[dict]:
    """Model-state memory per rank at N ranks over 1 rank, for every point and variant measured at both."""
    out = []
    for row in (r for r in rows if "error" not in r and r["ranks"] > 1 and not r["variant"].startswith("plain")):
        one = next(
            (
                r
                for r in rows
                if "error" not in r
                and r["ranks"] == 1
                and r["variant"] == row["variant"]
                and all(r[k] == row[k] for k in POINT_KEYS if k != "ranks")
            ),
            None,
        )
        if one is None:
            continue
        ratio = row["model_state_gib"] / one["model_state_gib"] if one["model_state_gib"] > 0 else None
        target = MEMORY_TARGET.get(row["variant"])
        out.append(
            {
                "point": point_label({**row, "ranks": 1}),
                "variant": row["variant"],
                "ranks": row["ranks"],
                "model_state_gib_1_rank": one["model_state_gib"],
                "model_state_gib_n_ranks": row["model_state_gib"],
                "ratio": ratio,
                "target": target,
                "meets_target": None if target is None or ratio is None else ratio <= target,
            }
        )
    return out


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| point | variant | ranks | tokens/s total | tokens/s per rank | x plain (target) | x plain, CPU time | "
        "TFLOP/s | MFU | peak mem/rank MiB | model states/rank MiB | DS estimate/rank MiB (device, host) | "
        "first step s | optimizer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['point']} | {r['variant']} | failed: {r['error'].splitlines()[0]} |" + " |" * 11)
            continue
        ratio = "n/a" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.3f}"
        if r["meets_target"] is not None:
            ratio += f" ({r['target']:.2f} {'ok' if r['meets_target'] else 'MISS'})"
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        est = (
            "-"
            if r["ds_estimate"] is None
            else "{:,.1f}, {:,.1f}".format(*(1024 * r["ds_estimate"][k] for k in ("device_gib", "host_gib")))
        )
        per_rank = " / ".join(f"{x:,.0f}" for x in r["tokens_per_second_per_rank"])
        cpu = "n/a" if r["cpu_time_ratio_to_plain"] is None else f"{r['cpu_time_ratio_to_plain']:.3f}"
        lines.append(
            f"| {r['point']} | {r['variant']} | {r['world_size']} | {r['tokens_per_second']:,.0f} | {per_rank} | "
            f"{ratio} | {cpu} | {r['tflops']:.3f} | {util} | {1024 * r['peak_memory_gib']:,.0f} | "
            f"{1024 * r['model_state_gib']:,.1f} | {est} | {r['first_step_seconds']:.1f} | {r['optimizer']} |"
        )
    return lines


def scaling_table(scaling: list[dict]) -> list[str]:
    lines = [
        "| point | variant | ranks | model states/rank, 1 rank MiB | N ranks MiB | ratio (target) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in scaling:
        ratio = "n/a" if m["ratio"] is None else f"{m['ratio']:.3f}"
        if m["meets_target"] is not None:
            ratio += f" (<= {m['target']:.2f} {'ok' if m['meets_target'] else 'MISS'})"
        lines.append(
            f"| {m['point']} | {m['variant']} | {m['ranks']} | {1024 * m['model_state_gib_1_rank']:,.2f} | "
            f"{1024 * m['model_state_gib_n_ranks']:,.2f} | {ratio} |"
        )
    return lines


def markdown(r: dict) -> str:
    s, hw = r["settings"], r["hardware"]
    overrides = "".join(f" --model.{k} {val}" for k, val in s["model_overrides"].items())
    loads = [t[k] for t in r["trials"] if "error" not in t for k in ("load_average_before", "load_average_after")]
    ok = [row for row in r["rows"] if "error" not in row]
    notes = [
        "point: model, T = tokens per sample, mb = micro batch per rank, "
        "ckpt = activation checkpointing of every block, "
        "xN = ranks of the ZeRO variants.",
        f"tokens/s: global tokens per step / median step time ({s['steps']} timed steps after "
        f"{s['warmup_steps']} warm-up; "
        f"a step lasts as long as its slowest rank); best of {s['repeats']} interleaved trial(s). "
        "The mean is in the JSON.",
        "x plain: over the plain PyTorch loop of the same point (torch AdamW, same param groups, cosine LR, "
        "clipping 1.0"
        + (", bf16 autocast" if s["precision"] == "bf16" else "")
        + f"); with N ranks it runs as ONE process "
        f"({'one GPU' if 'gpu' in hw else 'all cores'}) with micro batch x N, the same global batch.",
        "x plain, CPU time: global tokens per CPU-second of all the variant's processes (median step; best trial). "
        "Time a process waits descheduled while other work shares the machine is not counted, so this ratio is the "
        "steadier one on a busy machine; busy-waiting threads still count. CPU threads per process: "
        + ", ".join(sorted({f"{row['variant']} {row['threads']}" for row in ok}))
        + ".",
        f"1-min load average around the trials: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} on "
        f"{hw['cores']} cores (this run's own threads count too; more means other work shared the machine).",
        (
            "peak mem: torch.cuda.max_memory_allocated per rank."
            if "gpu" in hw
            else "peak mem: peak RSS of each process (Python, torch, DeepSpeed included)."
        )
        + " model states: bytes of the distinct tensor storages alive after backward, just before the optimizer "
        "step (a gc walk: activations are freed by then, gradients are not), minus those alive before the model "
        "was built: parameters, gradients, optimizer states and DeepSpeed's buffers and partitions.",
        "DS estimate: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs for the same parameter count; it assumes "
        "16-bit parameters with fp32 optimizer states (no ZeRO-0/1 estimator exists: ZeRO-0 shows the ZeRO-2 formula "
        "at 1 rank and ZeRO-1 the ZeRO-2 formula). MFU needs --peak-tflops or a known GPU.",
        "first step: seconds of the first step (torch.compile, DeepSpeed's lazy buffers), never counted in tokens/s.",
    ]
    lines = [
        f"# Training throughput and memory, {r['date'][:10]}, {hw['slug']}",
        "",
        f"- command: `{r['command']}`",
        f"- git revision: `{r['git_revision']}`",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in r["versions"].items()),
        f"- hardware: {hw['gpu'] + ' x' + str(hw['gpus']) if 'gpu' in hw else hw['cpu']}, {hw['cores']} CPU cores",
        "- models: "
        + "; ".join(f"`{m}{overrides}` {shape['parameters']:,} parameters" for m, shape in s["models"].items()),
        f"- {s['precision']}; data `{s['data']}`",
        "",
        *table(r["rows"]),
        "",
    ]
    if r["memory_scaling"]:
        lines += [
            "Model-state memory per rank as ranks grow (same point, same variant):",
            "",
            *scaling_table(r["memory_scaling"]),
            "",
        ]
    lines += [
        *[f"- {n}" for n in notes],
        "- trials, tokens/s: "
        + "; ".join(
            f"{row['point']} {row['variant']} {', '.join(f'{x:,.0f}' for x in row['trials_tokens_per_second'])}"
            for row in ok
        ),
    ]
    for (model, ranks), estimate in r["ds_estimates"].items():
        lines += [
            "",
            f"DeepSpeed's printed estimates for {model} (num_gpus_per_node={ranks}, num_nodes=1):",
            "",
            "```",
            estimate["printed"].rstrip(),
            "```",
        ]
    for row in (row for row in r["rows"] if "error" in row):
        lines += ["", f"{row['point']} {row['variant']} failed:", "", "```", row["error"], "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: no plot without matplotlib
    ok = [r for r in rows if "error" not in r]
    labels = list(dict.fromkeys(r["point"] for r in ok))
    names = list(dict.fromkeys(r["variant"] for r in ok))
    width = 0.8 / max(1, len(names))
    fig, (speed, memory) = plt.subplots(2, 1, figsize=(max(6.0, 1.0 + len(labels) * (0.5 + 0.35 * len(names))), 8))
    for i, name in enumerate(names):
        xs = [labels.index(r["point"]) + (i - (len(names) - 1) / 2) * width for r in ok if r["variant"] == name]
        mine = [r for r in ok if r["variant"] == name]
        bars = speed.bar(xs, [r["tokens_per_second"] for r in mine], width, label=name)
        speed.bar_label(bars, [f"{r['ratio_to_plain']:.2f}" if r["ratio_to_plain"] else "" for r in mine], fontsize=7)
        memory.bar(xs, [r["model_state_gib"] for r in mine], width, label=name)
        estimated = [
            (x, r["ds_estimate"]["device_gib"] + r["ds_estimate"]["host_gib"])
            for x, r in zip(xs, mine)
            if r["ds_estimate"]
        ]
        if estimated:
            memory.scatter(
                *zip(*estimated),
                marker="_",
                s=200,
                color="black",
                zorder=3,
                label="DeepSpeed estimate" if i == 0 else None,
            )
    for ax in (speed, memory):
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    speed.set(ylabel="tokens/s (all ranks)", title=f"{title}\nbar labels: x plain loop")
    memory.set(ylabel="model states per rank, GiB (bars: measured)")
    speed.legend(fontsize=7, ncols=min(4, len(names)))
    memory.legend(fontsize=7, ncols=min(4, len(names) + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker(args)
    import torch

    from dsllm import __version__
    from dsllm.metrics import peak_tflops
    from dsllm.model import flops_per_token
    from dsllm.trainer import preflight

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif max(args.ranks) > torch.cuda.device_count():
        raise UserError(f"--ranks {max(args.ranks)}: this machine has {torch.cuda.device_count()} GPU(s)")
    args.precision = args.precision if args.precision != "auto" else "bf16" if args.device == "cuda" else "fp32"
    started = datetime.datetime.now()
    if args.data is None:
        from dsllm.data.default_corpus import build_default_dataset

        size = {"max_bytes": 300_000, "vocab_size": 1000} if args.quick else {}
        args.data = str(build_default_dataset(**size, log=lambda m: print(m, file=sys.stderr)))
    point_list, names = points(args), variants(args)
    shapes, estimates, models = {}, {}, {}
    for point in point_list:  # every input check before any worker starts
        plan = preflight(train_config(args, point, "zero0"))
        point["seq_len"] = plan.seq_len
        shapes[point_label({**point, "ranks": 1})] = (
            plan.seq_len,
            flops_per_token(plan.model, plan.seq_len),
            plan.model.num_parameters(),
        )
        models[point["model"]] = {"parameters": plan.model.num_parameters(), "config": plan.model.to_dict()}
        if (point["model"], point["ranks"]) not in estimates:
            estimates[(point["model"], point["ranks"])] = ds_estimates(plan.model, point["ranks"])
    trials, total = [], args.repeats * len(point_list) * len(names)
    for trial in range(args.repeats):
        for point in point_list:
            for variant in names:
                print(
                    f"[{len(trials) + 1}/{total}] {point_label(point)} {variant} ...",
                    end=" ",
                    file=sys.stderr,
                    flush=True,
                )
                trials.append({**run_variant(args, point, variant), "trial": trial})
                print(
                    trials[-1].get("error") or f"{trials[-1]['tokens_per_second']:,.0f} tokens/s",
                    file=sys.stderr,
                    flush=True,
                )
    peak = args.peak_tflops or peak_tflops()
    import deepspeed

    settings = {
        k: getattr(args, k)
        for k in (
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
        )
    }
    rows = summarize(trials, point_list, names, estimates, shapes, peak)
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
        "settings": {**settings, "models": models, "peak_tflops": peak},
        "targets": {"tokens_per_second_ratio_to_plain": TARGETS, "model_state_ratio_n_over_1_rank": MEMORY_TARGET},
        "rows": rows,
        "memory_scaling": memory_scaling(rows),
        "trials": trials,
        "ds_estimates": {f"{m} x{n}": e for (m, n), e in estimates.items()},
    }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = (
        results_dir / f"{started:%Y-%m-%d}-throughput-{result['hardware']['slug']}{'-' + args.tag if args.tag else ''}"
    )
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown({**result, "ds_estimates": estimates}))
    plot(rows, stem.with_suffix(".png"), f"{args.precision}, {result['hardware']['slug']}")
    print("\n".join(table(rows)))
    if result["memory_scaling"]:
        print("\n".join(scaling_table(result["memory_scaling"])))
    print(f"wrote {stem}.md, .json" + (" and .png" if stem.with_suffix(".png").exists() else ""), file=sys.stderr)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
