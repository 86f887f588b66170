"""benchmarks/quality.py --quick on the test corpus: a run stopped by its CPU-second budget, its dated result
files, and its bits per byte equal to `dsllm evaluate`'s on the same model and validation text."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from runs import dsllm

BUDGET = 7.0  # the process starts in ~3-4 CPU-s (imports, DeepSpeed), then trains


@pytest.fixture(scope="module")
def quick(dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            *("--quick", "--budget", str(BUDGET), "--seeds", "1", "--datasets", ""),
            *("--dataset", f"test={dataset_dir}", "--results-dir", str(root / "results"), "--work-dir", str(root)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    [json_file] = (root / "results").glob("*.json")
    return root, json_file, json.loads(json_file.read_text()), proc


def test_quick_run_writes_dated_result_files(quick):
    root, json_file, result, proc = quick
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-quality-[a-z0-9-]+", json_file.stem), json_file.name
    for suffix in (".md", ".png"):
        assert json_file.with_suffix(suffix).stat().st_size > 0
    [row] = result["rows"]
    assert row["dataset"] == "test" and row["recipe"] == "dsllm-default" and row["seeds"] == 1
    [run] = row["runs"]
    assert "--max-cpu-seconds 7" in run["command"] and "--quick" in result["command"]
    assert f"| test | dsllm-default | {row['bpb_mean']:.4f} |" in json_file.with_suffix(".md").read_text()
    assert "test    dsllm-default: val bpb" in proc.stdout
    # ended by its budget, not by --max-steps: the default's decay took the budget's last 20% (--decay-in-budget);
    # at 7 CPU-s, 1-2 of them training, its step-rate estimate is rough: it ends inside, or is cut in the decay's end
    log = (root / "test/dsllm-default/seed1234/train.log").read_text()
    decided = re.search(r"used: the decay \(1-sqrt to 0.1 x lr\) starts now, over (\d+) steps to step (\d+)\n", log)
    assert decided, log[-2000:]
    steps, end = map(int, decided.groups())
    assert end - max(2, steps // 10) <= run["steps"] <= end < 2000
    assert run["cpu_seconds_at_stop"] < BUDGET + 1 and BUDGET <= run["cpu_seconds"]  # (the tree's, + the last eval)
    # the curve: the trainer's evaluations at their CPU-seconds, which grow, inside the budget
    seconds = [point["seconds"] for point in run["curve"]]
    assert len(seconds) >= 2 and seconds == sorted(seconds) and 0 < seconds[-1] <= BUDGET + 1
    assert all(math.isfinite(point["bpb"]) for point in run["curve"])
    assert run["tokens_seen"] == run["steps"] * 4 * 32  # --quick: micro batch 4 x 32 tokens, one rank


def test_benchmark_bpb_is_dsllm_evaluates_on_the_whole_split(quick, dataset_dir):
    from dsllm.data.format import TokenFile

    _, _, result, _ = quick
    [run] = result["rows"][0]["runs"]
    proc = dsllm("evaluate", "--checkpoint", run["checkpoint"], "--data", dataset_dir)  # the default: whole split
    assert proc.returncode == 0, proc.stderr
    scored = json.loads(proc.stdout)
    assert scored["whole_split"] and scored["tokens"] == TokenFile(dataset_dir / "val").num_tokens - 1
    assert run["val_tokens"] == scored["tokens"] and run["val_bytes"] == scored["bytes"]
    assert run["bpb"] == scored["bits_per_byte"]
    assert run["bpb"] == result["rows"][0]["bpb_mean"] and run["bpb"] < 8  # learned something (random: ~8+)
