"""python -m dsllm report RUN_DIR on metrics written here: loss / lr / throughput plots and attention maps,
a summary whose numbers are the run's own; the recorded attention weights reproduce the attention kernel's
output. The report of a real run is in tests/e2e/test_report_runs.py."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, assert_user_error
from runs import report

from dsllm.report import (
    attention_figure,
    lr_figure,
    lr_schedule,
    read_metrics,
    recorded_attention,
    schedule_phases,
    series_figure,
    token_label,
)

PNG = b"\x89PNG"


def test_lr_without_a_schedule_still_starts_at_zero():
    train = [{"step": s, "loss": 3.0, "lr": 1e-3 * min(1, s / 30)} for s in (10, 20, 30, 40)]
    assert lr_schedule({}) is None and lr_schedule({"model": {}}) is None  # no config.json / not a pretraining run
    fig = lr_figure(train, None)
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [10, 20, 30, 40] and ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
    fig.clf()


def test_a_wsd_runs_lr_plot_shades_its_phases_from_config_json():
    from dsllm.schedule import wsd

    config = {"train": {"max_steps": 40, "lr": 1e-3}, "schedule": {"phases": wsd(4, 40, 8, "1-sqrt", 0.1).to_list()}}
    phases = schedule_phases(config)
    assert [(p["name"], p["start"], p["end"]) for p in phases] == [
        ("warmup", 0, 4),
        ("stable", 4, 32),
        ("decay", 32, 40),
    ]
    rates = dict(lr_schedule(config))
    assert (
        rates[0] == pytest.approx(1e-3 / 5)
        and rates[20] == 1e-3
        and rates[36] == pytest.approx(1e-3 * (1 - 0.9 * 0.5**0.5))
    )
    fig = lr_figure([{"step": 20, "lr": 1e-3}], sorted(rates.items()), phases)
    ax = fig.axes[0]
    assert [text.get_text() for text in ax.texts] == ["warmup", "stable", "decay"] and len(ax.patches) == 3
    fig.clf()
    assert schedule_phases({**config, "deepspeed": {"scheduler": {"type": "WarmupCosineLR"}}}) == []  # not ours


def test_throughput_axes_start_at_zero():
    train = [{"step": s, "tokens_per_second": 1000.0 + s, "mfu": 0.30 + s / 1000} for s in range(10, 60, 10)]
    fig = series_figure(train, [("tokens_per_second", "tokens/s"), ("mfu", "MFU")], "throughput")
    speed, mfu = fig.axes
    assert speed.get_ylim()[0] == 0 and speed.get_ylim()[1] >= 1050  # not auto-scaled to 1000..1050
    assert mfu.get_ylim()[0] == 0 and mfu.get_ylim()[1] >= 0.35
    assert list(speed.get_lines()[0].get_ydata()) == [1010.0, 1020.0, 1030.0, 1040.0, 1050.0]
    fig.clf()


def test_attention_maps_are_labelled_with_their_tokens():
    tokens = ["def", " main", "(", "\n", "$x$", " a_very_long_identifier"]
    assert [token_label(t) for t in tokens] == ["def", "\u00b7main", "(", "\\n", r"\$x\$", "\u00b7a_very_l\u2026"]
    torch.manual_seed(0)
    maps = torch.randn(2, 3, 6, 6).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    fig = attention_figure(maps, tokens)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    labels = [token_label(t) for t in tokens]
    bottom_left, top_left = panels[3], panels[0]  # row-major: layer 1 head 0, layer 0 head 0
    assert [t.get_text() for t in bottom_left.get_xticklabels()] == labels  # keys across
    assert [t.get_text() for t in top_left.get_yticklabels()] == labels  # queries down
    assert all(t.get_visible() for t in bottom_left.get_xticklabels())
    (colorbar,) = [ax.images[0].colorbar for ax in panels if ax.images[0].colorbar is not None]  # one, shared
    assert colorbar.ax in fig.axes and colorbar.ax.get_ylabel() == "attention weight"
    assert (colorbar.vmin, colorbar.vmax) == (0, 1)
    assert all(ax.images[0].get_clim() == (0, 1) for ax in panels)  # one colour scale for every panel
    torch.testing.assert_close(torch.tensor(panels[4].images[0].get_array()), maps[1, 1].float())
    fig.clf()


def test_parsers_build_without_torch_or_matplotlib():
    for module in ("dsllm.report", "dsllm.plan"):
        code = (
            f"import {module} as m, sys; m.build_parser(); print('torch' in sys.modules, 'matplotlib' in sys.modules)"
        )
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.stdout.split() == ["False", "False"], (module, proc.stdout, proc.stderr)
    help_text = report("--help").stdout
    assert "--max-prompt-tokens" in help_text and "(default: 24)" in help_text and "lr.png" in help_text


def test_recorded_attention_reproduces_the_kernel():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    keep = torch.rand(2, 1, 6, 6) > 0.3
    keep |= torch.eye(6, dtype=torch.bool)  # no empty rows
    with recorded_attention() as maps:
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert F.scaled_dot_product_attention is not None and len(maps) == 2
    values = v.repeat_interleave(2, dim=1)
    torch.testing.assert_close(maps[0] @ values, causal, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(maps[1] @ values, masked, rtol=1e-5, atol=1e-5)
    assert torch.all(maps[0].triu(1) == 0) and torch.allclose(maps[0].sum(-1), torch.ones(2, 4, 6))
    assert torch.all(maps[1][~keep.expand(2, 4, 6, 6)] == 0)


def test_resumed_lines_count_once_and_damage_is_named(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens": 10, "tokens_per_second": 100.0},
        {"step": 2, "loss": 4.0, "lr": 1e-3, "tokens": 20, "tokens_per_second": 100.0},
        {"step": 2, "loss": 3.5, "lr": 1e-3, "tokens": 20, "tokens_per_second": 90.0},  # written again on resume
        {"step": 2, "val_loss": 3.9, "perplexity": math.exp(3.9)},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_metrics(run)
    assert [r["loss"] for r in train] == [5.0, 3.5] and evals[0]["val_loss"] == 3.9
    report(run, "--no-attention")
    assert "final training loss 3.5000" in (run / "report" / "summary.md").read_text()
    (run / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n{not json\n")
    proc = report(run, expect=2)
    assert f"{run / 'metrics.jsonl'}:2: not a metrics record" in proc.stderr and len(proc.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such run folder"),
        (lambda p: p.mkdir(), "no metrics.jsonl"),
    ],
)
def test_bad_run_folder_is_one_line(tmp_path, make, message):
    make(tmp_path / "run")
    proc = report(tmp_path / "run", expect=2)
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_skipped_windows_are_gaps_not_zeros(tmp_path):
    """A log window whose every step was skipped (non-finite) has no loss: a gap in the plot, not a 0 in the summary."""
    from dsllm.report import loss_figure

    run = tmp_path / "run"
    run.mkdir()
    lines = [
        {"step": 10, "loss": 5.0, "lr": 1e-3, "tokens": 100, "tokens_per_second": 50.0, "skipped_steps": 0},
        {"step": 20, "skipped": True, "lr": 1e-3, "tokens": 200, "tokens_per_second": 50.0, "skipped_steps": 10},
        {"step": 30, "loss": None, "lr": 1e-3, "tokens": 300, "tokens_per_second": 50.0, "skipped_steps": 20},
        {"step": 40, "loss": 3.0, "lr": 1e-3, "tokens": 400, "tokens_per_second": 50.0, "skipped_steps": 20},
        {"step": 40, "val_loss": 3.2, "perplexity": math.exp(3.2)},
        {"step": 50, "skipped": True, "lr": 1e-3, "tokens": 500, "tokens_per_second": 50.0, "skipped_steps": 30},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50]
    fig = loss_figure(train, evals)
    for ax in fig.axes:
        steps_line = ax.get_lines()[0]
        assert [y if math.isfinite(y) else None for y in steps_line.get_ydata()] == [5.0, None, None, 3.0, None]
    fig.clf()
    report(run, "--no-attention")
    assert (run / "report" / "loss.png").read_bytes()[:4] == PNG
    text = (run / "report" / "summary.md").read_text()
    assert "final training loss 3.0000 at step 40 (first logged 5.0000)" in text
    assert "skipped updates (non-finite gradients): 30" in text
    assert "log windows with every step skipped (no loss; gaps in the loss plot): 3" in text


def test_out_over_the_run_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0, "lr": 1e-3, "tokens": 10}) + "\n")
    (run / "checkpoints").mkdir()
    (tmp_path / "link").symlink_to(run)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, relation, path in (
        (run, "contains", run / "metrics.jsonl"),
        (tmp_path, "contains", run / "metrics.jsonl"),
        (tmp_path / "link", "contains", run / "metrics.jsonl"),
        (run / "checkpoints" / "r", "lies inside", run / "checkpoints"),
    ):
        proc = report(run, "--no-attention", "--out", out, expect=2)
        assert_user_error(proc, f"--out {out} {relation} {path}", "which the report reads", "choose another --out")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_mixture_run_gets_its_sources_plotted(tmp_path):
    """Per-source tokens read and validation losses (a weighted mixture's metrics) in sources.png and the summary."""
    from dsllm.report import sources_figure

    run = tmp_path / "run"
    run.mkdir()
    read = lambda web, code: {"web": {"tokens": web, "epochs": web / 1000}, "code": {"tokens": code, "epochs": 0.5}}  # noqa: E731
    lines = [
        {"step": 1, "loss": 5.0, "lr": 1e-3, "tokens": 100, "tokens_per_second": 50.0, "sources": read(70, 30)},
        {"step": 2, "loss": 4.0, "lr": 1e-3, "tokens": 200, "tokens_per_second": 50.0, "sources": read(90, 110)},
        {"step": 2, "val_loss": 4.1, "val_loss_by_source": {"code": 4.3, "web": 3.9}},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train, evals = read_metrics(run)
    fig = sources_figure(train, evals)
    tokens, losses = fig.axes
    assert {line.get_label(): list(line.get_ydata()) for line in tokens.get_lines()} == {
        "code": [30, 110],
        "web": [70, 90],
    }
    assert {line.get_label(): list(line.get_ydata()) for line in losses.get_lines()} == {"code": [4.3], "web": [3.9]}
    fig.clf()
    report(run, "--no-attention")
    assert (run / "report" / "sources.png").read_bytes()[:4] == PNG
    text = (run / "report" / "summary.md").read_text()
    assert "validation loss by source at step 2: code 4.3000, web 3.9000" in text
    assert "tokens read by source: web 90 (0.09 epochs), code 110 (0.50 epochs)" in text and "![Mixture" in text
