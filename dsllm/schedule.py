"""Learning-rate schedules as data: a list of phases, each a shape between two factors of --lr.

A phase is {"steps": N, "shape": constant | linear | cosine | 1-sqrt, "from": a, "to": b}: over its N steps the factor
moves from `a` (at its first step) towards `b` (reached at the step after its last, the next phase's first). A phase
that starts from 0 (a warmup) skips the zero: its N steps take N of N + 1 equal strides, so no step trains at lr 0.
Past the last phase the factor stays at that phase's end. `--schedule cosine` (warmup, cosine to --min-lr-ratio) and
`--schedule wsd` (warmup, stable at 1, a decay over the last --decay-fraction) are such lists; a .json/.yaml file
writes one by hand, with "steps" as a count, a fraction of --max-steps or "rest". `factor(step)` is what the
engine's LambdaLR multiplies --lr by after `step` optimizer steps; config.json records the resolved phases.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from dsllm.errors import UserError

SHAPES = ("constant", "linear", "cosine", "1-sqrt")
NAMES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")
FILE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclasses.dataclass(frozen=True)
class Phase:
    """`steps` optimizer steps from step `start`, the factor moving from `start_factor` to `end_factor`."""

    start: int
    steps: int
    shape: str
    start_factor: float
    end_factor: float

    @property
    def end(self) -> int:
        return self.start + self.steps

    def factor(self, step: int) -> float:
        """The factor after `step` steps (inside the phase, or past its end when it is the last one)."""
        a, b, i, n = self.start_factor, self.end_factor, step - self.start, self.steps
        if self.shape == "constant":
            return a
        progress = min(1.0, (i + 1) / (n + 1) if a == 0 else i / max(1, n))  # from 0: skip the zero
        if self.shape == "linear":
            return a * (1 - progress) + b * progress  # (each end exact)
        if self.shape == "cosine":
            return b + (a - b) * 0.5 * (1 + math.cos(math.pi * progress))
        return b + (a - b) * (1 - math.sqrt(progress))  # 1-sqrt: the cooldown of Hägele et al. 2024

    def to_dict(self) -> dict:
        return {
            "start": self.start,
            "steps": self.steps,
            "shape": self.shape,
            "from": self.start_factor,
            "to": self.end_factor,
        }


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The phases of a run, back to back from step 0."""

    phases: tuple[Phase, ...]

    def phase_at(self, step: int) -> Phase:
        """The phase that holds `step` (the last one past the end)."""
        return next((p for p in self.phases if p.start <= step < p.end), self.phases[-1])

    def factor(self, step: int) -> float:
        return self.phase_at(step).factor(step)

    @property
    def steps(self) -> int:
        return self.phases[-1].end

    def same_until(self, other: Schedule, step: int) -> bool:
        """Whether both give the same factors before `step` (a resumed run's past): the same phases there, a constant
        one of any length."""

        def past(schedule: Schedule) -> list[tuple]:
            return [
                (p.start, p.shape, p.start_factor)
                if p.shape == "constant"
                else (p.start, p.steps, p.shape, p.start_factor, p.end_factor)
                for p in schedule.phases
                if p.start < step
            ]

        return past(self) == past(other)

    def change_note(self, config_json: Path, step: int) -> str | None:
        """A line when a run resumes at `step` on phases that differ before it from those its config.json recorded
        (another --max-steps or --warmup-steps, an edited phases file): its past trained on those. None: the same,
        or nothing recorded."""
        import json

        try:
            recorded = recorded_phases(json.loads(Path(config_json).read_text())["schedule"], "config.json")
        except (OSError, ValueError, KeyError, TypeError, UserError):
            return None
        if self.same_until(recorded, step):
            return None
        return (
            f"note: the lr schedule differs from the one this run trained its first {step} steps with "
            f"({recorded.describe()}); the steps from here follow the new one ({self.describe()})"
        )

    def to_list(self) -> list[dict]:
        return [phase.to_dict() for phase in self.phases]

    def describe(self) -> str:
        """One line: `warmup-like` phases as shape from->to over [start, end)."""
        return ", ".join(
            f"{p.shape} {p.start_factor:g}"
            + ("" if p.shape == "constant" else f"->{p.end_factor:g}")
            + f" steps {p.start}-{p.end}"
            for p in self.phases
        )

    def cut_for_decay(self, at: int, steps: int, shape: str, to: float, where: str) -> Schedule:
        """These phases up to step `at` (a checkpoint in a constant phase), then a decay of `steps` steps from that
        phase's factor to `to`: the cooldown branched off a stable run (`--decay-from`)."""
        if at < 1 or at > self.steps:
            raise UserError(
                f"{where}: saved at step {at}, outside its run's schedule (steps 0-{self.steps}); branch from a "
                "checkpoint of the stable phase"
            )
        stable = self.phase_at(at - 1)  # the phase of the last step the checkpoint trained
        if stable.shape != "constant":
            if stable.end_factor < stable.start_factor:  # its run's own decay had begun
                began = stable.start
                hint = f"its run's decay started at step {began}, before it: branch from step {began} or earlier"
            else:
                hint = "branch from a checkpoint of the stable phase of a --schedule wsd run"
            raise UserError(
                f"{where}: saved at step {at}, in a {stable.shape} phase (steps {stable.start}-{stable.end}) of its "
                f"run's schedule, not a stable (constant) one; {hint}"
            )
        kept = [p for p in self.phases if p.end <= at]
        if stable.start < at:
            kept.append(dataclasses.replace(stable, steps=at - stable.start))
        decay = Phase(at, steps, shape, stable.start_factor, to)
        return Schedule(tuple(kept) + (decay,))


# -- building one -------------------------------------------------------------------------------------------------
def back_to_back(parts: list[tuple[int, str, float, float]]) -> Schedule:
    """A schedule of (steps, shape, from, to) parts laid end to end. Empty parts are dropped (a warmup of 0 steps),
    but for the last: past the end the factor is its end (cosine's floor, even when the warmup took every step)."""
    phases, start = [], 0
    for number, (steps, shape, a, b) in enumerate(parts):
        if steps > 0 or number == len(parts) - 1:
            phases.append(Phase(start, max(0, steps), shape, a, b))
            start += max(0, steps)
    return Schedule(tuple(phases))


def cosine(warmup: int, max_steps: int, min_lr_ratio: float) -> Schedule:
    """Linear warmup from 0, cosine to `min_lr_ratio` at max_steps: the factors of dsllm's schedule before phases,
    to the bit."""
    return back_to_back([(warmup, "linear", 0.0, 1.0), (max_steps - warmup, "cosine", 1.0, min_lr_ratio)])


def decay_length(max_steps: int, decay_steps: int | None, decay_fraction: float) -> int:
    """The decay's steps: --decay-steps, or --decay-fraction of --max-steps (at least 1)."""
    return decay_steps if decay_steps is not None else max(1, round(decay_fraction * max_steps))


def wsd(warmup: int, max_steps: int, decay_steps: int, decay_shape: str, min_lr_ratio: float) -> Schedule:
    """Warmup, stable at 1, then `decay_steps` of `decay_shape` down to `min_lr_ratio` at max_steps."""
    start = max_steps - decay_steps
    if start < warmup:
        raise UserError(
            f"--schedule wsd: the decay of {decay_steps} steps would start at step {start}, inside the warmup of "
            f"{warmup} steps (--max-steps {max_steps}); lower --decay-fraction / --decay-steps or --warmup-steps"
        )
    return back_to_back(
        [
            (warmup, "linear", 0.0, 1.0),
            (start - warmup, "constant", 1.0, 1.0),
            (decay_steps, decay_shape, 1.0, min_lr_ratio),
        ]
    )


def read_phases(path: str, max_steps: int) -> Schedule:
    """The schedule of a phases file (a list of phases, or {"phases": [...]}) for a run of `max_steps` steps."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--schedule {path}: no such file; pass cosine, wsd or a .json/.yaml file of phases")
    from dsllm.cli_args import read_json_or_yaml

    data = read_json_or_yaml(file, "--schedule")
    return phases_of(data, max_steps, f"--schedule {path}")


def phases_of(data, max_steps: int, where: str) -> Schedule:
    """Check a list of phase mappings (steps, shape, from, to) and lay them out over `max_steps` steps; a bad one is
    one line naming `where`, the phase and the fix. Recorded phases (config.json's, with "start") read back too."""
    if isinstance(data, dict) and "phases" in data:
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise UserError(
            f'{where}: must hold a list of phases, e.g. [{{"steps": 100, "shape": "linear", "to": 1}}, ...]'
        )
    counts, rest, previous = [], None, 0.0
    parts = []
    for number, phase in enumerate(data, 1):
        at = f"{where}: phase {number}"
        if not isinstance(phase, dict):
            raise UserError(f"{at}: not a mapping; write {{steps, shape, from, to}}")
        unknown = sorted(set(phase) - {"steps", "shape", "from", "to", "start"})
        if unknown:
            raise UserError(f"{at}: unknown key {unknown[0]!r}; a phase has steps, shape, from and to")
        shape = phase.get("shape")
        if shape not in SHAPES:
            raise UserError(f"{at}: unknown shape {shape!r}; use one of {', '.join(SHAPES)}")
        steps = phase.get("steps")
        if steps == "rest":
            if rest is not None:
                raise UserError(f'{at}: a second "rest"; only one phase may take the rest of the steps')
            rest, count = number - 1, 0
        elif isinstance(steps, bool) or not isinstance(steps, (int, float)):
            raise UserError(f'{at}: steps {steps!r}; give a number of steps, a fraction of --max-steps or "rest"')
        elif isinstance(steps, float) and not 0 < steps <= 1:
            raise UserError(f"{at}: steps {steps}: a fraction of --max-steps is in (0, 1]; or give a whole number")
        elif steps < 0:
            raise UserError(f"{at}: steps {steps}: negative; give 0 or more steps")
        else:
            count = steps if isinstance(steps, int) else round(steps * max_steps)
        if number == 1 and shape == "constant" and "from" not in phase:
            raise UserError(f"{at}: a constant phase first needs its factor; give it from (e.g. 1.0)")
        start_factor = _factor(phase.get("from", previous), f"{at}: from")
        end_factor = _factor(phase.get("to", start_factor if shape == "constant" else None), f"{at}: to")
        if shape == "constant" and end_factor != start_factor:
            raise UserError(f"{at}: a constant phase from {start_factor} to {end_factor}; drop its to or use linear")
        counts.append(count)
        parts.append([count, shape, start_factor, end_factor])
        previous = end_factor
    total = sum(counts)
    if rest is not None:
        if total > max_steps:
            raise UserError(
                f'{where}: the phases before "rest" take {total} steps, more than --max-steps {max_steps}; shorten them'
            )
        parts[rest][0] = max_steps - total
    elif total != max_steps:
        raise UserError(
            f"{where}: the phases cover {total} steps, --max-steps is {max_steps}; make them add up or give one phase "
            '"steps": "rest"'
        )
    return back_to_back([tuple(part) for part in parts])


def recorded_phases(data, where: str) -> Schedule:
    """A schedule as config.json records it (resolved phases with their steps), whatever its length."""
    phases = data.get("phases") if isinstance(data, dict) else data
    if not isinstance(phases, list) or not all(isinstance(p, dict) for p in phases):
        raise UserError(f"{where}: not a list of phases; the file is damaged")
    steps = [p.get("steps") for p in phases]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in steps):
        raise UserError(f"{where}: a phase without a whole number of steps; the file is damaged")
    return phases_of(phases, sum(steps), where)


def _factor(value, at: str) -> float:
    if value is None:
        raise UserError(f"{at}: missing; give the phase's factor of --lr (e.g. 0.1)")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{at} {value!r}: a factor of --lr is a number, 0 or more")
    return float(value)


def resolve(
    schedule: str,
    *,
    warmup: int,
    max_steps: int,
    min_lr_ratio: float,
    decay_fraction: float,
    decay_steps: int | None,
    decay_shape: str,
) -> Schedule:
    """The schedule a run's options name: cosine, wsd or a phases file."""
    if schedule == "cosine":
        return cosine(warmup, max_steps, min_lr_ratio)
    if schedule == "wsd":
        length = decay_length(max_steps, decay_steps, decay_fraction)
        return wsd(warmup, max_steps, length, decay_shape, min_lr_ratio)
    if Path(schedule).suffix.lower() in FILE_SUFFIXES:
        return read_phases(schedule, max_steps)
    raise UserError(f"--schedule {schedule}: use {', '.join(NAMES)} or a .json/.yaml file of phases")
