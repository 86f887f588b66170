"""Hugging Face export: transformers' logits equal ours for every family (the peer toolkits' most
reported failure is gibberish after conversion)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_user_error
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsllm.export import export_hf
from dsllm.model import GPT
from dsllm.model_config import ConfigError, ModelConfig
from dsllm.model_dir import load_model_dir, save_model_dir

BASE = dict(vocab_size=300, max_seq_len=64, n_layers=3, d_model=64, n_heads=8, mlp_multiple_of=32)
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_theta=500.0)
CASES = {
    "gpt2_tied": dict(),
    "gpt2_untied": dict(tie_embeddings=False),
    "gpt2_custom_mlp": dict(mlp_hidden=96, norm_eps=1e-6),
    "llama_gqa_untied": dict(LLAMA, n_kv_heads=2, tie_embeddings=False),
    "llama_gqa_tied": dict(LLAMA, n_kv_heads=4),
    "llama_mqa_bias": dict(LLAMA, n_kv_heads=1, bias=True, tie_embeddings=False),
    "llama_mha": dict(LLAMA),
    "llama_linear_rope": dict(LLAMA, n_kv_heads=2, rope_scaling="linear", rope_scaling_factor=4.0),
    "llama_ntk": dict(LLAMA, n_kv_heads=2, rope_scaling="ntk", rope_scaling_factor=4.0),
    "llama_yarn": dict(LLAMA, n_kv_heads=2, rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16),
    "mixtral_untied": dict(LLAMA, n_kv_heads=2, tie_embeddings=False, moe_experts=4, moe_top_k=2),
    "mixtral_tied": dict(LLAMA, n_kv_heads=4, moe_experts=8, moe_top_k=2, mlp_hidden=48),
    "qwen3_qk_norm": dict(LLAMA, n_kv_heads=2, qk_norm=True, tie_embeddings=False, z_loss=1e-4),
    "qwen2_qkv_bias": dict(LLAMA, n_kv_heads=2, qkv_bias=True),
    "gpt2_gelu_tanh": dict(mlp="gelu_tanh"),
    "llama3_rope": dict(
        LLAMA,
        n_kv_heads=2,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_seq_len=16,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_theta=50.0,
    ),
}
ARCHITECTURES = {"learned": "GPT2LMHeadModel", "rope": "LlamaForCausalLM"}


def random_model(fields, seed=0):
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**BASE, **fields)).eval()
    with torch.no_grad():  # every weight, bias and norm gain non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def max_logit_diff(model, hf_dir):
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, 300, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model(idx)[0] - hf(idx).logits).abs().max().item(), hf


@pytest.mark.parametrize("case", CASES)
def test_logits_parity_in_transformers(tmp_path, tokenizer_dir, case):
    model = random_model(CASES[case])
    export_hf(model, tokenizer_dir / "tokenizer.json", tmp_path / "hf")
    diff, hf = max_logit_diff(model, tmp_path / "hf")
    assert diff < 1e-4, diff
    expected = "MixtralForCausalLM" if model.config.moe_experts else ARCHITECTURES[model.config.positions]
    expected = "Qwen3ForCausalLM" if model.config.qk_norm else expected
    expected = "Qwen2ForCausalLM" if model.config.qkv_bias else expected
    assert type(hf).__name__ == expected
    assert hf.config.tie_word_embeddings == model.config.tie_embeddings
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert ("lm_head.weight" in weights) != model.config.tie_embeddings


def test_parity_check_catches_a_wrong_mapping(tmp_path, tokenizer_dir):
    """The negative control: swap the SwiGLU gate and up halves, as a buggy converter would."""
    model = random_model(CASES["llama_gqa_untied"])
    export_hf(model, tokenizer_dir / "tokenizer.json", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    gate, up = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
    weights[gate], weights[up] = weights[up].clone(), weights[gate].clone()
    save_file(weights, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert max_logit_diff(model, tmp_path / "hf")[0] > 1e-2


def test_tokenizer_loads_with_autotokenizer(tmp_path, tokenizer_dir):
    """Plain `tok(text)` starts the text with <|endoftext|>, as every document started in training; the pad token
    (also <|endoftext|>) pads batches on the left, where generation wants it."""
    from tokenizers import Tokenizer

    before = (tokenizer_dir / "tokenizer.json").read_bytes()
    export_hf(random_model({}), tokenizer_dir / "tokenizer.json", tmp_path / "hf")
    assert (tokenizer_dir / "tokenizer.json").read_bytes() == before  # the run's tokenizer is not changed
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eot = ours.token_to_id("<|endoftext|>")
    text = "the model reads tokens, ünïcödé 😀 and\nnew lines"
    assert hf_tok(text)["input_ids"] == [eot] + ours.encode(text).ids
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours.encode(text).ids
    assert hf_tok.decode(hf_tok(text)["input_ids"], skip_special_tokens=True) == text
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == "<|endoftext|>" + text
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == "<|endoftext|>"
    assert hf_tok.eos_token_id == hf_tok.pad_token_id == eot
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eot
    # two documents, and a batch padded on the left
    assert hf_tok("the model", "reads")["input_ids"] == [
        eot,
        *ours.encode("the model").ids,
        eot,
        *ours.encode("reads").ids,
    ]
    batch = hf_tok(["the", "the model reads tokens"], padding=True)
    long = [eot] + ours.encode("the model reads tokens").ids
    short = [eot] + ours.encode("the").ids
    assert batch["input_ids"] == [[eot] * (len(long) - len(short)) + short, long]
    assert batch["attention_mask"][0] == [0] * (len(long) - len(short)) + [1] * len(short)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(norm="rmsnorm"),
            r"model.norm = 'rmsnorm' has no Hugging Face equivalent .*GPT2LMHeadModel needs norm = 'layernorm'",
        ),
        (dict(mlp="swiglu"), r"model.mlp = 'swiglu' .*GPT2LMHeadModel needs mlp = 'gelu'"),
        (dict(bias=False), r"model.bias = False .*GPT2LMHeadModel needs bias = True"),
        (dict(n_kv_heads=2), r"model.n_kv_heads = 2 .*no grouped-query attention"),
        (dict(positions="rope"), r"model.norm = 'layernorm' .*LlamaForCausalLM needs norm = 'rmsnorm'"),
        (dict(positions="rope", norm="rmsnorm"), r"model.mlp = 'gelu' .*LlamaForCausalLM needs mlp = 'swiglu'"),
        (dict(LLAMA, moe_experts=4, moe_top_k=1), r"model.moe_top_k = 1 .*MixtralForCausalLM needs moe_top_k = 2"),
        (dict(LLAMA, moe_experts=4, moe_every=3), r"model.moe_every = 3 .*needs moe_every = 1 \(every block sparse"),
        (dict(LLAMA, moe_experts=4, bias=True), r"model.bias = True .*Mixture-of-Experts .*needs bias = False"),
        (dict(LLAMA, mlp="relu2"), r"model.mlp = 'relu2' has no Hugging Face architecture.*export refuses it"),
        (dict(LLAMA, logit_softcap=30.0), r"model.logit_softcap = 30.0 has no Hugging Face equivalent.*refuses"),
        (dict(LLAMA, qk_norm=True, bias=True), r"model.bias = True .*qk_norm: Qwen3ForCausalLM needs bias = False"),
        (dict(qk_norm=True), r"model.positions = 'learned' .*qk_norm: Qwen3ForCausalLM needs positions = 'rope'"),
        (dict(qkv_bias=False), r"model.qkv_bias = False with bias = True has no Hugging Face equivalent"),
        (dict(LLAMA, qkv_bias=True, qk_norm=True), r"model.qkv_bias = True with bias = False .*only Qwen2ForCausalLM"),
    ],
)
def test_combinations_without_an_hf_equivalent_are_refused(tmp_path, tokenizer_dir, fields, message):
    with pytest.raises(ConfigError, match=message):
        export_hf(random_model(fields), tokenizer_dir / "tokenizer.json", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.partial*"))


def test_command_exports_a_model_folder(tmp_path, tokenizer_dir):
    model = random_model(CASES["llama_gqa_untied"])
    save_model_dir(model, tmp_path / "run", tokenizer_dir / "tokenizer.json")
    reloaded = load_model_dir(tmp_path / "run")
    idx = torch.randint(0, 300, (2, 10))
    assert torch.equal(model(idx)[0], reloaded(idx)[0])

    def export(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "dsllm",
                "export",
                "--checkpoint",
                str(tmp_path / "run"),
                "--output",
                str(tmp_path / "hf"),
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    proc = export()
    assert proc.returncode == 0, proc.stderr
    assert "exported LlamaForCausalLM" in proc.stdout
    assert max_logit_diff(model, tmp_path / "hf")[0] < 1e-4
    assert_user_error(export(), "exists and is not empty", "--overwrite")
    assert export("--overwrite").returncode == 0
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsllm",
            "export",
            "--checkpoint",
            str(tmp_path / "nothing"),
            "--output",
            str(tmp_path / "hf2"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert_user_error(proc, "nothing: no model here")


def snapshot(folder):
    """Every file under `folder` and its bytes: what 'nothing touched' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_and_consolidate_refuse_an_output_over_their_input(tmp_path, tokenizer_dir):
    """`export --checkpoint RUN --output RUN --overwrite` deleted the whole run and exited 0."""
    run = tmp_path / "run"
    save_model_dir(random_model(CASES["gpt2_tied"]), run, tokenizer_dir / "tokenizer.json")
    tag = run / "checkpoints" / "step00000002"  # a checkpoint as far as finding it goes: refused before it is read
    tag.mkdir(parents=True)
    (tag / "dsllm_complete.json").write_text(json.dumps({"step": 2, "zero_stage": 0}))
    (tmp_path / "link").symlink_to(run)
    before = snapshot(tmp_path)

    def dsllm(command, checkpoint, output, *extra):
        return subprocess.run(
            [sys.executable, "-m", "dsllm", command, "--checkpoint", str(checkpoint), "--output", str(output), *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )

    for checkpoint, output, relation in (
        (run, run, "contains"),
        (run, tmp_path / "link", "contains"),
        (tag, tag / "hf", "lies inside"),
        (run, tmp_path, "contains"),
    ):
        assert_user_error(
            dsllm("export", checkpoint, output, "--overwrite"),
            f"--output {output} {relation} ",
            "which --checkpoint reads",
            "choose another --output",
        )
    for checkpoint, output, relation in ((run, run, "contains"), (tag, tag, "is")):
        assert_user_error(
            dsllm("consolidate", checkpoint, output), f"--output {output} {relation} ", "which --checkpoint reads"
        )
    assert snapshot(tmp_path) == before
    proc = dsllm("export", run, run / "hf")  # a new folder inside the run reads none of it: allowed
    assert proc.returncode == 0, proc.stderr
    assert (run / "hf" / "model.safetensors").is_file()
