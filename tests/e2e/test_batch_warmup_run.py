"""--batch-size-warmup on a real run: each step trains on the ramp's number of micro batches (the loader's samples
say so), the tokens and the lr follow the steps as they should, a run killed with -9 mid-ramp and resumed continues
bit for bit, and 2 data-parallel ranks on ZeRO-2 ramp to the same losses as one rank (the accumulation boundaries,
where ZeRO-2 reduces the gradients, move with the ramp)."""

import itertools
import json

import pytest
import torch
from runs import killed_then_resumed, pretrain, train_records

from dsllm.data.loader import ResumableLoader, TokenWindows
from dsllm.engine import window_loss
from dsllm.model_dir import load_model_dir
from dsllm.train_config import TrainConfig

STEPS, MICRO, ACCUMULATION, SEQ_LEN = 16, 4, 4, 32
# 1 + 3 x step / 10 micro batches (0-based step): 1 for steps 1-4, 2 for 5-7, 3 for 8-10, the run's 4 from 11 on.
# DeepSpeed's own boundary test, (micro_steps + 1) % accumulation == 0, would end step 8 after its 2nd micro batch
BATCHES = [4] * 4 + [8] * 3 + [12] * 3 + [16] * 6
RUN = ["--max-steps", STEPS, "--batch-size-warmup", 10, "--precision", "fp32", "--schedule", "wsd"]
RUN += ["--grad-accum", ACCUMULATION, "--eval-interval", 8, "--save-interval", 4]


@pytest.fixture(scope="module")
def reference(dataset_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch-warmup") / "reference"
    proc = pretrain(dataset_dir, out, *RUN, "--micro-batch-size", MICRO)
    return out, proc


def test_each_step_trains_the_ramps_batch_with_the_same_lr_schedule(reference):
    out, proc = reference
    assert (
        "global batch 16 x 32 tokens, batch from 4 over 10 steps" in proc.stdout and "| global batch 8" in proc.stdout
    )
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["batch_size_warmup"], train["batch_size_start"]) == (10, None)
    records = train_records(out)
    assert [records[s]["global_batch"] for s in range(1, STEPS + 1)] == BATCHES
    consumed = [records[s]["samples"] for s in range(1, STEPS + 1)]
    assert [b - a for a, b in zip([0, *consumed], consumed)] == BATCHES  # the loader's samples, step by step
    assert [records[s]["tokens"] for s in range(1, STEPS + 1)] == [c * SEQ_LEN for c in consumed]
    schedule = TrainConfig(ds_config="x", out="x", max_steps=STEPS, schedule="wsd", lr=3e-3).lr_schedule()
    assert all(records[s]["lr"] == pytest.approx(3e-3 * schedule.factor(s), rel=1e-9) for s in records)  # by step


def test_a_step_is_its_micro_batches_on_the_weights_before_it(dataset_dir, reference):
    # step 9: the loader's micro batches 13-15 (52 samples before it), all three on the weights of step 8, the
    # optimizer step after the third (a boundary after the second would score the third on updated weights)
    model = load_model_dir(reference[0] / "checkpoints" / "step00000008").eval()
    batches = iter(ResumableLoader(TokenWindows(dataset_dir / "train", SEQ_LEN), MICRO, seed=1234))
    with torch.no_grad():
        step9 = [window_loss(model, b, torch.device("cpu")) for b in itertools.islice(batches, 13, 16)]
    assert torch.stack(step9).mean().item() == pytest.approx(train_records(reference[0])[9]["loss"], rel=1e-6)


def test_kill_9_mid_ramp_then_resume_continues_exactly(dataset_dir, tmp_path, reference):
    uninterrupted = train_records(reference[0])
    out = tmp_path / "killed"
    killed_then_resumed(dataset_dir, out, *RUN, "--micro-batch-size", MICRO)  # at step 8 (or 12) of 3 micro batches
    records = train_records(out)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(records[s]["loss"] == uninterrupted[s]["loss"] for s in records)  # bit for bit
    assert all(records[s]["samples"] == uninterrupted[s]["samples"] for s in records)


def test_two_ranks_on_zero2_ramp_to_the_same_losses(dataset_dir, tmp_path, reference):
    uninterrupted = train_records(reference[0])
    out = tmp_path / "two"
    pretrain(dataset_dir, out, *RUN, "--micro-batch-size", MICRO // 2, ranks=2)  # 2 x 2 samples a micro batch
    records = train_records(out)
    assert [records[s]["global_batch"] for s in range(1, STEPS + 1)] == BATCHES
    for step in range(1, STEPS + 1):
        assert records[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], rel=1e-5), step
