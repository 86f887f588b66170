"""--batch-size-warmup: the micro batches of a step are a pure function of the optimizer step (the linear ramp rounded
down to whole micro batches), the samples of the first steps add up, and pre-flight refuses what cannot ramp in one
line. The run itself (samples per step, kill -9, resume, 2 ranks) is tests/e2e/test_batch_warmup_run.py; the one-line
answers to bad flags are rows of tests/unit/test_bad_inputs.py."""

import pytest
from test_pipeline_layout import check

from dsllm.batch_warmup import BatchWarmup, batch_warmup
from dsllm.ds_config import Batch
from dsllm.errors import UserError


def test_the_accumulation_grows_linearly_rounded_down_then_stays():
    # 1 + 3 x step / 12, rounded down: 4 steps of each of 1, 2, 3 micro batches, then the run's 4
    ramp = BatchWarmup(per_micro=4, start=1, full=4, steps=12)
    assert [ramp.accumulation(s) for s in range(16)] == [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4
    assert [ramp.global_batch(s) for s in (0, 4, 8, 12, 100)] == [4, 8, 12, 16, 16]
    assert [BatchWarmup(8, 2, 8, 4).accumulation(s) for s in range(6)] == [2, 3, 5, 6, 8, 8]
    assert [BatchWarmup(1, 1, 2, 5).accumulation(s) for s in range(7)] == [1, 1, 1, 1, 1, 2, 2]


def test_the_samples_of_the_first_steps_add_up():
    ramp = BatchWarmup(per_micro=4, start=1, full=4, steps=12)
    assert [ramp.samples(n) for n in (0, 1, 4, 8, 12, 13, 16)] == [0, 4, 16, 48, 96, 112, 160]
    assert ramp.samples(16) == sum(ramp.global_batch(s) for s in range(16))


def test_the_default_start_is_one_micro_batch_per_data_parallel_rank():
    assert batch_warmup(10, None, Batch(4, 8, 2)) == BatchWarmup(8, 1, 8, 10)
    assert batch_warmup(10, 24, Batch(4, 8, 2)) == BatchWarmup(8, 3, 8, 10)
    assert batch_warmup(0, None, Batch(4, 8, 2)) is None


@pytest.mark.parametrize(
    "start, batch, message",
    [
        (12, Batch(4, 8, 2), "--batch-size-start 12: not a multiple of 8 samples (--micro-batch-size 4 x 2 data-"),
        (64, Batch(4, 8, 2), "below the global batch 64; use one of 8, 16, 24, 32, ..."),
        (None, Batch(4, 1, 2), "accumulates 1 micro batch per step, there is no smaller batch to ramp from; raise "),
    ],
)
def test_a_start_the_ramp_cannot_reach_is_refused(start, batch, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        batch_warmup(10, start, batch)


@pytest.mark.parametrize("layout", ["pipeline_parallel", "sequence_parallel"])
def test_data_parallel_ranks_ramp_and_pipeline_and_sequence_ranks_refuse_it_in_one_line(dataset_dir, tmp_path, layout):
    spec = check(dataset_dir, tmp_path, 2, "zero1.json", grad_accum=4, batch_size_warmup=4).spec
    assert spec.batch.global_size == 32 and spec.ds["gradient_accumulation_steps"] == 4  # the JSON keeps the run's
    with pytest.raises(UserError) as caught:
        check(dataset_dir, tmp_path, 2, "zero1.json", grad_accum=4, batch_size_warmup=4, **{layout: 2})
    message = str(caught.value)
    flag = "--" + layout.replace("_", "-")
    assert f"--batch-size-warmup with {flag} 2: not supported yet" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
