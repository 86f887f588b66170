"""Which parameters Muon updates (`dsllm.optimizer.muon_parameters`, and DeepSpeed's own tags agreeing with it) and how
a parameter group with its own learning rate splits into Muon's and AdamW's halves."""

import pytest
import torch

from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.optimizer import check_muon_tags, muon_halves, muon_parameters, param_groups, tag_muon

SHAPE = dict(vocab_size=320, max_seq_len=64, n_layers=2, d_model=32, n_heads=2, mlp_multiple_of=32)
BLOCK_MATRICES = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_the_block_matrices_and_deepspeed_tags_agree(tied):
    from deepspeed import set_optimizer_flags

    model = GPT(ModelConfig(**SHAPE, tie_embeddings=tied, positions="learned"))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in muon_parameters(model)} == BLOCK_MATRICES
    tag_muon(model)
    assert {n for n, p in model.named_parameters() if p.use_muon} == BLOCK_MATRICES

    class Muon:  # what set_optimizer_flags reads of DeepSpeed's config
        optimizer_name, optimizer_params = "muon", {}

    set_optimizer_flags(Muon, model)  # what deepspeed.initialize does: tags by name ("embed", "lm_head": AdamW)
    check_muon_tags(model)
    model.blocks[0].norm1.weight.use_muon = True
    with pytest.raises(RuntimeError, match="blocks.0.norm1.weight"):
        check_muon_tags(model)


def test_a_group_lr_scales_both_halves():
    model = GPT(ModelConfig(**SHAPE, tie_embeddings=False))
    tag_muon(model)
    groups = param_groups(model, 0.1)
    groups[0]["lr"] = 2e-3  # --lr 1e-3 x 2 on the matrices (their AdamW half: the LM head)
    halves = muon_halves(groups, lr=1e-3, muon_lr=0.02)
    assert [(h["name"], h.get("lr")) for h in halves] == [
        ("decay-muon", pytest.approx(0.04)),
        ("decay-adamw", 2e-3),
        ("no_decay-adamw", None),  # no lr of its own: the JSON's lr
    ]
    assert all(p.use_muon for p in halves[0]["params"]) and not any(p.use_muon for h in halves[1:] for p in h["params"])
    assert sum(len(h["params"]) for h in halves) == len(list(model.parameters()))
    assert halves[1]["weight_decay"] == 0.1 and halves[2]["weight_decay"] == 0.0
    assert [id(p) for p in halves[1]["params"]] == [id(model.lm_head.weight)]
    assert isinstance(halves[0]["params"][0], torch.nn.Parameter)
