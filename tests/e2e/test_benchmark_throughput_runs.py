"""benchmarks/throughput.py --quick on 1 and 2 ranks through the engine's own step (Engine.train_batch), with
results files and provenance. Timings on a shared CI machine are noise: only their presence and sign are checked;
memory is not timing and is checked against the ZeRO-2 target."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.multirank
@pytest.mark.slow
def test_quick_throughput_benchmark_on_one_and_two_ranks(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}  # TORCH_EXTENSIONS_DIR as it is; unset: the venv's ops (dsllm/ops.py)
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/throughput.py",
            "--quick",
            "--model.n_layers",
            "2",
            "--ranks",
            "1",
            "2",
            "--precision",
            "bf16",
            "--tag",
            "smoke",
            "--results-dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [json_file] = tmp_path.glob("*-throughput-*-smoke.json")
    md_file, png_file = json_file.with_suffix(".md"), json_file.with_suffix(".png")
    assert md_file.is_file() and png_file.read_bytes()[:4] == b"\x89PNG"
    result = json.loads(json_file.read_text())
    rows = {(row["ranks"], row["variant"]): row for row in result["rows"]}
    assert sorted(rows) == [(r, v) for r in (1, 2) for v in ("plain", "zero0", "zero2")]
    for (ranks, name), row in rows.items():
        assert "error" not in row, row
        assert row["tokens_per_second"] > 0 and row["ratio_to_plain"] > 0 and row["model_state_gib"] > 0, row
        assert row["peak_memory_gib"] > 0 and row["precision"] == "bf16"
        world = 1 if name == "plain" else ranks
        assert row["world_size"] == world and len(row["tokens_per_second_per_rank"]) == world
        assert row["global_batch"] == 4 * ranks  # plain runs one process with micro batch x ranks
        assert row["parameters"] > 1_000_000  # the tiny preset at 2 layers: DeepSpeed's fixed buffers stay small
    assert rows[(1, "plain")]["ratio_to_plain"] == 1.0 and rows[(2, "plain")]["micro_batch"] == 8
    assert rows[(2, "zero2")]["zero_stage"] == 2
    assert rows[(2, "zero2")]["optimizer"].startswith("DeepSpeedZeroOptimizer")  # the engine really ran ZeRO-2
    assert rows[(2, "zero2")]["ds_estimate"]["device_gib"] > 0
    scaling = {m["variant"]: m for m in result["memory_scaling"]}
    assert sorted(scaling) == ["zero0", "zero2"]
    assert 0.95 < scaling["zero0"]["ratio"] < 1.05  # ZeRO-0 keeps everything on every rank
    assert scaling["zero2"]["ratio"] <= 0.6 and scaling["zero2"]["meets_target"] is True  # the target
    # `python -m dsllm plan` (DeepSpeed's estimator) against these measurements: an upper bound, within 35%
    from dsllm.plan import model_state_gib

    params = result["settings"]["models"]["tiny"]["parameters"]
    for ranks in (1, 2):
        estimate = model_state_gib(params, 0, "zero2", ranks, 1)[0]
        assert 0.65 * estimate < rows[(ranks, "zero2")]["model_state_gib"] <= estimate, (ranks, estimate)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert result["git_revision"].startswith(revision)
    markdown = md_file.read_text()
    assert f"git revision: `{result['git_revision']}`" in markdown
    assert "benchmarks/throughput.py --quick" in markdown and result["versions"]["deepspeed"] in markdown
    for ranks, name in rows:
        assert f"x{ranks} | {name} | {1 if name == 'plain' else ranks} |" in markdown
    assert "| zero2 | 2 |" in markdown.split("Model-state memory per rank")[1]
    assert "| plain |" in proc.stdout  # the table on stdout


@pytest.mark.multirank
@pytest.mark.slow
def test_quick_pipeline_tensor_and_sequence_parallel_variants(tmp_path):
    """One benchmark run of the parallel layouts (one plain loop and one ZeRO-0 row for them all): the pipeline
    timed against the 1F1B ideal, tensor and sequence parallelism with their time in collectives."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", "--stages", "0", "--pipeline-stages", "2",
         "--micro-batches", "4", "--tensor-parallel", "2", "--sequence-parallel", "2", "--threads", "1",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    [json_file] = tmp_path.glob("*-throughput-*.json")
    rows = {r["variant"]: r for r in json.loads(json_file.read_text())["rows"]}
    assert sorted(rows) == ["plain", "pp2", "sp2", "tp2", "zero0"]
    row = rows["pp2"]
    assert row["world_size"] == 2 and row["pipeline_stages"] == 2 and row["micro_batches"] == 4
    assert row["global_batch"] == 4 * 4 and row["optimizer"].startswith("DeepSpeedZeroOptimizer")  # ZeRO-1
    assert row["bubble_ideal"] == pytest.approx(1 / 5) and row["ideal_ratio_to_plain"] == pytest.approx(1.6)
    assert row["ratio_to_ideal"] == pytest.approx(row["ratio_to_plain"] / 1.6) and row["target"] == 0.8
    assert "of the 1F1B ideal 1.60" in proc.stdout
    row = rows["tp2"]
    assert row["world_size"] == 2 and row["tensor_parallel"] == 2 and row["global_batch"] == 4  # one replica
    # DeepSpeed's comms logger: the row-parallel all-reduces and the vocabulary-parallel loss, per timed step
    assert 0 < row["comm_seconds_per_step"] < row["median_step_seconds"]
    assert row["comm_fraction"] == pytest.approx(row["comm_seconds_per_step"] / row["median_step_seconds"])
    assert row["plan_gib"] > 0 and "ms/step in collectives" in proc.stdout
    # Ulysses: each of 2 ranks runs half of every window, the same global batch; its all-to-alls apart, by op
    sp2 = rows["sp2"]
    assert sp2["world_size"] == 2 and sp2["sequence_parallel"] == 2 and sp2["global_batch"] == 4
    assert sp2["all_to_all_seconds_per_step"] == sp2["comm_op_seconds_per_step"]["all_to_all_single"] > 0
    assert sp2["all_to_all_seconds_per_step"] < sp2["comm_seconds_per_step"] < sp2["median_step_seconds"]
    assert sp2["plan_gib"] is None and "all-to-all" in proc.stdout


@pytest.mark.parametrize(
    "option, message",
    [
        (["--model.n_layers", "2", "--pipeline-stages", "3"], "more stages than the model's 2 transformer blocks"),
        (["--tensor-parallel", "3"], "--tensor-parallel 3: model.n_heads = 4 is not divisible by 3"),
    ],
    ids=["pipeline-stages", "tensor-parallel"],
)
def test_a_layout_that_cannot_run_is_refused_before_any_worker_starts(tmp_path, option, message):
    bad = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", *option, "--results-dir", str(tmp_path / "bad")],
        cwd=ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert bad.returncode == 2 and message in bad.stderr
    assert not (tmp_path / "bad").exists()
