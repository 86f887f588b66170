"""The GPT model: options, presets, parameter counts, FLOPs, checkpointing, and config-time errors."""

import dataclasses

import pytest
import torch

from dsllm.model import GPT, RMSNorm, apply_rotary, count_parameters, flops_per_token, rotary_embedding
from dsllm.model_config import ConfigError, ModelConfig, resolve_model_config

SMALL = dict(vocab_size=97, max_seq_len=32, n_layers=2, d_model=32, n_heads=4, mlp_multiple_of=16)
VARIANTS = {
    "gpt2": dict(),
    "llama_gqa": dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False, tie_embeddings=False),
    "mqa": dict(positions="rope", n_kv_heads=1),
    "rmsnorm_gelu_learned": dict(norm="rmsnorm"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_option_set_trains(variant):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SMALL, **VARIANTS[variant]))
    idx = torch.randint(0, 97, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):  # memorise one batch
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logits.shape == (4, 16, 97)
    assert losses[0] == pytest.approx(torch.log(torch.tensor(97.0)).item(), abs=0.3)  # uniform at init
    assert losses[-1] < 0.5 * losses[0]


def test_attention_is_causal():
    model = GPT(ModelConfig(**SMALL, positions="rope")).eval()
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 97
    a, b = model(idx)[0], model(changed)[0]
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-6) and not torch.allclose(a[0, 8:], b[0, 8:])


def test_ignore_index_masks_targets():
    model = GPT(ModelConfig(**SMALL)).eval()
    idx = torch.randint(0, 97, (2, 9))
    targets = idx[:, 1:].clone()
    full = model(idx[:, :-1], targets)[1]
    targets[:, :4] = -100
    partial = model(idx[:, :-1], targets)[1]
    logits = model(idx[:, :-1])[0]
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), idx[:, 5:].reshape(-1))
    assert partial.item() == pytest.approx(expected.item(), rel=1e-5) and partial.item() != full.item()


def test_weight_tying_and_init():
    tied = GPT(ModelConfig(**SMALL))
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    untied = GPT(ModelConfig(**SMALL, tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    assert count_parameters(untied) - count_parameters(tied) == 97 * 32
    big = GPT(ModelConfig(vocab_size=1000, max_seq_len=64, n_layers=8, d_model=256, n_heads=4))
    assert big.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert big.blocks[0].attn.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert big.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert big.blocks[0].attn.qkv.bias.abs().max().item() == 0


def test_gpt2_presets_match_published_sizes():
    # GPT-2 as released: 124M / 355M / 774M / 1558M with vocab 50,257 and tied embeddings
    expected = {
        "gpt2-124m": 124_439_808,
        "gpt2-350m": 354_823_168,
        "gpt2-774m": 774_030_080,
        "gpt2-1.5b": 1_557_611_200,
    }
    for name, count in expected.items():
        assert resolve_model_config(name).num_parameters() == count, name
    assert count_parameters(GPT(resolve_model_config("gpt2-124m"))) == 124_439_808


@pytest.mark.parametrize("name", ["tiny", "llama-125m", "llama-350m"])
def test_analytic_count_equals_the_built_model(name):
    config = resolve_model_config(name)
    assert count_parameters(GPT(config)) == config.num_parameters()


def test_llama_preset_sizes_are_what_their_names_say():
    sizes = {"llama-125m": 125e6, "llama-350m": 350e6, "llama-1.3b": 1.3e9, "llama-3b": 3e9, "llama-7b": 7e9}
    for name, size in sizes.items():
        config = resolve_model_config(name)
        assert abs(config.num_parameters() / size - 1) < 0.05, (name, config.num_parameters())
        assert config.kv_heads < config.n_heads and config.positions == "rope"
    assert 4e6 < resolve_model_config("tiny").num_parameters() < 10e6


def test_overrides_and_json_files(tmp_path):
    config = resolve_model_config(
        "gpt2-124m",
        {"norm": "rmsnorm", "n_layers": "6", "dropout": "0.1", "tie_embeddings": "false", "n_kv_heads": "null"},
    )
    assert (config.norm, config.n_layers, config.dropout, config.tie_embeddings) == ("rmsnorm", 6, 0.1, False)
    path = tmp_path / "m.json"
    path.write_text('{"model": {"d_model": 64, "n_heads": 2, "n_layers": 1, "vocab_size": 50}}')
    assert resolve_model_config(str(path), {"n_heads": 4}).n_heads == 4
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_model_config("gpt5")
    with pytest.raises(ConfigError, match=r"--model.n_layer: unknown model field"):
        resolve_model_config("tiny", {"n_layer": 3})
    with pytest.raises(ConfigError, match=r"model.n_layers = 'six': expected int"):
        resolve_model_config("tiny", {"n_layers": "six"})


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(d_model=30, n_heads=4), r"model.d_model = 30 is not divisible by model.n_heads = 4"),
        (dict(n_heads=4, n_kv_heads=3), r"model.n_kv_heads = 3 does not divide model.n_heads = 4"),
        (dict(norm="batchnorm"), r"model.norm = 'batchnorm': unknown; use one of layernorm, rmsnorm"),
        (dict(positions="alibi"), r"model.positions = 'alibi': unknown"),
        (dict(mlp="relu"), r"model.mlp = 'relu': unknown"),
        (dict(activation_checkpointing="yes"), r"model.activation_checkpointing = 'yes': unknown"),
        (dict(positions="rope", d_model=36, n_heads=4), r"needs an even head size"),
        (dict(dropout=1.5), r"model.dropout = 1.5"),
    ],
)
def test_invalid_combinations_fail_at_config_time(fields, message, monkeypatch):
    built = []
    monkeypatch.setattr(torch.nn.Linear, "__init__", lambda *a, **k: built.append(1))
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**SMALL, **fields})
    assert not built  # no tensor was made


def test_sequence_longer_than_positions_allow():
    config = ModelConfig(**SMALL)
    with pytest.raises(
        ConfigError, match=r"seq_len 33 is longer than model.max_seq_len = 32 \(learned positions allow\)"
    ):
        config.check_seq_len(33)
    with pytest.raises(ConfigError, match="seq_len 40"):
        GPT(config)(torch.zeros(1, 40, dtype=torch.long))


def test_rmsnorm_and_rotary():
    norm = RMSNorm(8, 1e-6)
    x = torch.randn(3, 8)
    assert torch.allclose(norm(x).pow(2).mean(-1), torch.ones(3), atol=1e-4)
    rope = ModelConfig(d_model=16, n_heads=2, positions="rope", rope_theta=10000.0)  # head_dim 8
    cos, sin = rotary_embedding(torch.arange(5)[None], rope, torch.float32)
    q = torch.randn(1, 2, 5, 8)
    rotated = apply_rotary(q, cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation keeps length
    assert torch.allclose(rotated[:, :, 0], q[:, :, 0])  # position 0 is not rotated
    # relative positions: <R(m) q, R(n) k> depends only on m - n (here 3-1 == 4-2)
    k = torch.randn(1, 2, 1, 8)

    def score(m, n):
        return (
            apply_rotary(q[:, :, :1], cos[:, :, m : m + 1], sin[:, :, m : m + 1])
            * apply_rotary(k, cos[:, :, n : n + 1], sin[:, :, n : n + 1])
        ).sum()

    assert torch.allclose(score(3, 1), score(4, 2), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_flops_per_token_terms():
    config = resolve_model_config("gpt2-124m")
    n_matmul = 124_439_808 - 1024 * 768 - 12 * 2 * 2 * 768 - 2 * 768  # no position table, no norm params
    n_matmul -= 12 * (3 * 768 + 768 + 4 * 768 + 768)  # biases are adds, not matmuls
    assert flops_per_token(config, 1024) == 6 * n_matmul + 12 * 12 * 768 * 1024
    gqa = resolve_model_config("llama-125m")
    assert flops_per_token(gqa, 2048) < flops_per_token(dataclasses.replace(gqa, n_kv_heads=None), 2048)


@pytest.mark.parametrize("mode", ["torch", "deepspeed"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    torch.manual_seed(0)
    plain = GPT(ModelConfig(**SMALL, positions="rope"))
    checkpointed = GPT(dataclasses.replace(plain.config, activation_checkpointing=mode))
    checkpointed.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 97, (2, 17))
    for model in (plain, checkpointed):
        model(idx[:, :-1], idx[:, 1:])[1].backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_rope_scaling_options_are_checked():
    with pytest.raises(ConfigError, match="model.rope_scaling = 'yarn' scales rotary positions; set positions"):
        ModelConfig(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=256)
    with pytest.raises(ConfigError, match="model.rope_scaling_factor = 1.0: must be above 1"):
        ModelConfig(positions="rope", rope_scaling="linear")
    with pytest.raises(ConfigError, match="needs model.rope_original_max_seq_len"):
        ModelConfig(positions="rope", rope_scaling="yarn", rope_scaling_factor=4.0)
