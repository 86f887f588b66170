"""Continued pretraining from a Hugging Face model (issue 17): a random LlamaForCausalLM built locally, with a
Llama-style tokenizer (<s> and </s>, no <|endoftext|>, a post-processor that adds <s>), is imported; a corpus is
prepared with its tokenizer (<s> before every document, its hash stamped); `pretrain --init` continues from it on
DeepSpeed (ZeRO-2): validation loss falls below the imported model's, kill -9 and --resume auto continue bit for bit,
and generate and export read the result."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from runs import dsllm, killed_then_resumed, pretrain, train_records
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CONTINUE = ("--max-steps", 12, "--micro-batch-size", 4, "--save-interval", 4, "--eval-interval", 6)


def llama_style_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory, corpus_texts, corpus_jsonl):
    """(model folder, dataset prepared with its tokenizer, the imported model's validation loss)."""
    root = tmp_path_factory.mktemp("continued")
    tokenizer = llama_style_tokenizer(corpus_texts)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "hf")
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    out = dsllm("import", "--hf", root / "hf", "--output", root / "model")
    assert out.returncode == 0, out.stderr
    data = root / "data"
    prep = dsllm("prepare", "--input", corpus_jsonl, "--tokenizer", root / "model", "--output", data,
                 "--val-fraction", "0.1", "--workers", "1")  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    scored = dsllm("evaluate", "--checkpoint", root / "model", "--data", data, "--max-windows", 8, "--seq-len", 32)
    assert scored.returncode == 0, scored.stderr
    return root / "model", data, json.loads(scored.stdout)["loss"]


def test_the_dataset_separates_documents_with_the_imported_tokenizers_bos(imported):
    model, data, _ = imported
    meta = json.loads((data / "meta.json").read_text())
    bos = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id("<s>")
    assert meta["tokenizer"]["eot_id"] == bos
    tokens = np.memmap(data / "train.bin", dtype=np.dtype(meta["splits"]["train"]["dtype"]), mode="r")
    assert tokens[-1] == bos and (tokens == bos).sum() > 100  # one after every document: before the next


@pytest.mark.slow  # three short runs on one rank: ~40 s on 2 CPU cores
def test_continued_pretraining_lowers_val_loss_and_resumes_bit_for_bit(imported, tmp_path):
    model, data, imported_loss = imported
    straight = pretrain(data, tmp_path / "straight", "--init", model, *CONTINUE, model=())
    assert f"starting from the weights of {model}" in straight.stdout
    final = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in final if "val_loss" in r]
    assert val and val[-1] < imported_loss - 0.3, (imported_loss, val)
    resumed = tmp_path / "resumed"
    killed_then_resumed(data, resumed, "--init", model, *CONTINUE, model=())
    ours, theirs = train_records(resumed), train_records(tmp_path / "straight")
    assert sorted(ours) == list(range(1, 13)) and all(ours[s]["loss"] == theirs[s]["loss"] for s in ours)
    sample = dsllm("generate", "--checkpoint", resumed, "--prompt", "the", "--max-new-tokens", 5, "--temperature", 0)
    assert sample.returncode == 0, sample.stderr
    exported = dsllm("export", "--checkpoint", resumed, "--output", tmp_path / "hf")
    assert exported.returncode == 0, exported.stderr
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    bos = hf_tokenizer.convert_tokens_to_ids("<s>")
    assert hf_tokenizer("the model")["input_ids"][:2] != [bos, bos]  # one <s>: the imported template is replaced
    assert hf_tokenizer("the model")["input_ids"][0] == bos
    shutil.rmtree(tmp_path / "hf")
