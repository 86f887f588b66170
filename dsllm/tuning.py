"""The run of a fine-tuning over rows of examples (SFT, classification, reward model, DPO): `run_rows` is the one
owner of its life on the engine, the loop and the checkpoints, as `dsllm.pretrain.run` is for pretraining;
`run_tuning` is the run of the ones scored every --eval-interval steps with a head or a pair loss (classification,
reward model, DPO), and `dsllm.finetune.run` is SFT's.

A `Tuning` says what differs: the module the engine trains (a GPT, or a GPT with a head), its loss of a micro batch,
how the validation rows are scored (through a forward function: the plain module before training, DeepSpeed's engine
during it, on every rank as ZeRO-3 needs), the entry config.json records, and how the final fp32 weights are written.
The data is an `Encoded`-like object (`idx` rows, `batch(rows)`, `fingerprint()`) that `sft_data.PackedBatches`
hands out in a seeded, resumable order.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsllm.errors import UserError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from dsllm.checkpoint.checkpointer import Checkpointer
    from dsllm.run_spec import RunSpec


@dataclasses.dataclass
class Tuning:
    kind: str  # "classify", "reward", "dpo": the checkpoints' kind and the summary file's name (KIND.json)
    config: Any  # the resolved RunConfig (--max-steps and --eval-interval known)
    spec: RunSpec
    checkpointer: Checkpointer
    module: torch.nn.Module
    loss: Callable  # (module, batch, device) -> loss
    train: Any  # rows: `idx`, `batch(rows)`, `fingerprint()`
    score: Callable  # (forward, device) -> {"val_...": number}, on every rank
    record: dict  # config.json's entry under `kind`
    save: Callable  # (fp32 state dict of the module, out folder) -> None: the final weights, rank 0
    summary: dict
    tokenizer_file: Path
    header: str
    steps_per_epoch: int
    prepare: Callable | None = None  # (device, resuming) -> None, on every rank before training (`run_rows`)


def check_inputs(config) -> tuple[Tokenizer, Path]:
    """--out apart from every input (refused before anything is read), then the --init model's tokenizer and file."""
    from dsllm.model_dir import model_inputs, model_tokenizer, resolve_model_source
    from dsllm.paths import check_output_apart

    inputs = model_inputs(config.init, "--init") + [("--data", config.data), ("--ds_config", config.ds_config)]
    check_output_apart(config.out, "--out", inputs + ([("--val-data", config.val_data)] if config.val_data else []))
    return model_tokenizer(resolve_model_source(config.init)[2])


def split_held_out(config, read: Callable[[str, str], list], unit: str) -> tuple[list, list]:
    """(training, validation) examples: `read(path, flag)` of --data and --val-data, or a seeded --val-fraction of
    --data held out (`unit` names an example in the error when that leaves either side empty)."""
    import random

    train = read(config.data, "--data")
    if config.val_data:
        return train, read(config.val_data, "--val-data")
    random.Random(config.seed).shuffle(train)
    cut = max(1, round(len(train) * config.val_fraction)) if config.val_fraction > 0 else 0
    if cut == 0 or cut >= len(train):
        raise UserError(
            f"--data {config.data}: {len(train)} {unit}(s) with --val-fraction {config.val_fraction} leave no "
            f"validation or no training {unit}s; add {unit}s, change the fraction, or pass --val-data"
        )
    return train[cut:], train[:cut]


def epoch_plan(config, model, world, rows: int, length: int) -> tuple[Any, RunSpec, int]:
    """(the options resolved, the run's spec, steps per epoch) of `rows` training rows of `length` tokens: an epoch's
    steps come from the global batch of a provisional spec, then --max-steps, --eval-interval and --seq-len."""
    import math

    from dsllm.pretrain import resolve_spec

    provisional = resolve_spec(config.resolved(1_000_000), model, world)  # its global batch: an epoch's steps
    steps_per_epoch = math.ceil(rows / provisional.batch.global_size)
    config = dataclasses.replace(config.resolved(steps_per_epoch), seq_len=length)
    return config, resolve_spec(config, model, world), steps_per_epoch


class ScoreEvery:
    """The validation scores every --eval-interval steps (and at the end), logged by rank 0 and kept."""

    def __init__(self, tuning: Tuning, engine, device, log, history: list):
        self.tuning, self.engine, self.device, self.log, self.history = tuning, engine, device, log, history

    def should_validate(self, step: int, last_step: bool) -> bool:
        return step % self.tuning.config.eval_interval == 0 or last_step

    def validate(self, step: int) -> dict:
        result = self.tuning.score(self.engine.ds, self.device)
        record = {"step": step, "epoch": round(step / self.tuning.steps_per_epoch, 3), **result}
        self.history.append(record)
        self.log.write(record, f"eval step {step} (epoch {record['epoch']:g}) | " + describe(result))
        return result


def describe(result: dict) -> str:
    return " | ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in result.items())


def run_tuning(tuning: Tuning) -> dict:
    """Train `tuning` to its last step, scoring every --eval-interval steps; returns its summary."""
    from dsllm.checkpoint.states import consolidated_state_dict
    from dsllm.checkpoint.store import write_json_atomic

    summary, history = tuning.summary, []

    def before(device) -> None:
        summary["before"] = tuning.score(tuning.module.to(device), device)
        print("before: " + describe(summary["before"]), flush=True)

    def finish(last_saved: Path, device) -> None:
        tuning.save(consolidated_state_dict(last_saved), Path(tuning.config.out))  # fp32, from any ZeRO stage
        summary["epochs"], summary["after"] = history, history[-1] if history else None
        write_json_atomic(Path(tuning.config.out) / f"{tuning.kind}.json", summary)

    run_rows(
        RowsRun(tuning.config, tuning.spec, tuning.checkpointer, tuning.module, tuning.loss, tuning.train),
        {tuning.kind: tuning.record}, tuning.tokenizer_file, tuning.header, before,
        lambda engine, device, log, batches: ScoreEvery(tuning, engine, device, log, history), finish,
        tuning.prepare,
    )  # fmt: skip
    return summary


@dataclasses.dataclass
class RowsRun:
    """What a run over rows of examples trains: the resolved config and spec, the checkpointer, the module, its
    loss of a micro batch, (module, batch, device) -> loss, and the rows (`idx`, `batch(rows)`, `fingerprint()`)."""

    config: Any
    spec: RunSpec
    checkpointer: Checkpointer
    module: torch.nn.Module
    loss: Callable
    rows: Any


def run_rows(
    run: RowsRun,
    entry: dict,
    tokenizer_file: Path,
    header: str,
    before: Callable[[Any], None] | None,
    validator: Callable,
    finish: Callable[[Path, Any], None],
    prepare: Callable[[Any, bool], None] | None = None,
) -> None:
    """The life of a fine-tuning run over rows (SFT, classification, DPO, reward model) on the engine, the loop and
    the checkpoints: the run folder is a model folder from the start (config.json with `entry` beside the model, the
    tokenizer), `prepare(device, resuming)` on every rank (DPO's reference log-probabilities), `before(device)` on
    rank 0 of a fresh start before DeepSpeed takes the module, the rows in a seeded
    resumable order, a checkpoint resumed, the loop with `validator(engine, device, log, batches)`, and
    `finish(last checkpoint, device)` on rank 0 once every rank is done."""
    import torch.distributed as dist

    from dsllm.checkpoint.store import write_json_atomic
    from dsllm.engine import build_engine, engine_options, init_distributed
    from dsllm.loop import loop_settings, step_log_for, train_loop
    from dsllm.metrics import MetricsLog
    from dsllm.model_dir import CONFIG_FILE
    from dsllm.run_control import RunLock
    from dsllm.sft_data import PackedBatches
    from dsllm.tokenizer import TOKENIZER_FILE

    config, spec, checkpointer = run.config, run.spec, run.checkpointer
    world, out = spec.world, Path(config.out)
    lock = RunLock(out).acquire() if world.is_main else None
    if world.is_main:
        print(header, flush=True)
    device = init_distributed(world, config.collective_timeout)
    checkpointer.verify()
    checkpointer.start_lineage()
    if world.is_main:  # a model folder from the start: checkpoints load through its config.json
        write_json_atomic(out / CONFIG_FILE, {"model": spec.model.to_dict(), **entry})
        shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE)
    if prepare is not None:
        prepare(device, checkpointer.resume_from is not None)
    if world.is_main and before is not None and checkpointer.resume_from is None:  # before DeepSpeed takes it
        before(device)
    options = {**engine_options(config), "load_universal": checkpointer.universal}
    engine = build_engine(spec, run.module.train(), device, run.loss, **options)
    batches = PackedBatches(run.rows, spec.batch.micro, config.seed, world.rank, world.size)
    step, counters = 0, {"nonfinite_in_a_row": 0, "skipped_steps": 0}
    if checkpointer.resume_from is not None:
        state = checkpointer.load(engine)
        batches.load_state_dict(state["data"])
        step, counters = state["step"], state["counters"]
        if world.is_main:
            print(f"resumed from {checkpointer.resume_from} at step {step}", flush=True)
    log = MetricsLog(out / "metrics.jsonl", world.is_main, getattr(engine.ds, "monitor", None))
    train_loop(
        engine,
        batches,
        settings=loop_settings(config),
        start_step=step,
        counters=counters,
        validator=validator(engine, device, log, batches),
        checkpointer=checkpointer,
        step_log=step_log_for(config, spec, log, device, step),
        rank=world.rank,
    )
    dist.barrier()
    if world.is_main:
        finish(checkpointer.last_saved, device)
    log.close()
    engine.teardown()
    if lock is not None:
        lock.release()
