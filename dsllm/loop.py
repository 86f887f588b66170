"""The one training loop, for pretraining and fine-tuning alike.

Each step: one `Engine.train_batch`, then every component decides for itself whether this step is its
turn: the non-finite guard, the log (`StepLog.should_log`), the evaluation (`validator.should_validate`),
the checkpoint (`checkpointer.should_save`), and the stop (a signal every rank agrees on, or the time
budget). What differs between pretraining and fine-tuning comes in as objects: the data (an iterator
with `state_dict()` and `consumed_samples`), the validator, and the engine's `loss_of`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from typing import Protocol

import torch

from dsllm.batch_warmup import BatchWarmup
from dsllm.checkpoint.checkpointer import Checkpointer
from dsllm.engine import Engine
from dsllm.metrics import MetricsLog, format_step, memory_gib, mfu
from dsllm.run_control import (
    PROCESS_START,
    RunStopped,
    StopRequest,
    TrainingAborted,
    Watchdog,
    control_group,
    local_peer_pids,
)
from dsllm.seq_len_warmup import SeqLenWarmup


class TrainingData(Protocol):
    """The batches a run trains on, resumable at a step boundary. It may also have `report() -> (fields, warnings)`:
    fields for each step record (a mixture's per-source tokens and epochs) and lines to print once."""

    consumed_samples: int

    def __iter__(self) -> Iterator: ...

    def state_dict(self) -> dict: ...


class Validator(Protocol):
    def should_validate(self, step: int, last_step: bool) -> bool: ...

    def validate(self, step: int) -> dict:
        """Evaluate (every rank), log, and return at least {"val_loss": float}."""
        ...


class LastStepControl(Protocol):
    """What may move a run's last step while it trains (dsllm.cooldown.BudgetDecay: the budget's decay starts)."""

    def after_step(self, step: int, group) -> int | None:
        """Called by every rank after every step: the new last step, or None."""
        ...


@dataclasses.dataclass
class LoopSettings:
    max_steps: int
    log_interval: int
    max_nonfinite_steps: int
    stop_grace: float
    collective_timeout: float
    max_seconds: float | None = None  # --max-time
    max_cpu_seconds: float | None = None  # --max-cpu-seconds


class TimedBatches:
    """Wraps the batch iterator and adds up the seconds the step waited for data (logged as data_wait_fraction)."""

    def __init__(self, batches: Iterator):
        self.batches, self.seconds = batches, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.seconds += time.perf_counter() - start
        return batch


class StepLog:
    """The loss over the steps since the last line (summed on the device, one all-reduce per line),
    throughput, MFU, memory and ETA: a line on stdout and a record in metrics.jsonl."""

    def __init__(
        self,
        log: MetricsLog,
        device: torch.device,
        *,
        interval: int,
        max_steps: int,
        start_step: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_tflops: float | None,
        world_size: int,
        seq_len_warmup: SeqLenWarmup | None = None,
        batch_warmup: BatchWarmup | None = None,
    ):
        self.log, self.interval, self.max_steps = log, interval, max_steps
        self.tokens_per_step, self.flops, self.peak, self.world_size = (
            tokens_per_step,
            flops_per_token,
            peak_tflops,
            world_size,
        )
        self.seq_len_warmup, self.batch_warmup = seq_len_warmup, batch_warmup
        self.loss = torch.zeros((), device=device)
        self.steps, self.first_step, self.start_step = 0, start_step, start_step
        self.window_start = self.run_start = time.perf_counter()

    def tokens(self, steps: int) -> int:
        """The tokens the first `steps` optimizer steps trained on (fewer per step during a batch-size warmup)."""
        if self.batch_warmup is None:
            return steps * self.tokens_per_step
        full = self.batch_warmup.global_batch(self.batch_warmup.steps)
        return self.batch_warmup.samples(steps) * self.tokens_per_step // full

    def add(self, loss: torch.Tensor, applied: bool) -> None:
        if applied:
            self.loss += loss
            self.steps += 1

    def should_log(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    def write(self, step: int, engine: Engine, batches: TimedBatches, data: TrainingData, counters: dict) -> None:
        import torch.distributed as dist

        now = time.perf_counter()
        elapsed = now - self.window_start
        tokens_per_second = (self.tokens(step) - self.tokens(self.first_step)) / max(elapsed, 1e-9)
        dist.all_reduce(self.loss, op=dist.ReduceOp.SUM)  # the global batch's loss, not rank 0's share
        eta = (now - self.run_start) / max(1, step - self.start_step) * (self.max_steps - step)
        record = {
            "step": step,
            "lr": engine.lr(),
            "tokens": self.tokens(step),
            "samples": data.consumed_samples,
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(tokens_per_second, self.flops, self.peak, self.world_size),
            "memory_gib": memory_gib(),
            "skipped_steps": counters["skipped_steps"],
            "data_wait_fraction": batches.seconds / max(elapsed, 1e-9),  # > a few %: raise --loader-workers
            "cpu_seconds": time.process_time(),  # this rank's process (its threads) so far: benchmarks/quality.py
            "process_seconds": time.monotonic() - PROCESS_START,
        }
        if self.steps:
            record["loss"] = (self.loss / self.steps / self.world_size).item()
        else:  # every step of the window was skipped: there is no loss to report (not 0.0)
            record["skipped"] = True
        line = format_step(
            step,
            self.max_steps,
            record.get("loss"),
            record["lr"],
            tokens_per_second,
            record["mfu"],
            record["memory_gib"],
            eta,
        )
        if self.seq_len_warmup is not None:  # the window length of the step just trained
            record["seq_len"] = self.seq_len_warmup.length(step - 1)
            if record["seq_len"] < self.seq_len_warmup.seq_len:
                line += f" | seq_len {record['seq_len']}"
        if self.batch_warmup is not None:  # the global batch of the step just trained
            record["global_batch"] = self.batch_warmup.global_batch(step - 1)
            if record["global_batch"] < self.batch_warmup.global_batch(self.batch_warmup.steps):
                line += f" | global batch {record['global_batch']}"
        fields, warnings = data.report() if hasattr(data, "report") else ({}, [])
        record.update(fields)
        self.log.write(record, "\n".join([line, *warnings]))
        self.loss.zero_()
        batches.seconds = 0.0
        self.steps, self.window_start, self.first_step = 0, time.perf_counter(), step


def loop_settings(config) -> LoopSettings:
    """The loop's settings from a run's options (a RunConfig)."""
    return LoopSettings(
        config.max_steps,
        config.log_interval,
        config.max_nonfinite_steps,
        config.stop_grace,
        config.collective_timeout,
        config.max_seconds,
        config.max_cpu_seconds,
    )


def step_log_for(
    config,
    spec,
    log: MetricsLog,
    device: torch.device,
    start_step: int,
    seq_len_warmup: SeqLenWarmup | None = None,
    batch_warmup: BatchWarmup | None = None,
) -> StepLog:
    """The step log of a run (a RunConfig and its RunSpec), counting throughput from `start_step`; with a
    sequence-length warmup, each record has its window length, with a batch-size warmup its global batch."""
    from dsllm.metrics import peak_tflops
    from dsllm.model import flops_per_token

    return StepLog(
        log,
        device,
        interval=config.log_interval,
        max_steps=config.max_steps,
        start_step=start_step,
        tokens_per_step=spec.tokens_per_step,
        flops_per_token=flops_per_token(spec.model, spec.seq_len),
        peak_tflops=config.peak_tflops or peak_tflops(),
        world_size=spec.world.size,
        seq_len_warmup=seq_len_warmup,
        batch_warmup=batch_warmup,
    )


def train_loop(
    engine: Engine,
    data: TrainingData,
    *,
    settings: LoopSettings,
    start_step: int,
    counters: dict,
    validator: Validator,
    checkpointer: Checkpointer,
    step_log: StepLog,
    rank: int,
    ending: LastStepControl | None = None,
    batch_warmup: BatchWarmup | None = None,
) -> tuple[int, dict | None]:
    """Train from `start_step` to `settings.max_steps`; returns (the last step, the last evaluation or None).
    Raises TrainingAborted on divergence, RunStopped after a checkpoint on a stop signal or the time budget.
    `ending` (a BudgetDecay, --decay-in-budget) may move the last step earlier, once: when its decay starts.
    `batch_warmup` (--batch-size-warmup) gives each step its number of micro batches."""
    import torch.distributed as dist

    local_peer_pids(rank)
    watchdog = Watchdog(settings.collective_timeout, rank)
    group = control_group()
    stop = StopRequest(settings.stop_grace, rank).install()
    step, result = start_step, None

    def diverged(what: str) -> TrainingAborted:
        return TrainingAborted(
            f"{what}; stopped without saving. Last healthy checkpoint: {checkpointer.last_healthy()}. Lower --lr, "
            "or check the data, and resume from that checkpoint with --resume PATH"
        )

    def save(at_step: int) -> None:
        if not engine.parameters_finite():
            raise diverged(f"parameters are non-finite at step {at_step}: the run diverged")
        checkpointer.save(
            engine,
            at_step,
            data_state=data.state_dict(),
            consumed_samples=data.consumed_samples,
            counters=counters,
            val_loss=result["val_loss"] if result is not None else None,
        )
        watchdog.beat()

    engine.ds.train()
    batches = TimedBatches(iter(data))
    try:
        while step < settings.max_steps:
            accumulation = None if batch_warmup is None else batch_warmup.accumulation(step)
            loss, applied = engine.train_batch(batches, accumulation)
            step += 1
            if ending is not None and (end := ending.after_step(step, group)) is not None:
                settings.max_steps = step_log.max_steps = end
            last = step == settings.max_steps
            watchdog.arm()  # from the first finished step on: before it, JIT builds and compilation may take long
            step_log.add(loss, applied)
            if applied:
                counters["nonfinite_in_a_row"] = 0
            else:  # rare: only now does the host read the loss (every rank skipped, so every rank is here)
                finite = torch.isfinite(loss).to(torch.float32)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                finite = bool(finite.item())
                counters["skipped_steps"] += 1
                counters["nonfinite_in_a_row"] = 0 if finite else counters["nonfinite_in_a_row"] + 1
                if rank == 0:
                    print(
                        f"step {step}: {'non-finite loss' if not finite else 'overflow'}, update skipped "
                        f"({counters['nonfinite_in_a_row']} in a row)",
                        flush=True,
                    )
                if counters["nonfinite_in_a_row"] >= settings.max_nonfinite_steps:
                    raise TrainingAborted(
                        f"{counters['nonfinite_in_a_row']} non-finite losses in a row at step {step}; stopped without "
                        f"saving. Last healthy checkpoint: {checkpointer.last_healthy()}. Lower --lr, check the data, "
                        "or raise --max-nonfinite-steps"
                    )
            if step_log.should_log(step, last):
                step_log.write(step, engine, batches, data, counters)
            if validator.should_validate(step, last):
                engine.ds.eval()
                result = validator.validate(step)
                engine.ds.train()
                watchdog.beat()
                if not math.isfinite(result["val_loss"]):
                    raise diverged(f"the validation loss is non-finite at step {step}: the weights diverged")
            healthy = counters["nonfinite_in_a_row"] == 0  # never save mid non-finite streak
            saved_now = healthy and checkpointer.should_save(step, last)
            if saved_now:
                save(step)
            watchdog.beat()
            out_of_time = settings.max_seconds is not None and time.monotonic() - PROCESS_START >= settings.max_seconds
            out_of_cpu = settings.max_cpu_seconds is not None and time.process_time() >= settings.max_cpu_seconds
            if stop.agree(group, also=(out_of_time or out_of_cpu) and not last):
                if healthy and not saved_now:
                    save(step)
                saved = checkpointer.last_saved
                where = f"checkpoint {saved}" if saved is not None else "no checkpoint (none is healthy yet)"
                if stop.signal_name is None:  # a budget: the first rank past it decides for all
                    budget = f"--max-time {_clock(settings.max_seconds)}"
                    if out_of_cpu or settings.max_seconds is None:
                        budget = f"--max-cpu-seconds {settings.max_cpu_seconds:g}"
                    raise RunStopped(
                        f"stopped at {budget} after step {step}; {where}; run the same command (--resume auto) to "
                        "continue",
                        0,
                    )
                raise RunStopped(
                    f"stopped by {stop.signal_name} at step {step}; {where}; run the same command (--resume auto) "
                    "to continue",
                    75,
                )
    finally:
        watchdog.disarm()
        stop.uninstall()
    return step, result


def _clock(seconds: float | None) -> str:
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
