"""Pipeline parallelism on real ranks (gloo, CPU): DeepSpeed's PipelineModule/PipelineEngine (1F1B) trains the
same GPT. fp32, same global batch and seed: PP=2 reproduces the single-rank curve and validation loss; its final
weights consolidate from the per-layer checkpoint files into a model folder that `dsllm evaluate` scores as the
run did and `dsllm export` turns into a Hugging Face model; kill -9 and --resume auto continue the curve exactly.
"""

import json
import shutil

import pytest
from runs import (
    LAYOUT_MODELS,
    LAYOUT_RUN,
    LAYOUT_STEPS,
    dsllm,
    exported_logit_diff,
    killed_then_resumed,
    pretrain,
    train_records,
)

STEPS = LAYOUT_STEPS
# 2 micro batches of 4 per step (the 1F1B schedule has a micro batch in flight on each stage), an evaluation every
# 10 steps, a checkpoint every 4: the runs the session's `single` fixture (tests/conftest.py) made on one rank
RUN = LAYOUT_RUN


def val_losses(out) -> dict:
    return {
        r["step"]: r["val_loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if "val_loss" in r
    }


@pytest.mark.multirank
@pytest.mark.parametrize("model", LAYOUT_MODELS)  # a tied head; an untied one (Llama-shaped: RoPE, SwiGLU, GQA)
def test_two_stages_reproduce_the_single_rank_run(dataset_dir, single, tmp_path, model):
    out = tmp_path / "run"
    proc = pretrain(dataset_dir, out, *RUN, *LAYOUT_MODELS[model], "--pipeline-parallel", 2, ranks=2, ds="zero1.json")
    assert "on 2 rank(s) (2 pipeline stages x 1 data-parallel), ZeRO-1, fp32" in proc.stdout
    reference, records = train_records(single[model]), train_records(out)
    assert sorted(records) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
        assert records[step]["lr"] == pytest.approx(reference[step]["lr"], rel=1e-9)
    ours, theirs = val_losses(out), val_losses(single[model])
    assert sorted(ours) == [10, 20] and all(ours[s] == pytest.approx(theirs[s], rel=1e-5) for s in ours)
    # the final weights, gathered from the stages' layer files, are the model the run validated
    marker = json.loads((out / "checkpoints" / "step00000020" / "dsllm_complete.json").read_text())
    assert marker["pipeline_stages"] == 2
    assert "sample:" in proc.stdout
    # (tests/runs.py runs with --eval-windows 8)
    scored = dsllm("evaluate", "--checkpoint", out, "--data", dataset_dir, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(ours[20], rel=1e-5)
    if model == "llama":  # the untied head is a layer file of its own
        assert (out / "checkpoints" / "step00000020" / "layer_04-model_states.pt").is_file()
        assert exported_logit_diff(out, tmp_path / "hf") < 1e-4


@pytest.mark.multirank
@pytest.mark.parametrize("checkpointing", ["torch", "deepspeed"])
def test_activation_checkpointing_per_stage_keeps_the_curve(dataset_dir, single, tmp_path, checkpointing):
    """Each stage recomputes its blocks in backward (tests/unit/test_pipeline_layout.py counts the recomputes):
    the same losses as the single-rank run without it."""
    out = tmp_path / "run"
    args = [*RUN, "--sample-tokens", 0, "--model.activation_checkpointing", checkpointing, "--pipeline-parallel", 2]
    pretrain(dataset_dir, out, *args, ranks=2, ds="zero1.json")
    reference, records = train_records(single["tied"]), train_records(out)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(records[s]["loss"] == pytest.approx(reference[s]["loss"], rel=1e-5) for s in records)


@pytest.mark.multirank
@pytest.mark.slow
def test_kill_9_then_resume_continues_the_pipeline_run_exactly(dataset_dir, single, tmp_path):
    out = tmp_path / "killed"
    killed_then_resumed(dataset_dir, out, *RUN, "--pipeline-parallel", 2, ranks=2, ds="zero1.json")
    reference, records = train_records(single["tied"]), train_records(out)
    for step in range(1, STEPS + 1):
        assert records[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5), step
    # other layouts continue step 12 (the newest 3 of the checkpoints every 4 steps are kept) through the universal
    # checkpoint, on the same curve: 2 replicas of the 2 stages (4 ranks, micro 2: the same global batch), one rank
    # without a pipeline (the layers' parameter names renamed to GPT's), and back: the single-rank run's step 12 as
    # 2 stages
    step12 = out / "checkpoints" / "step00000012"
    reference_copy = tmp_path / "single"  # the session's run stays as it was (a resume caches its universal form)
    shutil.copytree(single["tied"], reference_copy)
    layouts = {
        "wider": (step12, ["--micro-batch-size", 2, "--pipeline-parallel", 2], 4),
        "one-rank": (step12, [], 1),
        "staged": (reference_copy / "checkpoints" / "step00000012", ["--pipeline-parallel", 2], 2),
    }
    for name, (checkpoint, layout, ranks) in layouts.items():
        moved = pretrain(
            dataset_dir, tmp_path / name, *RUN, *layout, "--resume", checkpoint, ranks=ranks, ds="zero1.json"
        )
        assert "through a universal checkpoint" in moved.stdout and "at step 12 " in moved.stdout, name
        records = train_records(tmp_path / name)
        assert sorted(records) == list(range(13, STEPS + 1)), name
        assert all(records[s]["loss"] == pytest.approx(reference[s]["loss"], rel=1e-5) for s in records), name
        assert val_losses(tmp_path / name)[STEPS] == pytest.approx(val_losses(single["tied"])[STEPS], rel=1e-5), name
        if name == "wider":
            # 4 ranks: stage s holds ranks 2s and 2s+1 (DeepSpeed's grid numbers the data axis fastest); each replica
            # reads half of every micro batch. Micro 2 x 2 micro batches x 2 replicas is the reference's global batch
            # of 8: steps 13-20 of 2 stages x 2 replicas are the single rank's (the first 12 steps of 2 stages are
            # test_two_stages_reproduce_the_single_rank_run's)
            banner = "on 4 rank(s) (2 pipeline stages x 2 data-parallel), ZeRO-1, fp32, global batch 8 x 32"
            assert banner in moved.stdout
    assert (out / "checkpoints" / "step00000012-universal-gpt" / "zero" / "blocks.1.attn.qkv.weight").is_dir()
