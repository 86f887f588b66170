"""python -m dsllm report RUN_DIR of a real run: the plots and a summary whose numbers are the run's own, and the
learning-rate plot replays the schedule the run used (DeepSpeed's, or the trainer's own)."""

import json

import pytest
from conftest import ROOT
from runs import pretrain, report

from dsllm.report import lr_figure, lr_schedule, read_config, read_metrics

PNG = b"\x89PNG"


def test_report_of_a_real_run(tmp_path, dataset_dir):
    run = tmp_path / "run"
    pretrain(
        dataset_dir,
        run,
        *("--max-steps", 12, "--warmup-steps", 4, "--log-interval", 5, "--eval-interval", 6, "--save-interval", 12),
        *("--precision", "fp32"),
    )
    proc = report(run, "--prompt", "def main(argv): return argv")
    out = run / "report"
    for name in ("loss.png", "lr.png", "throughput.png", "attention.png"):
        assert (out / name).read_bytes()[:4] == PNG, name
    text = (out / "summary.md").read_text()
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == [5, 10, 12] and [r["step"] for r in evals] == [6, 12]
    assert f"final training loss {train[-1]['loss']:.4f}" in text
    assert f"final loss {evals[-1]['val_loss']:.4f}, perplexity {evals[-1]['perplexity']:.2f}" in text
    assert "12 steps" in text and "ZeRO-2, fp32" in text and "![Attention maps" in text
    assert "summary.md" in proc.stdout
    custom = tmp_path / "elsewhere"
    report(run, "--no-attention", "--out", custom)
    assert not (custom / "attention.png").exists() and (custom / "loss.png").is_file()

    # The first logged step (5) is past the 4-step warmup: the plot starts at step 0 from the replayed schedule
    # (DeepSpeed's WarmupCosineLR of ds_configs/zero2.json), on which every logged value lies.
    schedule = lr_schedule(read_config(run), train[-1]["step"])
    assert [step for step, _ in schedule] == list(range(13))
    rates = dict(schedule)
    for record in train:
        assert rates[record["step"]] == pytest.approx(record["lr"], rel=1e-9, abs=1e-15), record["step"]
    warmup, decay = [rates[s] for s in range(0, 5)], [rates[s] for s in range(4, 13)]
    assert warmup == sorted(warmup) and rates[0] < rates[4] and decay[1:] == sorted(decay[1:], reverse=True)
    assert max(rates.values()) <= 3e-3 and rates[12] == pytest.approx(3e-4, rel=0.05)  # --lr 3e-3, cosine floor 0.1
    fig = lr_figure(train, schedule)
    ax = fig.axes[0]
    line, points = ax.get_lines()
    assert list(line.get_xdata()) == list(range(13)) and ax.get_xlim()[0] == 0
    assert list(points.get_xdata()) == [5, 10, 12]
    fig.clf()


def test_the_trainers_own_schedule_is_replayed(tmp_path, dataset_dir):
    """A DeepSpeed JSON without a "scheduler": the trainer's warmup + cosine (LambdaLR) is what the report replays."""
    config = json.loads((ROOT / "ds_configs" / "zero0.json").read_text())
    del config["scheduler"]
    ds = tmp_path / "no_scheduler.json"
    ds.write_text(json.dumps(config))
    run = tmp_path / "run"
    pretrain(dataset_dir, run, "--ds_config", ds, "--max-steps", 6, "--warmup-steps", 2, "--log-interval", 3)
    train, _ = read_metrics(run)
    schedule = dict(lr_schedule(read_config(run), 6))
    assert sorted(schedule) == list(range(7)) and [r["step"] for r in train] == [3, 6]
    for record in train:
        assert schedule[record["step"]] == pytest.approx(record["lr"], rel=1e-9), record["step"]
    assert schedule[0] == pytest.approx(3e-3 / 3) and schedule[1] == pytest.approx(2 * 3e-3 / 3)  # (step+1)/(warmup+1)
