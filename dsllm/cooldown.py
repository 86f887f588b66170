"""Cooldowns decided outside the options' phases: branched off a stable run (`--decay-from CHECKPOINT`), the standard
use of warmup-stable-decay, or started by the compute budget (`--decay-in-budget`, `BudgetDecay` below).

One `--schedule wsd` run trains at its stable lr; at any of its checkpoints a new run (`--out`) continues it, as
`--resume CHECKPOINT` would (weights, optimizer, data position, RNG), with the source run's schedule up to that step
and then a decay of `--decay-steps` (default: `--decay-fraction` of the branch's whole length) to `--min-lr-ratio`.
So one stable run gives a finished model at several points. The source's folder is only read: its config.json (the
schedule and what the branch must share: batch, window, lr, data) and the checkpoint. The branch records its own
phases in its config.json; killed, it resumes its own checkpoints (`--resume auto`) with the same phases.

A budget's cooldown (`--schedule wsd --decay-in-budget` with `--max-cpu-seconds` or `--max-time`) starts when the
budget's last --decay-fraction begins, whatever the steps per second of this model on this hardware and data, and
ends inside it; the decision is recorded in config.json like a branch's phases, so a resume follows it exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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


# -- a cooldown that ends inside a compute budget (--decay-in-budget) -------------------------------------------------
HISTORY = 4096  # the (step, used) entries a BudgetDecay keeps for its rate
BUDGET_MARGIN = 0.1  # the share of the remaining budget the decay leaves unplanned: step-time noise, the last save


@dataclasses.dataclass
class Budget:
    """One budget of the process: its name (the flag, for messages), its size, and how much of it is used now."""

    name: str
    size: float
    used: Callable[[], float]


class BudgetDecay:
    """`--schedule wsd --decay-in-budget`: the decay starts when this process has used 1 - --decay-fraction of its
    budget (--max-cpu-seconds, --max-time), over as many steps as the rest of the budget holds at the step rate of
    the later half of its stable steps so far, unless the steps' own decay (--max-steps) comes first. Every rank
    computes its own estimate after every stable step; one all-reduce takes the decision of the rank furthest into
    its budget and the fewest steps. The decision is recorded in config.json ("schedule": its phases and "decided"),
    so a resumed run follows the same phases to the same last step, as a --decay-from branch follows its own. It is
    the lr factor LambdaLR reads (`factor`): the phases change under the engine at the decision, not the steps
    before it."""

    def __init__(self, config: TrainConfig, schedule: Schedule, decided: dict | None, out: Path, is_main: bool):
        self.config, self.schedule, self.decided, self.out, self.is_main = config, schedule, decided, out, is_main
        self.budgets = budgets_of(config)
        self.history: list[tuple[int, list[float]]] = []  # (step, budgets used) after this process's steps, thinned

    @property
    def max_steps(self) -> int:
        return self.schedule.steps

    def factor(self, step: int) -> float:
        return self.schedule.factor(step)

    def record(self) -> dict:
        """config.json's "schedule": the phases in force, and the decision once taken."""
        return {"phases": self.schedule.to_list(), **({"decided": self.decided} if self.decided else {})}

    def pending(self, step: int) -> bool:
        """Whether the decay may still start at `step` (the next step to train): undecided, the step before it in
        a stable phase, and the steps' own decay not begun."""
        if self.decided is not None or step < 1:
            return False
        return self.schedule.phase_at(step - 1).shape == "constant" and step < self.schedule.phases[-1].start

    def after_step(self, step: int, group=None) -> int | None:
        """Called by every rank after every step: the run's new last step when the decay starts now, else None."""
        import torch
        import torch.distributed as dist

        if not self.pending(step):
            return None
        now = [budget.used() for budget in self.budgets]
        self.history.append((step, now))
        if len(self.history) > HISTORY:  # every other entry: the rate's window stays the later half, roughly
            self.history = self.history[-1::-2][::-1]
        # the rate over the later half of this process's steps: not the first step (JIT builds, cold caches), nor a
        # batch-size or window-length warmup's cheaper steps
        start_step, start = self.history[len(self.history) // 2] if len(self.history) > 1 else (step, now)
        used, deciding = max(zip(now, self.budgets), key=lambda pair: pair[0] / pair[1].size)  # furthest into it
        steps_left = min(
            self._steps_left(step - start_step, spent, begun, budget)
            for spent, begun, budget in zip(now, start, self.budgets)
        )
        want = used / deciding.size >= 1 - self.config.decay_fraction and step > start_step
        flag = torch.tensor([int(want), -steps_left], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        want, steps_left = bool(flag[0]), max(1, -int(flag[1]))
        if not want or step + steps_left >= self.schedule.steps:  # the budget holds the steps' own decay
            return None
        config = self.config
        self.schedule = self.schedule.cut_for_decay(
            step, steps_left, config.decay_shape, config.min_lr_ratio, "--decay-in-budget"
        )
        self.decided = {
            "step": step,
            "steps": steps_left,
            "budget": f"{deciding.name} {deciding.size:g}",
            "used": round(used, 3),
        }
        if self.is_main:
            from dsllm.checkpoint.store import write_json_atomic

            path = self.out / "config.json"
            record = json.loads(path.read_text())
            record["schedule"] = self.record()
            write_json_atomic(path, record)
            print(
                f"step {step}: {used:.1f} of {self.decided['budget']} used: the decay ({config.decay_shape} to "
                f"{config.min_lr_ratio:g} x lr) starts now, over {steps_left} steps to step {self.max_steps}",
                flush=True,
            )
        return self.max_steps

    def _steps_left(self, steps: int, used: float, start: float, budget: Budget) -> int:
        """The steps the rest of `budget` holds at the rate of the last `steps` (from `start` used to `used`), less a
        margin."""
        per_step = (used - start) / max(1, steps)
        left = (budget.size - used) * (1 - BUDGET_MARGIN)
        return max(1, int(left / per_step)) if per_step > 0 else self.schedule.steps


def budgets_of(config: TrainConfig) -> list[Budget]:
    """The process's budgets: --max-cpu-seconds (time.process_time) and --max-time (seconds since it started)."""
    import time

    from dsllm.run_control import PROCESS_START

    budgets = []
    if config.max_cpu_seconds is not None:
        budgets.append(Budget("--max-cpu-seconds", config.max_cpu_seconds, time.process_time))
    if config.max_time is not None:
        budgets.append(Budget("--max-time", config.max_seconds, lambda: time.monotonic() - PROCESS_START))
    return budgets


def budget_decay(config: TrainConfig, schedule: Schedule, resume_from: Path | None, is_main: bool) -> BudgetDecay:
    """The run's BudgetDecay: on a resume of its own checkpoints, the decision its config.json recorded (its phases
    to its last step); else the options' wsd, undecided."""
    out = Path(config.out)
    decided = None
    if resume_from is not None and (out / "config.json").is_file():
        recorded = _read_json(out / "config.json", f"--out {out}: the run's").get("schedule") or {}
        if isinstance(recorded, dict) and recorded.get("decided"):
            schedule = recorded_phases(recorded, f"{out / 'config.json'} schedule")
            decided = recorded["decided"]
    return BudgetDecay(config, schedule, decided, out, is_main)
