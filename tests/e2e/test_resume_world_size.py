"""Resume on another world size or ZeRO stage through DeepSpeed's universal checkpoint: the loss
curve, learning-rate schedule, step count and data position continue."""

import json
import shutil

import pytest
from runs import SAME_BATCH_ARGS, pretrain, train_records

ARGS = SAME_BATCH_ARGS


def checkpoint_at_step_4(source, target):
    """The run folder as it was after step 4 (what a stopped run leaves)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step00000008")
    (target / "model.safetensors").unlink()
    lines = (target / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 4))


@pytest.mark.parametrize(
    "saved, resumed",
    [
        ((2, "zero2.json"), (1, "zero2.json")),
        ((1, "zero2.json"), (2, "zero2.json")),
        pytest.param((2, "zero2.json"), (2, "zero1.json"), marks=pytest.mark.slow),
        ((2, "zero0.json"), (1, "zero0.json")),  # ZeRO-0 holds whole state: a plain load
    ],
)
@pytest.mark.multirank  # every case saves or resumes on 2 ranks
def test_curve_continues(dataset_dir, tmp_path, shared_run, saved, resumed):
    """Same global batch (8) on both sides; fp32 losses agree to 1e-5 relative (float summation order
    differs between world sizes; measured differences are ~1e-7). The saved runs are the session's: 2 ranks of
    ZeRO-2 serve two cases here and test_pretrain.py's comparison of world sizes."""
    (saved_ranks, saved_ds), (resumed_ranks, resumed_ds) = saved, resumed
    whole = shared_run(*ARGS, "--micro-batch-size", 8 // saved_ranks, ranks=saved_ranks, ds=saved_ds)
    out = tmp_path / "resumed"
    checkpoint_at_step_4(whole, out)
    proc = pretrain(
        dataset_dir, out, *ARGS, "--micro-batch-size", 8 // resumed_ranks, ranks=resumed_ranks, ds=resumed_ds
    )
    universal = saved != resumed and saved_ds != "zero0.json"
    assert ("through a universal checkpoint" in proc.stdout) == universal
    assert "at step 4 (32 samples consumed)" in proc.stdout
    reference, continued = train_records(whole), train_records(out)
    for step in range(5, 9):
        assert continued[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert continued[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9)
        assert continued[step]["samples"] == reference[step]["samples"]
    assert (
        json.loads((out / "checkpoints" / "step00000008" / "dsllm_complete.json").read_text())["world_size"]
        == resumed_ranks
    )


def test_zero2_to_zero3_is_refused_with_what_to_do(dataset_dir, tmp_path):
    out = tmp_path / "run"
    pretrain(dataset_dir, out, "--max-steps", 2, "--save-interval", 2, "--micro-batch-size", 4)
    proc = pretrain(dataset_dir, out, "--max-steps", 4, "--micro-batch-size", 4, ds="zero3.json", expect=2)
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert "cannot be resumed on ZeRO-3" in proc.stderr and "resume on ZeRO-1 or ZeRO-2" in proc.stderr
    proc = pretrain(dataset_dir, out, "--max-steps", 4, "--micro-batch-size", 4, ds="zero0.json", expect=2)
    assert "resume with ZeRO-2" in proc.stderr


@pytest.mark.parametrize(
    "ranks, ds",
    [
        pytest.param(
            2, "zero3.json", marks=pytest.mark.multirank
        ),  # (2 ranks of ZeRO-2: its weights are whole in each)
        (1, "zero0.json"),
    ],
)
def test_consolidate_and_export_from_any_checkpoint(dataset_dir, tmp_path, ranks, ds):
    """`zero_to_fp32` from a sharded checkpoint gives the weights the run ended with; export reads it too."""
    import subprocess
    import sys

    import torch
    from conftest import ROOT
    from safetensors.torch import load_file

    out = tmp_path / "run"
    pretrain(
        dataset_dir,
        out,
        "--max-steps",
        4,
        "--save-interval",
        2,
        "--micro-batch-size",
        8 // ranks,
        "--precision",
        "fp32",
        ranks=ranks,
        ds=ds,
    )
    final = load_file(out / "model.safetensors")
    merged = tmp_path / "merged"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm",
            "consolidate",
            "--checkpoint",
            str(out / "checkpoints" / "step00000004"),
            "--output",
            str(merged),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    weights = load_file(merged / "model.safetensors")
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)
    earlier = tmp_path / "earlier"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm",
            "consolidate",
            "--checkpoint",
            str(out / "checkpoints" / "step00000002"),
            "--output",
            str(earlier),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    assert not torch.equal(load_file(earlier / "model.safetensors")["norm.weight"], final["norm.weight"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm",
            "export",
            "--checkpoint",
            str(out / "checkpoints" / "step00000002"),
            "--output",
            str(tmp_path / "hf"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "LlamaForCausalLM" in proc.stdout, proc.stderr[-2000:]
