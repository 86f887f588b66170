"""benchmarks/data_pipeline.py: the CI-sized run (`--quick`) writes a dated .md and .json with every field."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "data_pipeline.py"


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


def test_quick_run_writes_dated_results_with_positive_rates(tmp_path):
    proc = run_benchmark("--quick", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    [json_file] = tmp_path.glob("*.json")
    [md_file] = tmp_path.glob("*.md")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-data-pipeline-[a-z0-9-]+", json_file.stem), json_file.name
    assert md_file.stem == json_file.stem

    result = json.loads(json_file.read_text())
    assert "--quick" in result["command"] and "data_pipeline.py" in result["command"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", result["git_revision"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T[\d:]+", result["date"])
    assert {"python", "torch", "tokenizers", "numpy"} <= set(result["versions"])
    assert result["hardware"]["cpu"] and result["hardware"]["cores"] >= 1 and result["hardware"]["ram_gib"] > 0

    threads = [row["threads"] for row in result["encode"]]
    assert threads[0] == 1 and [row["workers"] for row in result["prepare"]] == threads
    for row in result["encode"] + result["prepare"]:
        assert row["seconds"] > 0 and row["mb_per_second"] > 0 and row["tokens_per_second"] > 0, row
    assert all(row["share_of_raw_encode"] > 0 for row in result["prepare"])
    assert {row["num_workers"] for row in result["loader"]} == {0, 2}
    for row in result["loader"]:
        assert row["tokens_per_second"] > 0 and len(row["headroom"]) == len(result["consumption"]) >= 2, row
    assert [row["num_workers"] for row in result["loader_mixture"]] == [0, 2]  # a 3-source mixture's loader too
    assert all(row["tokens_per_second"] > 0 and row["share_of_single"] > 0 for row in result["loader_mixture"])
    assert result["corpus"]["tokens"] > 0 and result["corpus"]["documents_encoded"] > 0

    markdown = md_file.read_text()
    assert result["git_revision"] in markdown and result["command"] in markdown
    assert "raw encode_batch_fast" in markdown and "prepare end to end" in markdown and "num_workers" in markdown
    assert "a weighted mixture of 3 datasets (0.6/0.3/0.1) vs one dataset" in markdown
    assert markdown in proc.stdout  # the same table is printed


def test_bad_argument_is_one_line_user_error(tmp_path):
    proc = run_benchmark("--quick", "--trials", "0", "--results-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--trials" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())
