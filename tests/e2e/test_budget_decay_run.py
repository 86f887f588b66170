"""--schedule wsd --decay-in-budget on a real run: the decay starts when the CPU-time budget's last --decay-fraction
begins and ends inside the budget; config.json records the decision, and a run resumed from a checkpoint before it
follows the recorded phases to the same final weights, bit for bit (its own process has a fresh budget, so deciding
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


def test_the_decay_starts_at_the_budgets_last_fraction_and_ends_inside_it(budget_run):
    out, proc = budget_run
    decided = json.loads((out / "config.json").read_text())["schedule"]["decided"]
    start, steps = decided["step"], decided["steps"]
    assert decided["budget"] == f"--max-cpu-seconds {BUDGET:g}"
    assert (1 - FRACTION) * BUDGET <= decided["used"] < BUDGET
    assert f"step {start}: " in proc.stdout and f"starts now, over {steps} steps to step {start + steps}" in proc.stdout
    assert "final validation loss" in proc.stdout and "stopped at" not in proc.stdout  # it ended, not cut
    records = train_records(out)
    assert sorted(records) == list(range(1, start + steps + 1))
    assert records[start + steps]["cpu_seconds"] < BUDGET
    assert records[start - 1]["cpu_seconds"] < (1 - FRACTION) * BUDGET <= records[start]["cpu_seconds"]
    for step, record in records.items():  # warmup, stable up to the decision, linear to the floor at the end
        factor = (step + 1) / (WARMUP + 1) if step < WARMUP else 1.0 + (FLOOR - 1.0) * max(0, step - start) / steps
        assert record["lr"] == pytest.approx(LR * factor, rel=1e-12), step


def test_a_resume_from_before_the_decision_follows_it_to_the_same_weights(budget_run, dataset_dir, tmp_path):
    out, _ = budget_run
    start = json.loads((out / "config.json").read_text())["schedule"]["decided"]["step"]
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    kept = max(s for s in range(200, start, 200))  # the last checkpoint of the stable phase: as if killed after it
    for checkpoint in (copy / "checkpoints").glob("step*"):
        if int(checkpoint.name[4:]) > kept:
            shutil.rmtree(checkpoint)
    proc = pretrain(dataset_dir, copy, *RUN)
    assert f"resumed from {copy / 'checkpoints' / f'step{kept:08d}'}" in proc.stdout
    assert f"decided at step {start}" in proc.stdout and "starts now" not in proc.stdout
    assert (copy / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
