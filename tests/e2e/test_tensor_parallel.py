"""Tensor parallelism on real ranks (gloo, CPU): DeepSpeed's AutoTP splits the GPT's heads, MLP columns and
vocabulary over 2 ranks. fp32, same global batch and seed: TP=2 reproduces the single-rank curve and validation
loss (tied head: vocabulary-parallel embedding, head and cross-entropy; untied SwiGLU/RoPE/GQA: [q|k|v] and
[gate|up] sub-parameter shards); the final weights, merged through DeepSpeed's universal checkpoint, are a model
folder `dsllm evaluate` scores as the run did and `dsllm export` turns into a Hugging Face model; kill -9 and
--resume auto continue exactly, and the checkpoint resumes on one rank without tensor parallelism."""

import json

import pytest
import torch
from runs import (
    LAYOUT_MODELS,
    LAYOUT_RUN,
    LAYOUT_STEPS,
    dsllm,
    exported_logit_diff,
    killed_then_resumed,
    pretrain,
    same_curve,
    train_records,
)
from test_pipeline import val_losses

from dsllm.safe_load import weights_only_loads


@pytest.fixture(scope="module")
def tensor(dataset_dir, tmp_path_factory):
    """The TP=2 runs (2 ranks, ZeRO-1), one per model: {name: (run folder, the trainer's stdout)}."""
    runs = {}
    for name, model in LAYOUT_MODELS.items():
        out = tmp_path_factory.mktemp("tp2") / "run"
        proc = pretrain(dataset_dir, out, *LAYOUT_RUN, *model, "--tensor-parallel", 2, ranks=2, ds="zero1.json")
        runs[name] = out, proc.stdout
    return runs


@pytest.mark.multirank
@pytest.mark.parametrize("model", LAYOUT_MODELS)
def test_two_tensor_ranks_reproduce_the_single_rank_run(dataset_dir, single, tensor, tmp_path, model):
    out, stdout = tensor[model]
    assert "(2 tensor-parallel x 1 data-parallel; tensor groups: ranks 0-1), ZeRO-1, fp32" in stdout
    same_curve(out, single[model])
    ours, theirs = val_losses(out), val_losses(single[model])
    assert sorted(ours) == [10, 20] and all(ours[s] == pytest.approx(theirs[s], rel=1e-5) for s in ours)
    tag = out / "checkpoints" / "step00000020"
    marker = json.loads((tag / "dsllm_complete.json").read_text())
    assert marker["tensor_parallel"] == 2
    # each tensor rank saved its shard: half the vocabulary rows of the embedding and of an untied head
    vocab = marker["model"]["vocab_size"]
    for rank in (0, 1):
        with weights_only_loads():
            module = torch.load(tag / f"mp_rank_0{rank}_model_states.pt", map_location="cpu")["module"]
        assert module["tok_embeddings.weight"].shape[0] == vocab // 2
        assert module["lm_head.weight"].shape[0] == vocab // 2
    # the merged weights are the model the run validated
    scored = dsllm("evaluate", "--checkpoint", out, "--data", dataset_dir, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(ours[20], rel=1e-5)
    if model == "llama":
        assert exported_logit_diff(out, tmp_path / "hf") < 1e-4


@pytest.mark.multirank
@pytest.mark.slow
def test_kill_9_then_resume_continues_exactly_and_on_one_rank_too(dataset_dir, single, tensor, tmp_path):
    out = tmp_path / "killed"
    killed_then_resumed(dataset_dir, out, *LAYOUT_RUN, "--tensor-parallel", 2, ranks=2, ds="zero1.json")
    same_curve(out, single["tied"])
    uninterrupted, records = train_records(tensor["tied"][0]), train_records(out)
    assert all(records[s]["loss"] == uninterrupted[s]["loss"] for s in records)  # bit for bit
    # another layout: the TP=2 checkpoint of step 12 continues on one rank (universal checkpoint: shards merged)
    other = tmp_path / "one-rank"
    moved = pretrain(dataset_dir, other, *LAYOUT_RUN, "--resume", out / "checkpoints" / "step00000012", ds="zero1.json")
    assert "through a universal checkpoint" in moved.stdout and "at step 12 " in moved.stdout
    ours, theirs = train_records(other), train_records(single["tied"])
    assert sorted(ours) == list(range(13, LAYOUT_STEPS + 1))
    assert all(ours[s]["loss"] == pytest.approx(theirs[s]["loss"], rel=1e-5) for s in ours)


@pytest.mark.multirank
@pytest.mark.slow
def test_two_tensor_ranks_by_two_replicas_reproduce_the_single_rank_run(dataset_dir, single, tmp_path):
    """4 ranks: replica d holds ranks 2d and 2d+1 (AutoTP's mesh numbers the tensor axis fastest); each replica
    reads half of every micro batch. Micro 2 x 2 accumulation x 2 replicas is the reference's global batch of 8."""
    out = tmp_path / "run"
    proc = pretrain(
        dataset_dir, out, *LAYOUT_RUN, "--micro-batch-size", 2, "--tensor-parallel", 2, ranks=4, ds="zero1.json"
    )
    assert "on 4 rank(s) (2 tensor-parallel x 2 data-parallel; tensor groups: ranks 0-1, 2-3)" in proc.stdout
    same_curve(out, single["tied"])
    assert val_losses(out)[20] == pytest.approx(val_losses(single["tied"])[20], rel=1e-5)


@pytest.mark.multirank
@pytest.mark.slow
def test_3d_reproduces_the_single_rank_run_and_resumes_on_another_layout(dataset_dir, single, tmp_path):
    """4 ranks: 2 pipeline stages x 2 tensor-parallel ranks (AutoTP splits each stage's layers on the pipeline's
    pipe x data x model grid). The curve and validation loss are the single-rank run's; the weights, merged
    through the universal checkpoint from 4 stage x tensor shards, score as the run did; and the step-12 checkpoint
    continues on 2 ranks as 2 stages without tensor parallelism, on the same curve."""
    out = tmp_path / "run"
    proc = pretrain(
        dataset_dir, out, *LAYOUT_RUN, "--pipeline-parallel", 2, "--tensor-parallel", 2, ranks=4, ds="zero1.json"
    )
    assert "on 4 rank(s) (2 pipeline stages x 2 tensor-parallel x 1 data-parallel; tensor groups: ranks 0-1, 2-3)" in (
        proc.stdout
    )
    same_curve(out, single["tied"])
    assert val_losses(out)[20] == pytest.approx(val_losses(single["tied"])[20], rel=1e-5)
    tag = out / "checkpoints" / "step00000020"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_0_mp_rank_*")) == [
        f"zero_pp_rank_0_mp_rank_0{i}_optim_states.pt" for i in range(4)
    ]  # one per stage x tensor rank (DeepSpeed numbered them by tensor rank: the stages overwrote each other's)
    assert stage_shards(tag) == {"0": ["tok.weight"]}  # the (tied) embedding: half the vocabulary on each
    scored = dsllm("evaluate", "--checkpoint", out, "--data", dataset_dir, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(val_losses(out)[20], rel=1e-5)
    other = tmp_path / "pp2"
    step12 = out / "checkpoints" / "step00000012"
    moved = pretrain(
        dataset_dir, other, *LAYOUT_RUN, "--pipeline-parallel", 2, "--resume", step12, ranks=2, ds="zero1.json"
    )
    assert "through a universal checkpoint" in moved.stdout and "at step 12 " in moved.stdout
    ours, theirs = train_records(other), train_records(single["tied"])
    assert sorted(ours) == list(range(13, LAYOUT_STEPS + 1))
    assert all(ours[s]["loss"] == pytest.approx(theirs[s]["loss"], rel=1e-5) for s in ours)


def stage_shards(tag) -> dict[str, list[str]]:
    """The pipeline layers' weights of a 3D checkpoint that each tensor rank holds half the vocabulary rows of:
    {layer index: [names]}, checked equal on both tensor ranks."""
    vocab = json.loads((tag / "dsllm_complete.json").read_text())["model"]["vocab_size"]
    found = {}
    with weights_only_loads():
        for rank in (0, 1):
            shards = {}
            for path in sorted(tag.glob(f"layer_*-model_0{rank}-model_states.pt")):
                state = torch.load(path, map_location="cpu")
                names = [k for k, v in state.items() if v.shape[0] == vocab // 2]
                if names:
                    shards[path.name.split("-")[0].removeprefix("layer_").lstrip("0") or "0"] = names
            found[rank] = shards
    assert found[0] == found[1]
    return found[0]


@pytest.mark.multirank
@pytest.mark.slow
def test_3d_splits_an_untied_embedding_and_head_over_the_vocabulary(dataset_dir, single, tmp_path):
    """PP=2 x TP=2, Llama-style (untied): the first stage's embedding and the last stage's head are split over the
    vocabulary on each stage's tensor ranks (the head's logits gathered for the pipeline's loss), on the single-rank
    curve; the merged weights score as the run did."""
    out = tmp_path / "run"
    model = LAYOUT_MODELS["llama"]
    pretrain(
        dataset_dir,
        out,
        *LAYOUT_RUN,
        *model,
        "--pipeline-parallel",
        2,
        "--tensor-parallel",
        2,
        ranks=4,
        ds="zero1.json",
    )
    same_curve(out, single["llama"])
    assert val_losses(out)[20] == pytest.approx(val_losses(single["llama"])[20], rel=1e-5)
    assert stage_shards(out / "checkpoints" / "step00000020") == {"0": ["tok.weight"], "4": ["head.weight"]}
    scored = dsllm("evaluate", "--checkpoint", out, "--data", dataset_dir, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["loss"] == pytest.approx(val_losses(out)[20], rel=1e-5)


RECIPE = [*LAYOUT_MODELS["llama"], "--model.qk_norm", "true", "--model.mlp", "relu2", "--model.logit_softcap", 4]
RECIPE += ["--embedding-lr-scale", 2, "--head-lr-scale", 0.5, "--embedding-weight-decay", 0.05]
RECIPE += [*LAYOUT_RUN, "--sample-tokens", 0]


@pytest.mark.multirank
@pytest.mark.slow
def test_the_recipe_options_on_two_tensor_ranks_killed_and_resumed_give_the_single_rank_run(dataset_dir, tmp_path):
    """QK-norm (its scales replicated, their gradients summed over the ranks that hold the heads), relu2 (a plain
    column split), soft-capped vocabulary-parallel logits, and the embedding and head lr / weight-decay groups
    (shards of the vocabulary) give the single rank's curve on 2 tensor ranks, through a kill -9 and a resume (the
    groups' lrs and optimizer state come back from the checkpoint): one killed run checks both, to save a run."""
    single, killed = tmp_path / "single", tmp_path / "killed"
    pretrain(dataset_dir, single, *RECIPE, ds="zero1.json")
    killed_then_resumed(dataset_dir, killed, *RECIPE, "--tensor-parallel", 2, ranks=2, ds="zero1.json")
    same_curve(killed, single)
    assert val_losses(killed)[20] == pytest.approx(val_losses(single)[20], rel=1e-5)
