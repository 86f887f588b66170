"""Scoring a whole split (`dsllm.scoring.split_totals`, what `dsllm evaluate` scores by default and
benchmarks/quality.py reports): every target, the tail after the last full window included, equal to a sum of
per-token losses computed with the model directly."""

from __future__ import annotations

import math

import pytest
import torch

SEQ_LEN = 16


@pytest.fixture(scope="module")
def scored(dataset_dir):
    from dsllm.data.format import TokenFile
    from dsllm.data.loader import TokenWindows
    from dsllm.model import GPT
    from dsllm.model_config import ModelConfig
    from dsllm.scoring import split_totals, token_byte_lengths
    from dsllm.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=300, max_seq_len=SEQ_LEN, n_layers=1, d_model=16, n_heads=2)).eval()
    tokens = TokenFile(dataset_dir / "val")
    lengths = token_byte_lengths(load_tokenizer(dataset_dir / "tokenizer.json"))
    windows = TokenWindows(tokens, SEQ_LEN)
    return model, tokens, lengths, windows, split_totals(model, windows, 3, "cpu", lengths)


def test_the_split_has_a_tail_the_windows_leave_out(scored):
    _, tokens, _, windows, _ = scored
    left_out = tokens.num_tokens - 1 - len(windows) * SEQ_LEN
    assert 0 < left_out < SEQ_LEN  # else the test proves nothing: pick another SEQ_LEN
    tail = windows.tail()
    assert len(tail) == left_out + 1
    assert tail.tolist() == tokens.tokens[len(windows) * SEQ_LEN :].tolist()
    assert len(windows) == (tokens.num_tokens - 1) // SEQ_LEN  # the training windows are as they were


def test_whole_split_counts_every_target_and_its_bytes(scored):
    _, tokens, lengths, _, (_, targets, n_bytes) = scored
    ids = torch.from_numpy(tokens.tokens[:].astype("int64"))
    assert targets == tokens.num_tokens - 1
    assert n_bytes == lengths[ids[1:]].sum().item() > targets  # BPE tokens stand for more than a byte on average


def test_whole_split_equals_a_brute_force_sum_of_per_token_losses(scored):
    """Each target's -log p from the model's own logits, with the context since its window's start."""
    model, tokens, _, _, (nll, _, _) = scored
    ids = torch.from_numpy(tokens.tokens[:].astype("int64"))
    brute = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ_LEN):
            inputs = ids[start : min(start + SEQ_LEN, len(ids) - 1)]
            targets = ids[start + 1 : start + 1 + len(inputs)]
            logits, _ = model(inputs[None])
            log_probs = logits[0].double().log_softmax(-1)
            brute -= log_probs[torch.arange(len(targets)), targets].sum().item()
    assert nll == pytest.approx(brute, rel=1e-6)
    assert math.isfinite(nll) and nll > 0
