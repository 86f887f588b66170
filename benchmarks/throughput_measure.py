"""The measuring side of benchmarks/throughput.py: one variant, in a process of its own (`--_worker VARIANT`).

plain: one process, torch AdamW over `dsllm.optimizer.param_groups` with `engine_options` (the engine's own learning
rate, betas, weight decay and cosine schedule), clipping, fp32 or bf16 autocast, `window_loss`. zeroN:
`preflight` -> `init_distributed` -> `build_engine` on ds_configs/zeroN.json, then `Engine.train_batch`, the step
the training loop takes. Both time their steps the same way and measure model-state memory at its peak. Rank 0
prints one line: MARK and the JSON the sweep reads.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from dsllm.pretrain import Pretraining

REPO = Path(__file__).resolve().parents[1]
MARK = "THROUGHPUT_RESULT "  # the worker's result line on stdout starts with this
NO_RUN_DIR = Path(tempfile.gettempdir()) / "dsllm-throughput-no-run-dir"  # TrainConfig.out: never written


PARALLEL = {"pp": "stages", "tp": "tensor", "sp": "sequence", "ep": "experts"}  # variant prefix: its layout


def layout(variant: str) -> dict[str, int]:
    """A variant's parallel layout as `train_config`'s keywords: ppN (N pipeline stages), tpN (N tensor-parallel
    ranks), spN (N sequence-parallel ranks; each x the point's ranks as replicas) or epN (the experts split over N of
    the point's data-parallel ranks), all on ZeRO-1; 1 for every other variant. E.g. "sp2" -> sequence 2."""
    base = variant.removesuffix("+compile")
    return {name: int(base[2:]) if base.startswith(prefix) else 1 for prefix, name in PARALLEL.items()}


def processes(variant: str, ranks: int) -> int:
    """The processes a variant of a point with `ranks` data-parallel ranks runs: one for the plain loop; the ranks
    times the pipeline stages, tensor- and sequence-parallel ranks (expert parallelism adds none: it splits the
    experts over the data-parallel ranks)."""
    if variant.startswith("plain"):
        return 1
    sizes = layout(variant)
    return ranks * sizes["stages"] * sizes["tensor"] * sizes["sequence"]


def ds_config_name(variant: str) -> str:
    """The ds_configs/ file a variant runs on: ZeRO-1 for the parallel layouts, zero0's spec for the plain loop (it
    builds no engine), else the variant's own."""
    base = variant.removesuffix("+compile")
    return "zero0" if base == "plain" else "zero1" if base[:2] in PARALLEL else base


def timed_collectives(variant: str) -> bool:
    """Whether the worker turns DeepSpeed's comms logger on: tensor-, sequence- and expert-parallel variants, whose
    own collectives (AutoTP's all-reduces, Ulysses' and MoE's all-to-alls) are part of their step."""
    sizes = layout(variant)
    return sizes["tensor"] * sizes["sequence"] * sizes["experts"] > 1


def train_config(
    args,
    point: dict,
    ds: str,
    device_type: str,
    compiled: bool = False,
    stages: int = 1,
    tensor: int = 1,
    sequence: int = 1,
    experts: int = 1,
):
    """The pretraining options one variant of one point runs with (ds: a ds_configs/ name; `stages` > 1: a
    pipeline over --micro-batches micro batches per step; `tensor` > 1: AutoTP over that many ranks; `sequence` > 1:
    Ulysses over that many ranks; `experts` > 1: the experts split over that many data-parallel ranks)."""
    from dsllm.train_config import TrainConfig

    overrides = {**args.model_overrides, **({"activation_checkpointing": "torch"} if point["checkpointing"] else {})}
    return TrainConfig(
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
        loader_workers=0 if device_type == "cpu" else 2,  # CPU: no cores to spare
        compile=compiled,
        pipeline_parallel=stages,
        tensor_parallel=tensor,
        sequence_parallel=sequence,
        expert_parallel=experts,
        pipeline_partition=args.pipeline_partition,
        grad_accum=args.micro_batches if stages > 1 else None,
    )


def current_gib() -> float:
    """Memory in use now: allocated GPU memory, or this process's resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**30
    rss = re.search(r"^VmRSS:\s*(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(rss.group(1)) / 2**20 if rss else 0.0


@dataclasses.dataclass
class Loop:
    """A variant's training step, ready to time."""

    step: Callable[[], None]  # one optimizer step
    stepper: object  # whose .step() is the optimizer step inside `step` (watched for model-state memory)
    optimizer: str  # the optimizer's class name (DeepSpeed's wrapper, and what it wraps)
    teardown: Callable[[], None] = lambda: None


def plain_loop(plan: Pretraining, device: torch.device) -> Loop:
    """The plain PyTorch loop, one process."""
    import torch

    from dsllm.engine import engine_options, window_loss
    from dsllm.model import GPT
    from dsllm.optimizer import param_groups
    from dsllm.pretrain import make_loader

    config, spec = plan.config, plan.spec
    options = engine_options(config)  # what build_engine gives DeepSpeed, for a like-for-like loop
    torch.manual_seed(config.seed)
    model = GPT(spec.model).to(device).train()
    if options["compile"]:
        model.compile()
    optimizer = torch.optim.AdamW(
        param_groups(model, options["weight_decay"]),
        lr=options["lr"],
        betas=options["betas"],
        fused=device.type == "cuda",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, options["schedule"])
    batches = iter(make_loader(plan, device))

    def step():  # no host sync: clip_grad_norm_ and AdamW stay on the device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.precision == "bf16"):
            loss = window_loss(model, next(batches), device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return Loop(step, optimizer, type(optimizer).__name__)


def engine_loop(plan: Pretraining, device: torch.device) -> Loop:
    """The training engine on this rank: the step is Engine.train_batch."""
    import torch

    from dsllm.engine import build_engine, engine_options, new_model, window_loss
    from dsllm.pretrain import make_loader

    torch.manual_seed(plan.config.seed)
    model = new_model(plan.spec)
    engine = build_engine(plan.spec, model, device, window_loss, **engine_options(plan.config))
    inner = getattr(engine.ds.optimizer, "optimizer", None)
    optimizer_name = type(engine.ds.optimizer).__name__ + (f"({type(inner).__name__})" if inner is not None else "")
    engine.ds.train()
    batches = iter(make_loader(plan, device))

    def step():
        engine.train_batch(batches)

    return Loop(step, engine.ds, optimizer_name, engine.teardown)  # teardown: else 2-rank jobs may abort at exit


def time_steps(
    step, steps: int, warmup_steps: int, device, barrier, at_timed_start=lambda: None
) -> tuple[float, list[float], list[float]]:
    """(seconds of the first step, wall seconds per timed step, this process's CPU seconds per timed step);
    `at_timed_start()` runs once the warm-up is over."""
    import torch

    start = time.perf_counter()
    step()  # the first step compiles (and builds DeepSpeed's buffers): timed apart
    first_step = time.perf_counter() - start
    for _ in range(warmup_steps - 1):
        step()
    barrier()
    at_timed_start()
    times, cpu_times = [], []  # wall and this process's CPU time (all its threads)
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return first_step, times, cpu_times


def model_state_gib(loop: Loop, device: torch.device) -> float:
    """Live tensor GiB at the peak of model states: after backward (gradients alive, activations freed), just
    before the optimizer step, or between steps if that is more. One more step, with `stepper.step` watched."""
    from dsllm.metrics import live_tensor_gib

    measured, original = [], loop.stepper.step

    def measuring_step(*args, **kwargs):
        measured.append(live_tensor_gib(device.type))
        return original(*args, **kwargs)

    loop.stepper.step = measuring_step
    try:
        loop.step()
    finally:
        loop.stepper.step = original
    # (a PipelineEngine steps its optimizer inside train_batch, never through the watched .step)
    return max(measured[-1] if measured else 0.0, live_tensor_gib(device.type))


def comm_milliseconds() -> dict[str, float]:
    """Milliseconds this process spent in DeepSpeed's collectives so far, by op (all_reduce, all_to_all_single, ...),
    by its comms logger. The logger records, per op and message size, its op's timer read without a reset: a running
    total, whose largest value is the op's time so far."""
    from deepspeed.comm import comm

    records = comm.comms_logger.comms_dict  # {op: {message bytes: [count, [running ms, ...], ...]}}
    return {op: max(ms for entry in sizes.values() for ms in entry[1]) for op, sizes in records.items()}


def worker(args) -> int:
    """Run one variant (args._worker) of the single point in `args`; rank 0 prints MARK + its JSON."""
    import torch
    import torch.distributed as dist

    from dsllm.engine import init_distributed
    from dsllm.metrics import live_tensor_gib, memory_gib
    from dsllm.pretrain import preflight

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
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    sizes, timed = layout(variant), timed_collectives(variant)
    plan = preflight(train_config(args, point, ds_config_name(variant), device_type, compiled, **sizes))
    spec = plan.spec
    if timed:  # DeepSpeed's comms logger times every collective (blocking each, which on CPU they are)
        spec.ds["comms_logger"] = {"enabled": True, "prof_all": True, "verbose": False}
    if plain:
        device = torch.device(device_type)
        baseline, live_baseline = current_gib(), live_tensor_gib(device.type)
        loop = plain_loop(plan, device)
    else:
        device = init_distributed(spec.world, plan.config.collective_timeout)
        baseline, live_baseline = current_gib(), live_tensor_gib(device.type)
        loop = engine_loop(plan, device)
    before = []  # the collectives' time when the timed steps start (not start-up's nor the first step's checks)
    first_step, times, cpu_times = time_steps(
        loop.step,
        args.steps,
        args.warmup_steps,
        device,
        barrier=(lambda: None) if plain else dist.barrier,
        at_timed_start=lambda: before.append(comm_milliseconds()) if timed else None,
    )
    # this rank's time inside collectives per timed step, by op (all of DeepSpeed's: with one replica, TP's or SP's
    # own and ZeRO's; torch.distributed's own calls, such as the sequence group's loss all-reduce, are not logged)
    comm_ops = (
        {
            op: (ms - before[0].get(op, 0.0)) / 1000 / args.steps
            for op, ms in comm_milliseconds().items()
            if ms > before[0].get(op, 0.0)  # (ops of the start-up only: none)
        }
        if timed
        else None
    )
    live = model_state_gib(loop, device)
    ranks = [
        {
            "rank": spec.world.rank,
            "step_seconds": times,
            "step_cpu_seconds": cpu_times,
            "peak_memory_gib": memory_gib(),
            "baseline_memory_gib": baseline,
            "model_state_gib": live - live_baseline,
            "first_step_seconds": first_step,
            "comm_seconds_per_step": sum(comm_ops.values()) if timed else None,
            "comm_op_seconds_per_step": comm_ops,
        }
    ]
    if not plain:
        mine, ranks = ranks[0], [None] * spec.world.size
        dist.all_gather_object(ranks, mine)
    if spec.world.is_main:
        result = summary(variant, plan, ranks, args.steps, loop.optimizer, torch.get_num_threads(), plain)
        print(MARK + json.dumps(result), flush=True)
    loop.teardown()
    return 0


def summary(
    variant: str, plan: Pretraining, ranks: list[dict], steps: int, optimizer: str, threads: int, plain: bool
) -> dict:
    """The worker's result: the job's step times (a step lasts as long as its slowest rank) and each rank's."""
    spec = plan.spec
    step_seconds = [max(r["step_seconds"][i] for r in ranks) for i in range(steps)]  # ranks meet every step
    cpu = [sum(r["step_cpu_seconds"][i] for r in ranks) for i in range(steps)]  # all ranks' CPU time
    tokens = spec.tokens_per_step
    for r in ranks:
        r["tokens_per_second"] = (  # this rank's (its replica's, on a pipeline stage) tokens of a step
            spec.batch.micro * spec.batch.accumulation * spec.seq_len / statistics.median(r.pop("step_seconds"))
        )
        r["cpu_seconds"] = sum(r.pop("step_cpu_seconds"))
    return {
        "variant": variant,
        "ranks": spec.world.size,
        "zero_stage": None if plain else spec.zero_stage,
        "precision": spec.precision,
        "optimizer": optimizer,
        "threads": threads,
        "micro_batch": spec.batch.micro,
        "micro_batches": spec.batch.accumulation,
        "pipeline_stages": spec.pipeline_stages,
        "tensor_parallel": spec.tensor_parallel,
        "sequence_parallel": spec.sequence_parallel,
        "expert_parallel": spec.expert_parallel,
        "global_batch": spec.batch.global_size,
        "seq_len": spec.seq_len,
        "steps": steps,
        "median_step_seconds": statistics.median(step_seconds),
        "seconds": sum(step_seconds),
        "tokens_per_second": tokens / statistics.median(step_seconds),
        "tokens_per_second_mean": tokens * len(step_seconds) / sum(step_seconds),
        "tokens_per_cpu_second": tokens / statistics.median(cpu),
        "per_rank": ranks,
    }
