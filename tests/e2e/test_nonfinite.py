"""Non-finite losses: the update is skipped and counted on every ZeRO stage and precision; K in a row
abort the run (exit 3) with the last good checkpoint kept."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from runs import SMALL_MODEL, env

# A driver that makes the training loss NaN at the given (1-based) training forward calls, then runs
# the trainer as `launch/pretrain.py` would. A subprocess each: DeepSpeed keeps process-group state.
DRIVER = """
import json, sys
from dsllm import model
from dsllm.pretrain import main
bad, calls, original = set(json.loads(sys.argv[1])), [0], model.GPT.forward
def forward(self, idx, targets=None, **kwargs):
    logits, loss = original(self, idx, targets, **kwargs)
    if targets is not None and self.training:
        calls[0] += 1
        if calls[0] in bad:
            loss = loss * float("nan")
    return logits, loss
model.GPT.forward = forward
sys.exit(main(sys.argv[2:]))
"""


def train(tmp_path, dataset_dir, ds, precision, bad_steps, *args):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            json.dumps(sorted(bad_steps)),
            "--ds_config",
            str(ROOT / "ds_configs" / ds),
            "--data",
            str(dataset_dir),
            "--out",
            str(out),
            *SMALL_MODEL,
            "--seq-len",
            "32",
            "--micro-batch-size",
            "4",
            "--lr",
            "3e-3",
            "--eval-windows",
            "4",
            "--sample-tokens",
            "0",
            "--loader-workers",
            "0",
            "--log-interval",
            "1",
            "--precision",
            precision,
            *map(str, args),
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if out.exists() else []
    return proc, out, [r for r in lines if "loss" in r]


@pytest.mark.parametrize(
    "ds, precision",
    [
        ("zero0.json", "fp32"),
        ("zero0.json", "bf16"),
        ("zero2.json", "fp32"),
        ("zero2.json", "bf16"),
        ("zero3.json", "bf16"),
    ],
)
def test_transient_nan_is_skipped(tmp_path, dataset_dir, ds, precision):
    proc, out, records = train(tmp_path, dataset_dir, ds, precision, {3, 4}, "--max-steps", 8, "--save-interval", 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3: non-finite loss, update skipped (1 in a row)" in proc.stdout
    assert records[-1]["skipped_steps"] == 2
    assert all(math.isfinite(r["loss"]) for r in records)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in logged if r.get("skipped")]  # a log window of skipped steps has no loss, not 0.0
    assert [r["step"] for r in skipped] == [3, 4] and not any("loss" in r for r in skipped)
    assert "step      3/8 | skipped |" in proc.stdout
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())  # no NaN update reached the weights
    assert records[-1]["loss"] < records[0]["loss"]


def test_nan_streak_aborts_and_keeps_the_last_good_checkpoint(tmp_path, dataset_dir):
    proc, out, _ = train(
        tmp_path,
        dataset_dir,
        "zero2.json",
        "fp32",
        range(5, 100),
        "--max-steps",
        20,
        "--save-interval",
        2,
        "--max-nonfinite-steps",
        3,
    )
    err = [line for line in proc.stderr.strip().splitlines() if line.startswith("error")]
    assert proc.returncode == 3 and len(err) == 1, proc.stderr[-3000:]
    assert "3 non-finite losses in a row at step 7" in err[0] and "step00000004" in err[0] and "--lr" in err[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step"))
    assert saved == ["step00000002", "step00000004"]  # nothing saved during the streak
