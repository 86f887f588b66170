"""--schedule wsd --decay-in-budget on a real run: the decay starts when the CPU-time budget's last --decay-fraction
begins and ends inside the budget; config.json records the decision, and a run resumed from a checkpoint before it
follows the recorded phases with the same losses, bit for bit (its own process has a fresh budget, so deciding
again would give other phases)."""

import json
import shutil

import pytest
from runs import pretrain, train_records

LR, FLOOR, BUDGET, FRACTION, WARMUP = 3e-3, 0.1, 16.0, 0.3, 2
RUN = ["--max-steps", 100000, "--schedule", "wsd", "--warmup-steps", WARMUP, "--decay-shape", "linear"]
RUN += ["--min-lr-ratio", FLOOR, "--decay-fraction", FRACTION, "--max-cpu-seconds", BUDGET, "--decay-in-budget"]
RUN += ["--micro-batch-size", 2, "--precision", "fp32", "--eval-interval", 100000, "--save-interval", 200]
RUN += ["--keep-checkpoints", 1000, "--sample-tokens", 0]


@pytest.fixture(scope="module")
def budget_run(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("budget") / "run"
    proc = pretrain(dataset_dir, out, *RUN)
    return out, proc


def decay_factor(step: int, start: int, steps: int) -> float:
    """The lr factor after `step` steps: warmup, stable up to the decision at `start`, linear to the floor."""
    return (step + 1) / (WARMUP + 1) if step < WARMUP else 1.0 + (FLOOR - 1.0) * max(0, step - start) / steps


def ended_or_cut_at_the_end(out, proc_stdout: str, start: int, steps: int) -> int:
    """The run's last step: the decay's end, or (a step-time estimate is only an estimate: the machine's load changes
    the CPU time a step takes) a budget stop in the decay's last 10%."""
    last = max(train_records(out))
    if "final validation loss" in proc_stdout:
        assert last == start + steps and "stopped at" not in proc_stdout
    else:
        assert f"stopped at --max-cpu-seconds {BUDGET:g} after step {last}" in proc_stdout
        assert start + steps * 0.9 <= last < start + steps
    return last


def test_the_decay_starts_at_the_budgets_last_fraction_and_ends_inside_it(budget_run):
    out, proc = budget_run
    decided = json.loads((out / "config.json").read_text())["schedule"]["decided"]
    start, steps = decided["step"], decided["steps"]
    assert decided["budget"] == f"--max-cpu-seconds {BUDGET:g}"
    assert (1 - FRACTION) * BUDGET <= decided["used"] < BUDGET
    assert f"step {start}: " in proc.stdout and f"starts now, over {steps} steps to step {start + steps}" in proc.stdout
    last = ended_or_cut_at_the_end(out, proc.stdout, start, steps)
    records = train_records(out)
    assert sorted(records) == list(range(1, last + 1))
    assert records[start - 1]["cpu_seconds"] < (1 - FRACTION) * BUDGET <= records[start]["cpu_seconds"]
    for step, record in records.items():  # warmup, stable up to the decision, linear to the floor at the end
        assert record["lr"] == pytest.approx(LR * decay_factor(step, start, steps), rel=1e-12), step


def test_a_resume_from_before_the_decision_follows_it(budget_run, dataset_dir, tmp_path):
    """Its own process has a fresh budget: deciding again would keep the stable lr past the recorded decision."""
    out, _ = budget_run
    decided = json.loads((out / "config.json").read_text())["schedule"]["decided"]
    start, steps = decided["step"], decided["steps"]
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    kept = max(s for s in range(200, start, 200))  # the last checkpoint of the stable phase: as if killed after it
    for checkpoint in (copy / "checkpoints").glob("step*"):
        if int(checkpoint.name[4:]) > kept:
            shutil.rmtree(checkpoint)
    proc = pretrain(dataset_dir, copy, *RUN)
    assert f"resumed from {copy / 'checkpoints' / f'step{kept:08d}'}" in proc.stdout
    assert f"decided at step {start}" in proc.stdout and "starts now" not in proc.stdout
    ended_or_cut_at_the_end(copy, proc.stdout, start, steps)
    ours, theirs = train_records(copy), train_records(out)
    both = sorted(set(ours) & set(theirs))
    assert both[0] == 1 and both[-1] >= start + steps * 0.9  # (the copy's log holds the source's first lines)
    for step in both:  # the same lr and, bit for bit, the same loss at every step, the decay's included
        assert (ours[step]["lr"], ours[step]["loss"]) == (theirs[step]["lr"], theirs[step]["loss"]), step
    for step in set(ours) - set(theirs):  # (past the source's budget stop: the recorded phases still)
        assert ours[step]["lr"] == pytest.approx(LR * decay_factor(step, start, steps), rel=1e-12), step
