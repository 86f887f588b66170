"""--seq-len-warmup on a real run: the window length grows as the schedule says (logged with each step), a step trains
on the loader's full windows cut to that length, and a run killed with -9 mid-warmup and resumed continues bit for
bit across the change of length (the loader's order never changes; the length comes back with DeepSpeed's step)."""

import itertools

import pytest
import torch
from runs import killed_then_resumed, pretrain, train_records

from dsllm.data.loader import ResumableLoader, TokenWindows
from dsllm.engine import window_loss
from dsllm.model_dir import load_model_dir
from dsllm.seq_len_warmup import cut_windows

STEPS, MICRO, ACCUMULATION = 16, 4, 2
# windows of 16 tokens for steps 1-4, 32 for 5-12, 64 from 13 on (tests/unit/test_seq_len_warmup.py)
LENGTHS = [16] * 4 + [32] * 8 + [64] * 4
RUN = ["--max-steps", STEPS, "--seq-len", 64, "--seq-len-warmup", 12, "--seq-len-start", 16, "--precision", "fp32"]
RUN += ["--micro-batch-size", MICRO, "--grad-accum", ACCUMULATION, "--eval-interval", 8, "--save-interval", 4]


def test_kill_9_mid_warmup_then_resume_continues_exactly(dataset_dir, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    proc = pretrain(dataset_dir, reference, *RUN)
    assert "windows from 16 tokens over 12 steps" in proc.stdout and "| seq_len 32" in proc.stdout
    uninterrupted = train_records(reference)
    assert [uninterrupted[s]["seq_len"] for s in range(1, STEPS + 1)] == LENGTHS
    # step 9 is its 2 micro batches of the loader's windows (16 before it), each cut into 32-token windows, on the
    # weights of step 8: the length follows optimizer steps, not micro batches (those would say step 16, 64 tokens)
    model = load_model_dir(reference / "checkpoints" / "step00000008").eval()
    batches = iter(ResumableLoader(TokenWindows(dataset_dir / "train", 64), MICRO, seed=1234))
    with torch.no_grad():
        step9 = [window_loss(model, cut_windows(b, 32), torch.device("cpu")) for b in itertools.islice(batches, 16, 18)]
    assert torch.stack(step9).mean().item() == pytest.approx(uninterrupted[9]["loss"], rel=1e-6)

    killed_then_resumed(dataset_dir, out, *RUN)  # resumed at step 8 (or 12): the next change of length after it
    records = train_records(out)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(records[s]["loss"] == uninterrupted[s]["loss"] for s in records)  # bit for bit
    assert [records[s]["seq_len"] for s in range(1, STEPS + 1)] == LENGTHS
