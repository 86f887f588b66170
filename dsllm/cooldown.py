"""A cooldown branched off a stable run (`--decay-from CHECKPOINT`): the standard use of warmup-stable-decay.

One `--schedule wsd` run trains at its stable lr; at any of its checkpoints a new run (`--out`) continues it, as
`--resume CHECKPOINT` would (weights, optimizer, data position, RNG), with the source run's schedule up to that step
and then a decay of `--decay-steps` (default: `--decay-fraction` of the branch's whole length) to `--min-lr-ratio`.
So one stable run gives a finished model at several points. The source's folder is only read: its config.json (the
schedule and what the branch must share: batch, window, lr, data) and the checkpoint. The branch records its own
phases in its config.json; killed, it resumes its own checkpoints (`--resume auto`) with the same phases.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import UserError
from dsllm.schedule import Schedule, recorded_phases

if TYPE_CHECKING:
    from dsllm.run_spec import RunSpec
    from dsllm.train_config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Branch:
    """A checked --decay-from: the branch's schedule, the checkpoint it starts from (None when it resumes its own
    checkpoints) and the source run's config.json (what the branch must share with it)."""

    schedule: Schedule
    start: Path | None
    source: dict

    @property
    def decay_start(self) -> int:
        return self.schedule.phases[-1].start


def branch_of(config: TrainConfig) -> tuple[TrainConfig, Branch]:
    """The branch's options (--max-steps: the decay's end; --resume: the checkpoint, on its first start) and its
    schedule; refuses a checkpoint that is not one, not in a stable phase, or an --out inside its run."""
    from dsllm.checkpoint.store import CHECKPOINTS_DIR, COMPLETE_MARKER, lineage_candidates, read_marker, step_of
    from dsllm.schedule import decay_length

    where = f"--decay-from {config.decay_from}"
    checkpoint = Path(config.decay_from)
    out = Path(config.out)
    if config.resume not in ("auto",) and Path(config.resume).resolve() != checkpoint.resolve():
        raise UserError(
            f"{where} with --resume {config.resume}: the branch starts from the --decay-from checkpoint (and resumes "
            "its own checkpoints with --resume auto); drop --resume"
        )
    if step_of(checkpoint) is None:
        raise UserError(
            f"{where}: not a checkpoint (a checkpoints/stepNNNNNNNN folder with its {COMPLETE_MARKER}); pass one of a "
            "--schedule wsd run's checkpoints"
        )
    run = checkpoint.resolve().parent.parent
    if out.resolve() == run or run in out.resolve().parents:
        raise UserError(f"--out {config.out}: inside {run}, the run {where} branches off; pass a new --out")
    if lineage_candidates(out / CHECKPOINTS_DIR):  # killed before: the branch resumes itself, with its phases
        own = _read_json(out / "config.json", f"--out {out}: the branch's")
        branched = (own.get("train") or {}).get("decay_from")
        if not branched or Path(branched).resolve() != checkpoint.resolve():
            raise UserError(f"--out {out}: a run with checkpoints of its own, not a branch {where}; pass a new --out")
        schedule = recorded_phases(own.get("schedule"), f"{out / 'config.json'} schedule")
        return dataclasses.replace(config, max_steps=schedule.steps), Branch(schedule, None, {})
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise UserError(
            f"{where}: not a complete checkpoint (no {COMPLETE_MARKER}: unfinished or not saved by dsllm); pass one of "
            "a --schedule wsd run's checkpoints"
        )
    source = _read_json(run / "config.json", where + ": its run's")
    recorded = source.get("schedule")
    if not recorded:
        raise UserError(
            f"{where}: its run's config.json records no schedule phases (a run of an older dsllm, or not a "
            "pretraining run); branch off a --schedule wsd run"
        )
    step = int((read_marker(checkpoint) or {}).get("step", step_of(checkpoint)))
    source_schedule = recorded_phases(recorded, f"{run / 'config.json'} schedule")
    if config.decay_steps is not None:
        steps = config.decay_steps
    else:  # the decay is --decay-fraction of the branch's whole length: step + steps
        steps = decay_length(round(step / (1 - config.decay_fraction)), None, config.decay_fraction)
    schedule = source_schedule.cut_for_decay(step, steps, config.decay_shape, config.min_lr_ratio, where)
    branch = dataclasses.replace(config, max_steps=schedule.steps, resume=str(checkpoint))
    return branch, Branch(schedule, checkpoint, source)


def check_branch(branch: Branch, config: TrainConfig, spec: RunSpec, train_fingerprint: str) -> None:
    """What the branch must share with its source run (pre-flight): the global batch, the window, the peak lr and the
    training data; the model and precision the checkpoint's own resume checks say."""
    run, train = branch.source.get("run", {}), branch.source.get("train", {})
    where = f"--decay-from {config.decay_from}"
    mine = {"global_batch_size": spec.batch.global_size, "seq_len": spec.seq_len}
    for key, value in mine.items():
        if key in run and run[key] != value:
            raise UserError(
                f"{where}: its run trained with {key} {run[key]}, this branch would use {value}; a cooldown continues "
                f"the same run: pass --{key.replace('_', '-')} {run[key]}"
            )
    if "lr" in train and train["lr"] != config.lr:
        raise UserError(f"{where}: its run's peak lr is {train['lr']}, this branch has --lr {config.lr}; pass the same")
    from dsllm.checkpoint.store import Marker

    marker = Marker.read(branch.start) if branch.start is not None else None
    if marker is not None and marker.train_fingerprint != train_fingerprint:
        raise UserError(f"{where}: its run trained on other data (another fingerprint); pass its --data")


def check_layout(checkpointer, config: TrainConfig) -> None:
    """A branch loads its checkpoint as saved: another world size, ZeRO stage or layout would convert it to a
    universal checkpoint, which is written next to the checkpoint, into the source run."""
    if checkpointer.universal and checkpointer.resume_from is not None and config.decay_from:
        if Path(checkpointer.resume_from).resolve() == Path(config.decay_from).resolve():
            raise UserError(
                f"--decay-from {config.decay_from}: saved on another number of ranks, ZeRO stage or parallel layout; "
                "branch on the same ones (converting it would write into the source run's folder)"
            )


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {path.name} cannot be read ({type(err).__name__}); pass a run made by dsllm") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path.name} is not a JSON object; pass a run made by dsllm")
    return data
