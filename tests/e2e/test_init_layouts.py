"""Continued pretraining (`--init`) in every layout, on real ranks (gloo, CPU): each rank builds its part of the
model from the stored weights (`dsllm.model_dir.StoredWeights` in place of a seed, `dsllm.model.initial_value`).
fp32, same global batch: ZeRO-3 on 2 data-parallel ranks, 2 pipeline stages and 2 tensor ranks reproduce the
single-rank run from the same model folder, and 2 expert-parallel ranks the 2 ranks holding every expert; the
stored weights are unlike a fresh initialisation (scaled), so a layout that started from random ones, or from
another part of the model, would show at step 1."""

import json
import math

import pytest
from runs import pretrain, train_records
from test_pipeline import val_losses

STEPS = 4
RUN = ["--max-steps", STEPS, "--grad-accum", 2, "--precision", "fp32", "--eval-interval", STEPS]
RUN += ["--save-interval", STEPS]
DENSE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=64, mlp_multiple_of=32, mlp="swiglu",
             positions="rope", norm="rmsnorm", bias=False, tie_embeddings=False)  # fmt: skip
SPARSE = dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=64, mlp_multiple_of=32, moe_experts=4, moe_top_k=2)


def stored_model(path, dataset_dir, **fields) -> None:
    """A model folder of the test dataset's tokenizer whose weights are a fresh GPT's x 5: logits far from a fresh
    model's near-uniform ones."""
    import torch

    from dsllm.model import GPT
    from dsllm.model_config import ModelConfig
    from dsllm.model_dir import save_model_dir

    torch.manual_seed(11)
    vocab = json.loads((dataset_dir / "meta.json").read_text())["tokenizer"]["vocab_size"]
    model = GPT(ModelConfig(vocab_size=vocab, **fields))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    save_model_dir(model, path, dataset_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def folders(dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("init-layouts")
    stored_model(root / "dense", dataset_dir, **DENSE)
    stored_model(root / "sparse", dataset_dir, **SPARSE)
    return root


def run(dataset_dir, folders, tmp_path, name, model, *layout, micro=4, ranks=2, ds="zero1.json"):
    out = tmp_path / name
    proc = pretrain(dataset_dir, out, "--init", folders / model, *RUN, "--micro-batch-size", micro, *layout,
                    ranks=ranks, ds=ds, model=())  # fmt: skip
    assert f"starting from the weights of {folders / model}" in proc.stdout
    return out


@pytest.fixture(scope="module")
def dense_reference(dataset_dir, folders, tmp_path_factory):
    """One rank, ZeRO-1, the whole model: the run every dense layout must reproduce."""
    return run(dataset_dir, folders, tmp_path_factory.mktemp("ref"), "one-rank", "dense", ranks=1)


def same_run(out, reference) -> None:
    ours, theirs = train_records(out), train_records(reference)
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:
        assert ours[step]["loss"] == pytest.approx(theirs[step]["loss"], rel=1e-5), step
    assert val_losses(out)[STEPS] == pytest.approx(val_losses(reference)[STEPS], rel=1e-5)


@pytest.mark.slow
def test_the_reference_starts_from_the_stored_weights(dataset_dir, dense_reference):
    vocab = json.loads((dataset_dir / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert train_records(dense_reference)[1]["loss"] > 1.2 * math.log(vocab)  # a fresh model starts near log V


@pytest.mark.multirank
@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        pytest.param({"ds": "zero3.json", "micro": 2}, id="zero3"),
        pytest.param({"args": ("--pipeline-parallel", 2)}, id="pipeline"),
        pytest.param({"args": ("--tensor-parallel", 2)}, id="tensor"),
    ],
)
def test_a_dense_layout_continues_as_one_rank_does(dataset_dir, folders, dense_reference, tmp_path, layout):
    ds, micro = layout.get("ds", "zero1.json"), layout.get("micro", 4)
    out = run(dataset_dir, folders, tmp_path, "layout", "dense", *layout.get("args", ()), micro=micro, ds=ds)
    same_run(out, dense_reference)


@pytest.mark.multirank
@pytest.mark.slow
def test_expert_ranks_continue_as_ranks_holding_every_expert(dataset_dir, folders, tmp_path):
    reference = run(dataset_dir, folders, tmp_path, "replicated", "sparse", micro=2)
    split = run(dataset_dir, folders, tmp_path, "split", "sparse", "--expert-parallel", 2, micro=2)
    same_run(split, reference)
    first = train_records(reference)[1]["loss"]
    assert first > 1.2 * math.log(json.loads((folders / "sparse" / "config.json").read_text())["model"]["vocab_size"])
