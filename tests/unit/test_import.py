"""Hugging Face import (issue 17): small random GPT-2, Llama (GQA, llama3 RoPE scaling), Mistral (sliding window),
Qwen2 (q/k/v biases) and Qwen3 models built locally with transformers import with the logits transformers computes
(max |diff| <= 1e-4 in fp32), and export back to a folder transformers loads with them again; sharded safetensors and
pytorch_model.bin (weights_only) read alike; what dsllm's model would compute otherwise is refused naming the field."""

import json
import shutil

import pytest
import torch
import transformers
from conftest import assert_user_error
from runs import dsllm

from dsllm.errors import UserError
from dsllm.export import export_hf
from dsllm.hf_import import import_hf, model_config_of
from dsllm.model_dir import load_model_dir

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,
    intermediate_size=96,
    max_position_embeddings=64,
)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=64, n_layer=2, n_head=8, n_positions=64)),
    "llama_gqa_llama3_rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            SMALL,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 50.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral_sliding_window": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(SMALL, num_key_value_heads=4, sliding_window=48, tie_word_embeddings=False),
    ),
    "qwen2_qkv_bias_tied": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    ),
    "qwen3_qk_norm": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(SMALL, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False),
    ),
}
IDX = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))


def hf_model(family: str, folder, tokenizer_dir, seed: int = 0):
    """A random transformers model of `family` saved to `folder` with the test tokenizer; every weight, bias and norm
    gain perturbed so a wrong mapping shows."""
    config_class, model_class, fields = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(getattr(transformers, config_class)(**fields)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return model


def max_diff(ours, theirs, idx=IDX) -> float:
    with torch.no_grad():
        return (ours(idx)[0] - theirs(idx).logits).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_import_gives_transformers_logits_and_exports_back(tmp_path, tokenizer_dir, family):
    theirs = hf_model(family, tmp_path / "hf", tokenizer_dir)
    import_hf(tmp_path / "hf", tmp_path / "model")
    ours = load_model_dir(tmp_path / "model").eval()
    assert max_diff(ours, theirs) <= 1e-4
    record = json.loads((tmp_path / "model" / "config.json").read_text())
    assert record["imported"]["architectures"] == [FAMILIES[family][1]]
    assert (tmp_path / "model" / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    if family.startswith("mistral"):  # the window is the context: within it, attention is plain causal
        assert ours.config.max_seq_len == 48
    export_hf(ours, tmp_path / "model" / "tokenizer.json", tmp_path / "back")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert max_diff(ours, again) <= 1e-4


def test_parity_check_can_fail(tmp_path, tokenizer_dir):
    """The negative control: the same weights under another RoPE base give other logits."""
    theirs = hf_model("llama_gqa_llama3_rope", tmp_path / "hf", tokenizer_dir)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_parameters"]["rope_type"] = "default"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "model")
    assert max_diff(load_model_dir(tmp_path / "model").eval(), theirs) > 1e-2


def as_shards(folder) -> None:
    """model.safetensors as two shards and their index, as save_pretrained writes a large model."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, members in shards.items():
        save_file({n: weights[n] for n in members}, folder / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: file for file, members in shards.items() for n in members}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model.safetensors").unlink()


def as_pickle(folder) -> None:
    """model.safetensors as pytorch_model.bin, as older checkpoints are."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize("rewrite", [as_shards, as_pickle], ids=["shards", "bin"])
def test_sharded_and_pickled_checkpoints_import_alike(tmp_path, tokenizer_dir, rewrite):
    theirs = hf_model("qwen2_qkv_bias_tied", tmp_path / "hf", tokenizer_dir)
    rewrite(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "model")
    assert max_diff(load_model_dir(tmp_path / "model").eval(), theirs) <= 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gemma"}, "model_type = 'gemma': not importable; dsllm imports gpt2, llama, mistral"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu': dsllm's SwiGLU MLP computes silu"),
        ({"head_dim": 16}, "head_dim = 16: dsllm's heads are hidden_size / num_attention_heads = 8 wide"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters type 'dynamic'"),
        ({"attention_bias": True, "mlp_bias": False}, "mlp_bias = False: dsllm's biases are on attention and MLP"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config = .*a quantized checkpoint"),
        ({"num_attention_heads": 7}, "model.d_model = 64 is not divisible by model.n_heads = 7"),
    ],
)
def test_what_dsllm_computes_otherwise_is_refused_naming_the_field(change, message):
    config = {"model_type": "llama", **SMALL, **change}
    with pytest.raises(UserError, match=message):
        model_config_of(config, "hf/config.json")


def test_command_refuses_broken_folders_in_one_line_and_writes_nothing(tmp_path, tokenizer_dir):
    hf = tmp_path / "hf"
    hf_model("qwen3_qk_norm", hf, tokenizer_dir)
    out = dsllm("import", "--hf", hf, "--output", tmp_path / "model")
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout and (tmp_path / "model" / "model.safetensors").is_file()
    again = dsllm("import", "--hf", hf, "--output", tmp_path / "model")
    assert_user_error(again, "exists and is not empty; pass --overwrite")
    (hf / "tokenizer.json").unlink()
    assert_user_error(dsllm("import", "--hf", hf, "--output", tmp_path / "m2"), "no tokenizer.json; write it with")
    shutil.copyfile(tokenizer_dir / "tokenizer.json", hf / "tokenizer.json")
    from safetensors.torch import load_file, save_file

    weights = load_file(hf / "model.safetensors")
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    assert_user_error(
        dsllm("import", "--hf", hf, "--output", tmp_path / "m3"), "no tensor 'model.layers.1.self_attn.k_norm.weight'"
    )
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_user_error(dsllm("import", "--hf", hf, "--output", tmp_path / "m4"), "cannot read it")
    assert_user_error(dsllm("import", "--hf", hf, "--output", hf / "inside"), "lies inside")
    assert not any((tmp_path / name).exists() for name in ("m2", "m3", "m4")) and not list(tmp_path.glob(".m*"))
