#!/usr/bin/env python
"""Training throughput of our trainer's DeepSpeed engine (ZeRO 0-3) against a plain PyTorch loop, in one run.

    python benchmarks/throughput.py                               # tiny preset, fp32 on CPU, 1 rank
    python benchmarks/throughput.py --ranks 2                     # ZeRO on 2 ranks (deepspeed launcher)
    python benchmarks/throughput.py --quick --results-dir /tmp/b  # CI-sized smoke run (ZeRO 0 and 2)

Same model, data, batch and precision everywhere. plain: torch AdamW over trainer.param_groups, the trainer's
cosine LR, clipping 1.0, fp32 or bf16 autocast. zeroN: preflight() -> init_distributed() -> build_engine() on
ds_configs/zeroN.json and the trainer's step. Each variant runs in a fresh process (`--_worker VARIANT`). With
--ranks N the plain loop stays ONE process (all cores, or one GPU) with micro batch x N: the same global batch.
Writes YYYY-MM-DD-throughput-<hardware>.{md,json} (and .png when matplotlib is installed) to --results-dir.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
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
QUICK_MODEL = {"n_layers": "2", "d_model": "64", "n_heads": "4", "n_kv_heads": "2", "max_seq_len": "64",
               "mlp_multiple_of": "32"}  # tests/test_pretrain.py SMALL_MODEL
PRESETS = {  # full / --quick defaults of the options left unset
    "full": {"seq_len": None, "micro_batch_size": 8, "steps": 30, "warmup_steps": 5, "stages": [0, 1, 2, 3], "repeats": 2,
             "threads": None},
    "quick": {"seq_len": 32, "micro_batch_size": 4, "steps": 8, "warmup_steps": 2, "stages": [0, 2], "repeats": 1,
              "threads": 1},  # a 5 ms step on 2 threads is mostly OpenMP hand-offs
}


def parse_args(argv):
    argv, overrides, rest = list(sys.argv[1:] if argv is None else argv), {}, []
    while argv:  # --model.FIELD VALUE / --model.FIELD=VALUE, as launch/pretrain.py takes them
        arg = argv.pop(0)
        if arg.startswith("--model."):
            key, eq, value = arg[len("--model."):].partition("=")
            if not eq and not argv:
                raise UserError(f"{arg}: needs a value, e.g. {arg} VALUE")
            overrides[key] = value if eq else argv.pop(0)
        else:
            rest.append(arg)
    p = ArgumentParser(prog="throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: small model, seq 32, micro 4, 8 steps, 1 thread, "
                   "ZeRO 0 and 2")
    p.add_argument("--model", default="tiny", help="preset or JSON (default %(default)s); plus --model.FIELD VALUE")
    p.add_argument("--data", help="prepared dataset folder (default: the embedded default corpus)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (default: the model's max_seq_len; quick 32)")
    p.add_argument("--micro-batch-size", type=int, help="per rank (default 8, quick 4)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: fp32 on CPU, bf16 on GPU")
    p.add_argument("--steps", type=int, help="timed steps (default 30, quick 8)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first (default 5, quick 2)")
    p.add_argument("--stages", type=int, nargs="+", choices=[0, 1, 2, 3], help="ZeRO stages (default 0 1 2 3; quick 0 2)")
    p.add_argument("--offload", action="store_true", help="also zero2_offload and zero3_offload")
    p.add_argument("--ranks", type=int, default=1, help="data-parallel ranks of the ZeRO variants (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: cores / ranks, plain all cores; quick 1)")
    p.add_argument("--repeats", type=int, help="trials of every variant, interleaved; the best counts (default 2, quick 1)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: the GPU table; none on CPU)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"), help="where the .md/.json go")
    p.add_argument("--_worker", help=argparse.SUPPRESS)  # child mode: run one variant, print one JSON line
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher appends it
    args = p.parse_args(rest)
    args.model_overrides = overrides or (dict(QUICK_MODEL) if args.quick and args.model == "tiny" else {})
    for name, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("seq_len", "micro_batch_size", "steps", "ranks", "repeats", "warmup_steps", "threads"):
        least = 0 if name == "warmup_steps" else 1
        if getattr(args, name) is not None and getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {least} or more")
    return args


def train_config(args, ds: str):
    from dsllm.train_config import TrainConfig

    config = TrainConfig(ds_config=str(REPO / "ds_configs" / f"{ds}.json"), data=args.data, model=args.model,
                         model_overrides=args.model_overrides, out=str(NO_RUN_DIR), max_steps=args.warmup_steps + args.steps,
                         seq_len=args.seq_len, micro_batch_size=args.micro_batch_size, precision=args.precision,
                         resume="none", loader_workers=0)
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

    from dsllm.data.loader import ResumableLoader, TokenWindows
    from dsllm.metrics import memory_gib
    from dsllm.model import GPT
    from dsllm.trainer import build_engine, cosine_schedule, init_distributed, param_groups, preflight

    variant, plain = args._worker, args._worker == "plain"
    plan = preflight(config := train_config(args, "zero0" if plain else variant))
    batches = iter(ResumableLoader(TokenWindows(plan.train, plan.seq_len), plan.batch.micro, config.seed, plan.rank,
                                   plan.world_size))
    if plain:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        baseline = current_gib()
        torch.manual_seed(config.seed)
        model = GPT(plan.model).to(device).train()
        optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, eps=1e-8,
                                      betas=(config.beta1, config.beta2), fused=device.type == "cuda")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(config))
        optimizer_name = type(optimizer).__name__

        def step():
            batch = next(batches).to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
                _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return bool(torch.isfinite(loss.detach()).item())  # the trainer reads a finite flag every step too
    else:
        device = init_distributed(plan)
        baseline = current_gib()
        engine = build_engine(plan, device)
        inner = getattr(engine.optimizer, "optimizer", None)
        optimizer_name = type(engine.optimizer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
        engine.train()

        def step():  # dsllm.trainer.train()'s step at gradient accumulation 1
            batch = next(batches).to(device, non_blocking=True)
            _, loss = engine(batch[:, :-1], batch[:, 1:])
            engine.backward(loss)
            finite = torch.isfinite(loss.detach().float()).to(torch.float32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = bool(finite.item())
            engine.step()
            return finite

    for _ in range(args.warmup_steps):
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
    ranks = [{"rank": plan.rank, "step_seconds": times, "step_cpu_seconds": cpu_times, "peak_memory_gib": memory_gib(),
              "baseline_memory_gib": baseline}]
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
        print(MARK + json.dumps({
            "variant": variant, "ranks": plan.world_size, "zero_stage": None if plain else plan.zero_stage,
            "precision": plan.precision, "optimizer": optimizer_name, "threads": torch.get_num_threads(),
            "micro_batch": plan.batch.micro, "global_batch": plan.batch.global_size, "seq_len": plan.seq_len,
            "steps": args.steps, "median_step_seconds": statistics.median(steps), "seconds": sum(steps),
            "tokens_per_second": tokens / statistics.median(steps), "tokens_per_second_mean": tokens * len(steps) / sum(steps),
            "tokens_per_cpu_second": tokens / statistics.median(cpu), "per_rank": ranks}), flush=True)
    if not plain:  # without this teardown 2-rank jobs sometimes abort at exit
        dist.barrier()
        engine.destroy()
        dist.barrier()
        dist.destroy_process_group()
    return 0


# -- parent: run the variants ---------------------------------------------------------------------------
def run_variant(args, variant: str, on_gpu: bool) -> dict:
    ranks = 1 if variant == "plain" else args.ranks
    micro = args.micro_batch_size * (args.ranks if variant == "plain" else 1)  # plain: the same global batch
    worker_args = [str(Path(__file__).resolve()), "--_worker", variant, "--data", args.data, "--model", args.model,
                   *[x for k, v in args.model_overrides.items() for x in (f"--model.{k}", str(v))],
                   "--micro-batch-size", str(micro), "--precision", args.precision, "--steps", str(args.steps),
                   "--warmup-steps", str(args.warmup_steps), *(["--seq-len", str(args.seq_len)] if args.seq_len else [])]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(REPO / ".cache" / "torch_extensions")}
    if not on_gpu:  # ranks must not oversubscribe the cores; the plain loop gets all of them
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(args.threads or max(1, (os.cpu_count() or 1) // ranks)))
    command = [sys.executable, *worker_args]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed") or "deepspeed"
        command = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), *worker_args]
    load = os.getloadavg()[0]  # a shared machine's other work shows here: kept with every trial
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    found = [line.split(MARK, 1)[1] for line in done.stdout.splitlines() if MARK in line]
    if done.returncode or not found:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        return {"variant": variant, "ranks": ranks, "error": f"exit {done.returncode}\n{tail}"}
    return {**json.loads(found[-1]), "load_average_before": load, "load_average_after": os.getloadavg()[0]}


def ds_estimates(model_config, ranks: int) -> dict:
    """DeepSpeed's own model-state memory estimates, printed and exact (they assume 16-bit params)."""
    with contextlib.redirect_stdout(io.StringIO()):
        from deepspeed.runtime.zero import stage3, stage_1_and_2 as stage12
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
        host, device, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, ranks, 1, cpu_offload=offload,
                                                                        cpu_offload_params=offload, zero_init=False)
        return {"device_gib": device / 2**30, "host_gib": host / 2**30}
    return {"total_params": total, "largest_layer_params": largest, "printed": printed.getvalue(),
            "per_variant": {"zero0": z2(1, False), "zero1": z2(ranks, False), "zero2": z2(ranks, False),
                            "zero2_offload": z2(ranks, True), "zero3": z3(False), "zero3_offload": z3(True)}}


def git_revision() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    try:  # results files do not make the tree dirty
        return git("rev-parse", "HEAD") + ("-dirty" if git("status", "--porcelain", "--", ".", ":!benchmarks/results") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    info = {"cpu": cpu.group(1).strip() if cpu else platform.processor() or "unknown", "cores": os.cpu_count()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        info["slug"] = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().replace("nvidia", "")).strip("-") + f"-x{info['gpus']}"
    else:
        name = re.sub(r"\((r|tm)\)|@.*|\b(cpu|processor)\b", " ", info["cpu"].lower())
        info["slug"] = f"{re.sub(r'[^a-z0-9]+', '-', name).strip('-') or 'unknown-cpu'}-{info['cores']}c"
    return info


# -- report ---------------------------------------------------------------------------------------------
def summarize(trials: list[dict], variants: list[str], estimates: dict, flops: float, peak: float | None) -> list[dict]:
    from dsllm.metrics import mfu

    rows = []
    for variant in variants:
        ok = [t for t in trials if t["variant"] == variant and "error" not in t]
        if not ok:
            rows.append({"variant": variant, "error": next(t["error"] for t in trials if t["variant"] == variant)})
            continue
        best = max(ok, key=lambda t: t["tokens_per_second"])
        rows.append({**best, "trials_tokens_per_second": [round(t["tokens_per_second"], 1) for t in ok],
                     "tokens_per_cpu_second": max(t["tokens_per_cpu_second"] for t in ok),
                     "tokens_per_second_per_rank": [r["tokens_per_second"] for r in best["per_rank"]],
                     "peak_memory_gib": max(r["peak_memory_gib"] for r in best["per_rank"]),
                     "memory_over_baseline_gib": max(r["peak_memory_gib"] - r["baseline_memory_gib"] for r in best["per_rank"]),
                     "tflops": best["tokens_per_second"] * flops / 1e12, "mfu": mfu(best["tokens_per_second"], flops, peak, best["ranks"]),
                     "ds_estimate": estimates["per_variant"].get(variant), "target": TARGETS.get(variant)})
    plain = next((r for r in rows if r["variant"] == "plain" and "error" not in r), None)
    for row in (r for r in rows if "error" not in r):
        row["ratio_to_plain"] = row["tokens_per_second"] / plain["tokens_per_second"] if plain else None
        row["cpu_time_ratio_to_plain"] = row["tokens_per_cpu_second"] / plain["tokens_per_cpu_second"] if plain else None
        row["meets_target"] = None if row["target"] is None or plain is None else row["ratio_to_plain"] >= row["target"]
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| variant | ranks | tokens/s total | tokens/s per rank | x plain (target) | x plain, CPU time | TFLOP/s | MFU | "
             "peak mem/rank GiB | over baseline GiB | DS estimate/rank GiB (device, host) | optimizer |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'].splitlines()[0]} |" + " |" * 10)
            continue
        ratio = "n/a" if r["ratio_to_plain"] is None else f"{r['ratio_to_plain']:.3f}"
        if r["meets_target"] is not None:
            ratio += f" ({r['target']:.2f} {'ok' if r['meets_target'] else 'MISS'})"
        util = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        est = "-" if r["ds_estimate"] is None else "{device_gib:.3f}, {host_gib:.3f}".format(**r["ds_estimate"])
        per_rank = " / ".join(f"{x:,.0f}" for x in r["tokens_per_second_per_rank"])
        cpu = "n/a" if r["cpu_time_ratio_to_plain"] is None else f"{r['cpu_time_ratio_to_plain']:.3f}"
        lines.append(f"| {r['variant']} | {r['ranks']} | {r['tokens_per_second']:,.0f} | {per_rank} | {ratio} | {cpu} | "
                     f"{r['tflops']:.3f} | {util} | {r['peak_memory_gib']:.3f} | {r['memory_over_baseline_gib']:.3f} | "
                     f"{est} | {r['optimizer']} |")
    return lines


def markdown(r: dict) -> str:
    s, hw = r["settings"], r["hardware"]
    overrides = "".join(f" --model.{k} {val}" for k, val in s["model_overrides"].items())
    loads = [t[k] for t in r["trials"] if "error" not in t for k in ("load_average_before", "load_average_after")]
    notes = [
        f"tokens/s: global tokens per step / median step time ({s['steps']} timed steps after {s['warmup_steps']} warm-up; "
        f"a step lasts as long as its slowest rank); best of {s['repeats']} interleaved trial(s). The mean is in the JSON.",
        "x plain: over the plain PyTorch loop (torch AdamW, same param groups, cosine LR, clipping 1.0"
        + (", bf16 autocast" if s["precision"] == "bf16" else "") + ")" + (
            f"; with {s['ranks']} ranks it runs as ONE process ({'one GPU' if 'gpu' in hw else 'all cores'}) with micro "
            f"batch {s['micro_batch_size'] * s['ranks']}, the same global batch."
            if s["ranks"] > 1 else "."),
        "x plain, CPU time: global tokens per CPU-second of all the variant's processes (median step; best trial). "
        "Time a process waits descheduled while other work shares the machine is not counted, so this ratio is the "
        "steadier one on a busy machine; busy-waiting threads still count (compare at --threads 1). CPU threads per "
        "process: " + ", ".join(f"{row['variant']} {row['threads']}" for row in r["rows"] if "error" not in row) + ".",
        f"1-min load average around the trials: {min(loads, default=0):.1f} to {max(loads, default=0):.1f} on "
        f"{hw['cores']} cores (this run's own threads count too; more means other work shared the machine).",
        "Memory: torch.cuda.max_memory_allocated per rank." if "gpu" in hw else "Memory: peak RSS of each process "
        "(Python, torch, DeepSpeed included); over baseline: minus the RSS just before the model was built.",
        "DS estimate: model states only, assuming 16-bit params; no ZeRO-0/1 estimator exists, so ZeRO-0 shows the "
        "ZeRO-2 formula at 1 rank and ZeRO-1 the ZeRO-2 formula. MFU needs --peak-tflops or a known GPU."]
    lines = [f"# Training throughput, {r['date'][:10]}, {hw['slug']}", "",
             f"- command: `{r['command']}`", f"- git revision: `{r['git_revision']}`",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in r["versions"].items()),
             f"- hardware: {hw['gpu'] + ' x' + str(hw['gpus']) if 'gpu' in hw else hw['cpu']}, {hw['cores']} CPU cores",
             f"- model: `{s['model']}{overrides}`, {s['parameters']:,} parameters, {s['flops_per_token'] / 1e6:.1f} MFLOP/token",
             f"- batch: seq_len {s['seq_len']} x micro batch {s['micro_batch_size']} per rank x {s['ranks']} rank(s); "
             f"{s['precision']}; data `{s['data']}`", "", *table(r["rows"]), "", *[f"- {n}" for n in notes],
             "- trials, tokens/s: " + "; ".join(f"{row['variant']} {', '.join(f'{x:,.0f}' for x in row['trials_tokens_per_second'])}"
                                               for row in r["rows"] if "error" not in row), "",
             f"DeepSpeed's printed estimates (num_gpus_per_node={s['ranks']}, num_nodes=1):", "", "```",
             r["ds_estimates"]["printed"].rstrip(), "```"]
    for row in (row for row in r["rows"] if "error" in row):
        lines += ["", f"{row['variant']} failed:", "", "```", row["error"], "```"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # optional: no plot without matplotlib
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(1.4 * len(ok) + 2, 4))
    bars = ax.bar([r["variant"] for r in ok], [r["tokens_per_second"] for r in ok])
    ax.bar_label(bars, [f"{r['ratio_to_plain']:.2f}x" if r["ratio_to_plain"] else "" for r in ok])
    ax.set(ylabel="tokens/s (total)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif args.ranks > torch.cuda.device_count():
        raise UserError(f"--ranks {args.ranks}: this machine has {torch.cuda.device_count()} GPU(s)")
    args.precision = args.precision if args.precision != "auto" else "bf16" if on_gpu else "fp32"
    started = datetime.datetime.now()
    if args.data is None:
        from dsllm.data.default_corpus import build_default_dataset

        size = {"max_bytes": 300_000, "vocab_size": 1000} if args.quick else {}
        args.data = str(build_default_dataset(**size, log=lambda m: print(m, file=sys.stderr)))
    plan = preflight(train_config(args, "zero0"))  # every input check before any worker starts
    estimates = ds_estimates(plan.model, args.ranks)
    variants = ["plain", *(f"zero{s}" for s in sorted(set(args.stages))), *(["zero2_offload", "zero3_offload"] if args.offload else [])]
    trials = []
    for trial in range(args.repeats):
        for variant in variants:
            print(f"[{trial + 1}/{args.repeats}] {variant} ...", end=" ", file=sys.stderr, flush=True)
            trials.append({**run_variant(args, variant, on_gpu), "trial": trial})
            print(trials[-1].get("error") or f"{trials[-1]['tokens_per_second']:,.0f} tokens/s", file=sys.stderr, flush=True)
    flops, peak = flops_per_token(plan.model, plan.seq_len), args.peak_tflops or peak_tflops()
    import deepspeed

    settings = {k: getattr(args, k) for k in ("model", "model_overrides", "micro_batch_size", "ranks", "precision", "steps",
                                              "warmup_steps", "repeats", "data", "quick")}
    result = {"benchmark": "throughput", "date": started.isoformat(timespec="seconds"), "command": shlex.join(sys.orig_argv),
              "git_revision": git_revision(), "hardware": hardware(),
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "deepspeed": deepspeed.__version__, "dsllm": __version__},
              "settings": {**settings, "seq_len": plan.seq_len, "parameters": plan.model.num_parameters(),
                           "flops_per_token": flops, "peak_tflops": peak},
              "targets": TARGETS, "rows": summarize(trials, variants, estimates, flops, peak), "trials": trials,
              "ds_estimates": estimates}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"{started:%Y-%m-%d}-throughput-{result['hardware']['slug']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    plot(result["rows"], stem.with_suffix(".png"), f"{args.model}, {args.precision}, {args.ranks} rank(s), {result['hardware']['slug']}")
    print("\n".join(table(result["rows"])))
    print(f"wrote {stem}.md and .json", file=sys.stderr)
    return 1 if any("error" in row for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
