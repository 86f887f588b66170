"""The modern recipe's model options (issue 16): QK-norm, the squared-ReLU MLP, logit soft-capping and z-loss each
compute what their docstring says, count in the analytic parameter total, survive a model folder round trip, and
give the same logits when the pipeline builds the model in pieces."""

import functools

import pytest
import torch
import torch.nn.functional as F

import dsllm.model
from dsllm.model import GPT, causal_lm_loss
from dsllm.model_config import ConfigError, ModelConfig, continued_model_config, resolve_model_config
from dsllm.model_dir import load_model_dir, save_model_dir

SMALL = dict(vocab_size=97, max_seq_len=32, n_layers=2, d_model=32, n_heads=4, mlp_multiple_of=16)
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False)
IDX = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(0))


def rotary_inputs(model, monkeypatch) -> list:
    """The q and k of every apply_rotary call of a forward (what RoPE rotates)."""
    seen = []
    rotate = dsllm.model.apply_rotary

    def spy(x, cos, sin):
        seen.append(x.detach())
        return rotate(x, cos, sin)

    monkeypatch.setattr(dsllm.model, "apply_rotary", spy)
    model(IDX)
    return seen


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_qk_norm_gives_each_heads_queries_and_keys_unit_scale_before_rope(monkeypatch, norm):
    fields = {**SMALL, **LLAMA, "norm": norm, "bias": norm == "layernorm", "norm_eps": 1e-10}
    model = GPT(ModelConfig(**fields, qk_norm=True), seed=1).eval()
    attn = model.blocks[0].attn
    assert torch.equal(attn.q_norm.weight, torch.ones(8))  # a norm's initial value, one per head dimension
    scale = torch.linspace(0.5, 2.0, 8)
    with torch.no_grad():
        attn.q_norm.weight.copy_(scale)
    q, k = rotary_inputs(model, monkeypatch)[:2]  # block 0's [B, H, T, head_dim]
    assert q.shape == (2, 4, 17, 8) and k.shape == (2, 2, 17, 8)
    if norm == "rmsnorm":
        assert torch.allclose((q / scale).pow(2).mean(-1), torch.ones(2, 4, 17), atol=1e-4)
        assert torch.allclose(k.pow(2).mean(-1), torch.ones(2, 2, 17), atol=1e-4)
    else:  # zero mean, unit variance per head
        assert torch.allclose((q / scale).mean(-1), torch.zeros(2, 4, 17), atol=1e-5)
        assert torch.allclose((q / scale).var(-1, unbiased=False), torch.ones(2, 4, 17), atol=1e-3)
    plain = GPT(ModelConfig(**fields), seed=1).eval()
    q_plain = rotary_inputs(plain, monkeypatch)[0]
    assert not torch.allclose(q_plain.pow(2).mean(-1), torch.ones(2, 4, 17), atol=0.1)  # the check can fail
    norms = 2 * 2 * 8 * (2 if norm == "layernorm" else 1)  # blocks x (q, k) x head_dim (x bias)
    assert (
        model.config.num_parameters()
        == sum(p.numel() for p in model.parameters())
        == (plain.config.num_parameters() + norms)
    )


def test_relu2_mlp_is_w2_relu_w1_x_squared():
    config = ModelConfig(**SMALL, mlp="relu2")
    assert config.mlp_hidden_size == 4 * 32
    mlp = GPT(config, seed=2).blocks[0].mlp
    x = torch.randn(3, 5, 32)
    expected = F.linear(F.relu(F.linear(x, mlp.fc.weight, mlp.fc.bias)) ** 2, mlp.proj.weight, mlp.proj.bias)
    assert torch.allclose(mlp(x), expected, atol=1e-6)
    model = GPT(config)
    assert config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_logit_softcap_bounds_the_logits_everywhere_the_model_is_used():
    cap = 2.0
    raw, capped = (GPT(ModelConfig(**SMALL, logit_softcap=c), seed=3).eval() for c in (None, cap))
    with torch.no_grad():
        for model in (raw, capped):
            model.lm_head.weight.mul_(200)  # logits well past the cap
    raw_logits, capped_logits = raw(IDX)[0], capped(IDX)[0]
    assert raw_logits.abs().max() > 3 * cap
    assert capped_logits.abs().max() <= cap
    assert torch.allclose(capped_logits, cap * torch.tanh(raw_logits / cap), atol=1e-6)
    with torch.no_grad():
        loss = capped(IDX[:, :-1], IDX[:, 1:])[1]  # scored on the capped logits
        assert float(loss) == pytest.approx(float(causal_lm_loss(capped(IDX[:, :-1])[0], shift_labels=IDX[:, 1:])))
        assert float(loss) != pytest.approx(float(raw(IDX[:, :-1], IDX[:, 1:])[1]))
    # generation samples the capped logits: greedy decoding is the argmax of the same (monotone) logits
    assert capped.generate([[1, 2, 3]], 4, temperature=0) == raw.generate([[1, 2, 3]], 4, temperature=0)
    off = GPT(ModelConfig(**SMALL, logit_softcap=0.0), seed=3).eval()
    assert torch.equal(off(IDX)[0], GPT(ModelConfig(**SMALL), seed=3).eval()(IDX)[0])  # 0: off


def test_z_loss_is_trained_and_not_evaluated():
    weight = 0.5
    plain, weighted = (GPT(ModelConfig(**SMALL, z_loss=w), seed=4).train() for w in (0.0, weight))
    inputs, targets = IDX[:, :-1], IDX[:, 1:].clone()
    targets[0, :3] = -100  # ignored positions are not in the mean either
    logits, loss = weighted(inputs, targets)
    ce = causal_lm_loss(logits, shift_labels=targets)
    log_z = torch.logsumexp(logits[targets != -100], dim=-1)
    expected = (ce + weight * log_z.square().mean()).detach()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    # log Z of a near-uniform 97-way softmax is about ln 97: a term that shows
    assert float(loss.detach()) > float(ce.detach()) + 1.0
    assert float(weighted.last_z_loss) == pytest.approx(float(log_z.detach().square().mean()), rel=1e-6)  # the log
    loss.backward()
    plain(inputs, targets)[1].backward()
    assert not torch.allclose(weighted.lm_head.weight.grad, plain.lm_head.weight.grad)  # trained
    weighted.eval(), plain.eval()
    with torch.no_grad():  # not in the evaluated loss
        assert float(weighted(inputs, targets)[1]) == float(plain(inputs, targets)[1])
    # a training-only term: a run from trained weights (--init) may change it
    assert continued_model_config(ModelConfig(**SMALL), {"z_loss": "1e-4"}, "x").z_loss == 1e-4


def test_the_options_survive_a_model_folder(tmp_path, tokenizer_dir):
    config = ModelConfig(**SMALL, **LLAMA, qk_norm=True, logit_softcap=15.0, z_loss=1e-4)
    model = GPT(config, seed=5).eval()
    with torch.no_grad():
        model.blocks[1].attn.k_norm.weight.mul_(1.5)
    save_model_dir(model, tmp_path / "run", tokenizer_dir / "tokenizer.json")
    reloaded = load_model_dir(tmp_path / "run")
    assert reloaded.config == config
    assert torch.equal(reloaded(IDX)[0], model(IDX)[0])
    speedrun = GPT(ModelConfig(**SMALL, **LLAMA, value_embeddings=1, unet_skips=True), seed=5).eval()
    with torch.no_grad():
        speedrun.skip_weights.fill_(0.25), speedrun.value_embeddings[0].weight.mul_(3)
    save_model_dir(speedrun, tmp_path / "speedrun", tokenizer_dir / "tokenizer.json")
    assert torch.equal(load_model_dir(tmp_path / "speedrun")(IDX)[0], speedrun(IDX)[0])
    relu2 = GPT(ModelConfig(**SMALL, mlp="relu2"), seed=5).eval()
    save_model_dir(relu2, tmp_path / "relu2", tokenizer_dir / "tokenizer.json")
    assert torch.equal(load_model_dir(tmp_path / "relu2")(IDX)[0], relu2(IDX)[0])


def attention_values(model, monkeypatch) -> list:
    """The v of every attention call of a forward ([B, kv_heads, T, head_dim])."""
    seen = []
    attend = dsllm.model._attend

    def spy(q, k, v, *args, **kwargs):
        seen.append(v.detach())
        return attend(q, k, v, *args, **kwargs)

    monkeypatch.setattr(dsllm.model, "_attend", spy)
    model(IDX)
    return seen


def test_value_embeddings_add_a_tokens_row_to_the_first_and_last_blocks_values(monkeypatch):
    fields = {**SMALL, **LLAMA, "n_layers": 5}
    config = ModelConfig(**fields, value_embeddings=2)
    assert [config.value_embedding_of(i) for i in range(5)] == [0, 1, None, 0, 1]
    model, plain = GPT(config, seed=8).eval(), GPT(ModelConfig(**fields), seed=8).eval()
    assert [m.weight.shape for m in model.value_embeddings] == [(97, 16), (97, 16)]  # kv_heads x head_dim wide
    assert [b.attn.value_scale is not None for b in model.blocks] == [True, True, False, True, True]
    with torch.no_grad():  # scaled to 0 the tables change nothing: every other weight is the plain model's
        for block in model.blocks:
            if block.attn.value_scale is not None:
                block.attn.value_scale.zero_()
    assert torch.equal(model(IDX)[0], plain(IDX)[0])
    with torch.no_grad():
        model.blocks[3].attn.value_scale.fill_(1.5)
    values = []
    hook = model.blocks[3].attn.qkv.register_forward_hook(lambda m, i, out: values.append(out[..., -16:].detach()))
    v = attention_values(model, monkeypatch)[3]
    hook.remove()
    expected = values[0] + 1.5 * model.value_embeddings[0](IDX).detach()  # block 3 = n_layers - 2 + 0: table 0
    assert torch.allclose(v, expected.view(2, 17, 2, 8).transpose(1, 2), atol=1e-6)
    assert not torch.allclose(model(IDX)[0], plain(IDX)[0])
    tables, scales = 2 * 97 * 16, 4
    assert (
        config.num_parameters()
        == sum(p.numel() for p in model.parameters())
        == plain.config.num_parameters() + (tables + scales)
    )
    for bad in (3, -1):
        with pytest.raises(ConfigError, match=f"model.value_embeddings = {bad}: must be 0 .off. to n_layers // 2 = 2"):
            ModelConfig(**fields, value_embeddings=bad)


def test_unet_skips_add_the_mirror_blocks_output_through_a_learned_weight():
    fields = {**SMALL, **LLAMA, "n_layers": 5}
    model, plain = GPT(ModelConfig(**fields, unet_skips=True), seed=9).eval(), GPT(ModelConfig(**fields), seed=9)
    assert torch.equal(model.skip_weights.detach(), torch.ones(2))  # pairs (0, 4) and (1, 3); block 2 has none
    with torch.no_grad():
        model.skip_weights.zero_()
        assert torch.equal(model(IDX)[0], plain.eval()(IDX)[0])
        model.skip_weights.copy_(torch.tensor([0.5, -2.0]))
    inputs, outputs = {}, {}

    def record(index, module, args, out):
        inputs[index], outputs[index] = args[0], out

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(functools.partial(record, i))
    model(IDX)
    assert torch.allclose(inputs[2], outputs[1])
    assert torch.allclose(inputs[3], outputs[2] - 2.0 * outputs[1], atol=1e-6)
    assert torch.allclose(inputs[4], outputs[3] + 0.5 * outputs[0], atol=1e-6)
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="model.unet_skips needs at least 2 blocks"):
        ModelConfig(**{**fields, "n_layers": 1}, unet_skips=True)


def check_checkpointed_training(checkpointing: str) -> None:
    """Recomputed blocks send the value-embedding table and the skip weights the gradients of a plain forward
    (DeepSpeed's reentrant recompute sends them only to tensor arguments)."""
    fields = {**SMALL, **LLAMA, "n_layers": 4, "value_embeddings": 1, "unet_skips": True}
    grads = []
    for mode in ("none", checkpointing):
        model = GPT(ModelConfig(**fields, activation_checkpointing=mode), seed=10).train()
        model(IDX[:, :-1], IDX[:, 1:])[1].backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and grads[0]["value_embeddings.0.weight"].abs().sum() > 0
    for name, grad in grads[0].items():
        assert grads[1][name] is not None and torch.allclose(grads[1][name], grad, atol=1e-6), name


def test_value_embeddings_and_skips_train_under_torch_checkpointing_and_decode_with_the_cache():
    check_checkpointed_training("torch")
    # generation's KV cache adds each new token's row, as the whole window's forward does
    fields = {**SMALL, **LLAMA, "n_layers": 4, "value_embeddings": 2, "unet_skips": True}
    model = GPT(ModelConfig(**fields), seed=10).eval()
    prompt = IDX[0, :5].tolist()
    generated = model.generate([prompt], 6, temperature=0)[0]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(6):  # greedy, each step the whole window again (no cache)
            tokens.append(int(model(torch.tensor([tokens]))[0][0, -1].argmax()))
    assert generated[-6:] == tokens[-6:]


def test_value_embeddings_and_skips_train_under_deepspeeds_checkpointing(tmp_path):
    """(a process of its own: DeepSpeed's recompute needs its process group)"""
    import subprocess
    import sys

    from runs import ROOT, env, free_port

    script = (
        "import sys, deepspeed; sys.path.insert(0, 'tests/unit'); deepspeed.init_distributed(dist_backend='gloo'); "
        "deepspeed.checkpointing.configure(None); import test_recipe_options as t; "
        "t.check_checkpointed_training('deepspeed'); print('same gradients')"
    )
    ranks = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env={**env(), **ranks, "MASTER_PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "same gradients" in proc.stdout, proc.stdout + proc.stderr


def test_value_embeddings_and_skips_are_refused_where_they_cannot_run():
    from dsllm.errors import UserError
    from dsllm.export import hf_family
    from dsllm.pipeline import check_pipeline
    from dsllm.tensor_parallel import check_tensor_parallel

    for field, value in (("value_embeddings", 1), ("unet_skips", True)):
        config = ModelConfig(**SMALL, **LLAMA, **{field: value})
        with pytest.raises(UserError, match=f"--pipeline-parallel 2 with --model.{field} {value}: not supported"):
            check_pipeline(config, 2, 2, "blocks", False)
        with pytest.raises(ConfigError, match=f"model.{field} = {value!r} has no Hugging Face architecture"):
            hf_family(config)
    even = {**SMALL, **LLAMA, "vocab_size": 96}  # (rows split over 2 tensor ranks)
    with pytest.raises(UserError, match="--tensor-parallel 2 with --model.value_embeddings 1: not supported yet"):
        check_tensor_parallel(ModelConfig(**even, value_embeddings=1), 2, 2, 1, False, 1)
    check_tensor_parallel(ModelConfig(**even, unet_skips=True), 2, 2, 1, False, 1)  # (replicated weights)


@pytest.mark.parametrize("tied", [True, False])
def test_the_pipelines_layers_compute_the_options_as_the_gpt(tied):
    """QK-norm and relu2 ride in the blocks; the pipeline's head (tied or not) soft-caps its logits; the pipeline's
    training loss (its loss_fn, which scoring never runs) adds the z-loss as GPT.forward does in training."""
    from deepspeed.pipe import TiedLayerSpec

    from dsllm.pipeline import layers_of, training_loss

    overrides = dict(SMALL, qk_norm=True, mlp="relu2", logit_softcap=3.0, z_loss=0.25, tie_embeddings=tied)
    config = resolve_model_config("tiny", overrides)
    gpt = GPT(config, seed=6).train()
    built, run = {}, []
    for spec in layers_of(config, 6):
        if isinstance(spec, TiedLayerSpec):
            module = built.setdefault(spec.key, spec.build())
            if spec.forward_fn is not None:
                run.append(functools.partial(spec.forward_fn, module))
                continue
        else:
            module = spec.build()
        run.append(module)
    x = IDX[:, :-1]
    with torch.no_grad():
        for layer in run:
            x = layer(x)
        logits, loss = gpt(IDX[:, :-1], IDX[:, 1:])
    assert torch.allclose(x, logits, atol=1e-6) and x.abs().max() <= 3.0
    assert float(training_loss(config)(x, IDX[:, 1:])) == pytest.approx(float(loss), rel=1e-6)


def test_param_groups_split_the_embeddings_and_head_only_when_asked():
    """Default options keep the two groups of earlier runs (their checkpoints resume); the scales and the
    embeddings' decay make groups of their own, a pipeline stage's head ("N.head") included, and MoE's expert groups
    keep their group's lr and decay."""
    import torch.nn as nn

    from dsllm.optimizer import param_groups
    from dsllm.pipeline import layers_of

    config = ModelConfig(**SMALL, tie_embeddings=False)
    model = GPT(config, seed=7)
    names = {id(p): name for name, p in model.named_parameters()}

    def members(groups):
        return {g["name"]: sorted(names.get(id(p), "?") for p in g["params"]) for g in groups}

    plain = param_groups(model, 0.1, 1e-3)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in plain] == [("decay", 1e-3, 0.1), ("no_decay", 1e-3, 0.0)]
    assert "tok_embeddings.weight" in members(plain)["no_decay"] and "lm_head.weight" in members(plain)["decay"]
    split = param_groups(model, 0.1, 1e-3, embedding_lr_scale=10.0, head_lr_scale=0.5, embedding_weight_decay=0.2)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in split] == [
        ("decay", 1e-3, 0.1),
        ("no_decay", 1e-3, 0.0),
        ("embedding", 1e-2, 0.2),
        ("head", 5e-4, 0.1),
    ]
    assert members(split)["embedding"] == ["pos_embeddings.weight", "tok_embeddings.weight"]
    assert members(split)["head"] == ["lm_head.weight"]
    stage = nn.ModuleList(spec.build() for spec in layers_of(config, 7)[-2:])  # [norm, head]: "1.head.weight"
    assert [g["name"] for g in param_groups(stage, 0.1, 1e-3, head_lr_scale=0.5)] == ["decay", "no_decay", "head"]
    moe = GPT(resolve_model_config("tiny-moe", {**SMALL, "moe_experts": 2}), seed=7)
    groups = param_groups(moe, 0.1, 1e-3, embedding_lr_scale=10.0)
    experts = [g for g in groups if g.get("moe")]
    assert experts and {(g["lr"], g["weight_decay"]) for g in experts} == {(1e-3, 0.1)}  # (no biases in tiny)
    assert [g["lr"] for g in groups if g["name"] == "embedding"] == [1e-2]
