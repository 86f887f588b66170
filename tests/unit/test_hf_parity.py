"""The exported folder, used the way the transformers docs show (`AutoTokenizer` + `AutoModelForCausalLM.generate`),
continues a prompt with exactly the tokens `python -m dsllm generate --temperature 0` writes, and says nothing
about `max_length` on the way."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsllm.errors import run_cli
from dsllm.export import main as export_main
from dsllm.generate import main as generate_main
from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.model_dir import save_model_dir
from dsllm.tokenizer import load_tokenizer

TOKENIZER_VOCAB = 300  # the conftest tokenizer's
FAMILIES = {
    "gpt2": dict(),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2, tie_embeddings=False),
}
PROMPTS = ["doc 5: the model", "every rank keeps its own slice of"]
NEW_TOKENS = 12


def model_folder(path, tokenizer_dir, family):
    """A random model whose embedding is padded past the tokenizer (320 > 300 ids), with the padding rows made the
    likeliest: `dsllm generate` never produces them, so neither may transformers."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=320, max_seq_len=64, n_layers=2, d_model=32, n_heads=4, **FAMILIES[family])
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # sharper than the init, so greedy choices are not near-ties
            p.mul_(4)
        model.lm_head.weight[TOKENIZER_VOCAB:] += 5.0
    save_model_dir(model, path, tokenizer_dir / "tokenizer.json")
    return model


def dsllm_greedy(run, prompt, capfd) -> str:
    """What `python -m dsllm generate --temperature 0` writes after the prompt (it echoes the prompt, then a line
    break ends the continuation)."""
    capfd.readouterr()
    args = ["--checkpoint", str(run), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]
    assert run_cli(generate_main, args) == 0
    out = capfd.readouterr().out
    assert out.startswith(prompt) and out.endswith("\n")
    return out[len(prompt) : -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_generate_matches_dsllm_generate(tmp_path, tokenizer_dir, family, capfd, caplog):
    model = model_folder(tmp_path / "run", tokenizer_dir, family)
    assert run_cli(export_main, ["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    expected = {prompt: dsllm_greedy(tmp_path / "run", prompt, capfd) for prompt in PROMPTS}
    ours = load_tokenizer(tokenizer_dir)
    eot = ours.token_to_id("<|endoftext|>")

    capfd.readouterr()
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        for prompt in PROMPTS:  # the documented usage, word for word
            inputs = tok(prompt, return_tensors="pt")
            context = [eot] + ours.encode(prompt).ids  # what dsllm generate feeds its model
            assert inputs["input_ids"][0].tolist() == context
            out = hf.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
            continuation = out[0, len(context) :].tolist()
            assert (
                continuation
                == model.generate([context], NEW_TOKENS, temperature=0, eos_id=eot, vocab_size=TOKENIZER_VOCAB)[0]
            )
            assert max(continuation) < TOKENIZER_VOCAB
            assert tok.decode(continuation, skip_special_tokens=True) == expected[prompt]
        # a batch: padded on the left with the pad token, each row continues as it does alone
        batch = tok(PROMPTS, return_tensors="pt", padding=True)
        out = hf.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
        for row, prompt in zip(out, PROMPTS):
            text = tok.decode(row[batch["input_ids"].shape[1] :], skip_special_tokens=True)
            assert text == expected[prompt]
    said = capfd.readouterr().err + caplog.text + "".join(str(w.message) for w in caught)  # logging and warnings
    assert "max_length" not in said and "attention_mask" not in said, said
    assert len(set(expected.values())) == 2 and all(len(text) > NEW_TOKENS // 2 for text in expected.values())


def test_the_warning_check_can_fail(tmp_path, tokenizer_dir, caplog):
    """The negative control: a generation_config.json with max_length, as the export wrote before, makes
    transformers complain on every call that passes max_new_tokens, and the check above sees it."""
    model_folder(tmp_path / "run", tokenizer_dir, "gpt2")
    assert run_cli(export_main, ["--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf")]) == 0
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert "max_length" not in generation and generation["suppress_tokens"] == list(range(TOKENIZER_VOCAB, 320))
    generation["max_length"] = 64
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(generation))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    caplog.clear()
    hf.generate(**tok(PROMPTS[0], return_tensors="pt"), do_sample=False, max_new_tokens=4)
    assert "max_length" in caplog.text
