"""Mixture-of-Experts blocks (DeepSpeed's MoE layer over the model's own MLP): the options are checked with one
line each; parameter counts (total and active) match the built model; every expert starts from its own values,
the same whichever rank holds it; the load-balancing loss is part of the training loss only; the routing
statistics count what DeepSpeed's router did."""

import re

import pytest
import torch

from dsllm.errors import UserError
from dsllm.experts import expert_names
from dsllm.model import GPT
from dsllm.model_config import ConfigError, resolve_model_config

SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "mlp_multiple_of": 32}


def moe(**overrides):
    return resolve_model_config("tiny", {**SMALL, "moe_experts": 4, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe_experts": 1}, "model.moe_experts = 1: use 0 (dense) or at least 2 experts"),
        ({"moe_top_k": 3}, "model.moe_top_k = 3: DeepSpeed's MoE routes each token to 1 or 2 experts; use 1 or 2"),
        ({"moe_every": 3}, "model.moe_every = 3: must be 1 (every block sparse) to n_layers = 2"),
        ({"moe_capacity_factor": 0}, "model.moe_capacity_factor must be positive"),
        ({"activation_checkpointing": "deepspeed"}, "drop the load-balancing loss's gradient"),
    ],
)
def test_bad_moe_options_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as caught:
        moe(**overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("every, top_k, mlp", [(1, 2, "swiglu"), (2, 1, "gelu")])
def test_counts_match_the_built_model(every, top_k, mlp):
    config = moe(moe_every=every, moe_top_k=top_k, mlp=mlp)
    gpt = GPT(config, seed=0)
    assert config.num_parameters() == sum(p.numel() for p in gpt.parameters())
    assert [config.is_sparse(i) for i in range(2)] == ([True, True] if every == 1 else [False, True])
    dense = resolve_model_config("tiny", {**SMALL, "mlp": mlp}).num_parameters()
    expert = sum(p.numel() for p in gpt.moe_layers()[0].deepspeed_moe.experts.deepspeed_experts[0].parameters())
    router = 64 * 4
    assert config.num_parameters(active=True) == dense + config.sparse_blocks * ((top_k - 1) * expert + router)


def test_each_expert_starts_apart_and_the_same_on_whichever_rank_holds_it():
    config = moe()
    whole = GPT(config, seed=7)
    experts = whole.blocks[1].mlp.deepspeed_moe.experts.deepspeed_experts
    assert not torch.equal(experts[0].fc.weight, experts[1].fc.weight)  # DeepSpeed deep-copies one expert
    second_half = GPT(config, seed=7, expert_parallel=2, expert_rank=1)  # experts 2 and 3, numbered 0 and 1 there
    local = second_half.blocks[1].mlp.deepspeed_moe.experts.deepspeed_experts
    assert len(local) == 2 and torch.equal(local[0].fc.weight, experts[2].fc.weight)
    assert torch.equal(local[1].proj.weight, experts[3].proj.weight)
    assert torch.equal(second_half.blocks[1].attn.qkv.weight, whole.blocks[1].attn.qkv.weight)
    assert expert_names("blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.1.fc.weight", 2) == (
        "blocks.1.mlp.experts.3.fc.weight"
    )
    assert expert_names("blocks.0.mlp.deepspeed_moe.gate.wg.weight") == "blocks.0.mlp.router.weight"


def test_the_load_balancing_loss_is_trained_and_not_evaluated():
    idx = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for coef in (0.0, 0.5):
        gpt = GPT(moe(moe_aux_loss_coef=coef), seed=3).train()
        torch.manual_seed(1)  # the router's random choices (second expert, dropped tokens)
        logits, loss = gpt(idx, idx)
        losses[coef] = (loss, gpt.moe_stats()["aux_loss"])
        if coef:
            loss.backward()
            assert gpt.moe_layers()[0].deepspeed_moe.gate.wg.weight.grad.abs().sum() > 0
            gpt.eval()
            logits, loss = gpt(idx, idx)
            assert float(loss) == pytest.approx(float(gpt.loss_function(logits.detach(), shift_labels=idx)))
    (plain, aux), (weighted, aux_again) = losses[0.0], losses[0.5]
    assert aux == pytest.approx(aux_again) and aux > 0
    assert float(weighted.detach()) == pytest.approx(float(plain.detach()) + 0.5 * aux, rel=1e-6)


def test_routing_statistics():
    idx = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    roomy = GPT(moe(moe_capacity_factor=8.0), seed=3).train()
    roomy(idx, idx)
    stats = roomy.moe_stats()
    assert stats["dropped_fraction"] == 0.0
    assert 0 < stats["expert_share_min"] <= 0.25 <= stats["expert_share_max"] < 1
    tight = GPT(moe(moe_capacity_factor=0.25, moe_min_capacity=0), seed=3).train()
    tight(idx, idx)
    # 128 tokens x top-2 = 256 routes over 4 experts; capacity ceil(128 / 4 x 0.25 x 2) = 16 kept by each
    counts = torch.stack([layer.deepspeed_moe.exp_counts for layer in tight.moe_layers()])
    assert int(counts.sum()) == 2 * 256
    expected = float((counts - 16).clamp(min=0).sum()) / 512
    assert tight.moe_stats()["dropped_fraction"] == pytest.approx(expected) and expected > 0.5
    assert GPT(resolve_model_config("tiny", SMALL), seed=0).moe_stats() is None


def test_flops_count_the_experts_a_token_goes_through():
    from dsllm.model import flops_per_token

    dense, sparse = resolve_model_config("tiny", SMALL), moe(moe_top_k=1)
    router = 6 * 2 * 64 * 4  # 6 x (2 sparse blocks x d_model x 4 experts)
    assert flops_per_token(sparse, 32) == flops_per_token(dense, 32) + router  # top-1: one MLP, as dense
    two = moe(moe_top_k=2)
    mlp = 64 * two.mlp_hidden_size * 3  # SwiGLU: gate, up, down
    assert flops_per_token(two, 32) == flops_per_token(dense, 32) + router + 6 * 2 * mlp


def test_presets():
    """Mixtral-8x7B's published count (46,702,792,704; 12.9B active), and the CPU demo as built."""
    mixtral = resolve_model_config("mixtral-8x7b")
    assert mixtral.num_parameters() == 46_702_792_704
    assert round(mixtral.num_parameters(active=True) / 1e9, 1) == 12.9
    tiny = resolve_model_config("tiny-moe")
    assert tiny.num_parameters() == sum(p.numel() for p in GPT(tiny, seed=0).parameters())
    assert tiny.sparse_blocks == tiny.n_layers and tiny.moe_top_k == 2


def test_plan_counts_active_parameters_and_offers_only_what_runs():
    """`dsllm plan` for Mixtral's shape: the speed from the active parameters, no ZeRO-3 rows (DeepSpeed trains MoE
    layers on ZeRO-0/1/2) and no tensor/pipeline layouts (not for MoE blocks yet), said in the advice."""
    from dsllm.plan import parse_gpus, plan, render

    gpus, h100 = parse_gpus("8xH100")
    config = resolve_model_config("mixtral-8x7b")
    result = plan(config, gpus, h100, nodes=2, seq_len=4096, host_ram_gib=2048)
    assert result["active_parameters"] == config.num_parameters(active=True) < result["parameters"]
    assert [r["config"] for r in result["configs"]] == ["zero0", "zero1", "zero2", "zero2_offload"]
    assert result["layouts"] == []
    dense = plan(resolve_model_config("llama-7b"), gpus, h100, nodes=2, seq_len=4096, host_ram_gib=2048)
    # throughput follows the FLOPs of the parameters a token goes through: 12.9B active vs 7.2B dense
    ratio = dense["tokens_per_second"] / result["tokens_per_second"]
    assert 1.5 < ratio < 1.8
    text = render(result, "mixtral-8x7b", "--host-ram-gib")
    assert "12,879,925,248 active per token" in text and "do not take Mixture-of-Experts blocks yet" in text


def test_plan_with_expert_parallelism_counts_a_gpus_share_of_the_experts():
    """`dsllm plan --expert-parallel 8`: each GPU holds 1/8 of the experts, ZeRO-partitioned over the 2 of 16 GPUs
    holding the same ones, and the rest of the model as before; the host builds only its share."""
    from dsllm.plan import main, model_state_gib, parse_gpus, plan, render

    gpus, h100 = parse_gpus("8xH100")
    config = resolve_model_config("mixtral-8x7b")
    assert config.expert_parameters == 32 * 8 * 3 * 4096 * 14336  # 32 sparse blocks x 8 SwiGLU experts
    whole = plan(config, gpus, h100, nodes=2, seq_len=4096, host_ram_gib=2048)
    split = plan(config, gpus, h100, nodes=2, seq_len=4096, host_ram_gib=2048, expert_parallel=8)
    rows = {row["config"]: row for row in split["configs"]}
    dense, experts = config.num_parameters() - config.expert_parameters, config.expert_parameters // 8
    expected = model_state_gib(dense, 1, "zero2", 8, 2)[0] + model_state_gib(experts, 1, "zero2", 2, 1)[0]
    assert rows["zero2"]["model_states_gib"] == pytest.approx(expected)
    before = {row["config"]: row for row in whole["configs"]}
    assert rows["zero1"]["model_states_gib"] < before["zero1"]["model_states_gib"] / 6
    assert rows["zero2"]["host_gib_per_node"] < before["zero2"]["host_gib_per_node"] / 6
    assert split["recommended"]["config"] == "zero2" and whole["recommended"] is None
    assert "the experts split over 8 GPUs" in render(split, "mixtral-8x7b", "--host-ram-gib")
    for flags, message in (
        (["--expert-parallel", "3"], "the 8 experts of a sparse block do not split evenly over 3 GPUs"),
        (["--gpus", "6xH100", "--expert-parallel", "4"], "the 6 GPU(s) do not divide into groups of 4"),
        (["--model", "llama-7b", "--expert-parallel", "2"], "the model has no experts to split"),
    ):
        args = ["--model", "mixtral-8x7b", "--gpus", "8xH100", "--host-ram-gib", "2048", *flags]
        with pytest.raises(UserError, match=re.escape(message)):
            main(args)
