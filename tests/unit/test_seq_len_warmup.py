"""--seq-len-warmup: the window length is a pure function of the optimizer step (short windows first, doubling to
--seq-len), a micro batch cut into shorter windows trains each piece as a window of its own (with --document-mask too),
and pre-flight refuses what cannot work in one line. The run itself (kill -9, resume) is
tests/e2e/test_seq_len_warmup.py; the one-line answers to bad flags are rows of tests/unit/test_bad_inputs.py."""

import pytest
import torch
from test_pipeline_layout import check

from dsllm.engine import document_window_loss, window_loss
from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import resolve_model_config
from dsllm.seq_len_warmup import SeqLenWarmup, cut_windows, seq_len_warmup

EOT = 0
SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 64, "mlp_multiple_of": 32}


def test_the_length_grows_linearly_rounded_down_to_halves_of_seq_len():
    # 16 + 4 x step, rounded down to 16, 32, 64: 32 from step 4, 64 from the warmup's end (step 12) on
    assert [SeqLenWarmup(64, 16, 12).length(s) for s in range(15)] == [16] * 4 + [32] * 8 + [64] * 3
    assert [SeqLenWarmup(64, 8, 6).length(s) for s in range(8)] == [8, 16, 16, 32, 32, 32, 64, 64]
    assert [SeqLenWarmup(1024, 512, 3).length(s) for s in range(4)] == [512, 512, 512, 1024]


@pytest.mark.parametrize("seq_len, start", [(1024, 128), (64, 8), (32, 8), (48, 12), (100, 25)])
def test_the_default_start_is_an_eighth_of_seq_len_and_at_least_8_tokens(seq_len, start):
    assert seq_len_warmup(10, None, seq_len) == SeqLenWarmup(seq_len, start, 10)
    assert seq_len_warmup(0, None, seq_len) is None


@pytest.mark.parametrize(
    "start, seq_len, message",
    [
        (24, 64, "--seq-len-start 24: not --seq-len 64 halved; use one of 32, 16, 8, 4, 2, 1"),
        (64, 64, "--seq-len-start 64: not --seq-len 64 halved"),
        (None, 12, "--seq-len 12 has no half of 8 tokens or more to start from; pass --seq-len-start (one of 6, 3)"),
        (None, 63, "--seq-len 63 is odd, no shorter window divides it"),
    ],
)
def test_a_start_that_does_not_halve_seq_len_is_refused(start, seq_len, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        seq_len_warmup(10, start, seq_len)


def windows(generator, rows=2, seq_len=64):
    """Random windows of seq_len + 1 tokens with documents starting (<|endoftext|>) here and there, one of them on a
    piece's first input (the token two pieces share)."""
    batch = torch.randint(1, 64, (rows, seq_len + 1), generator=generator)
    batch[:, [5, 16, 40]] = EOT
    return batch


@pytest.mark.parametrize("document_mask", [False, True])
def test_a_cut_batch_trains_each_piece_as_a_window_alone(document_mask):
    model = GPT(resolve_model_config("tiny", {**SMALL, "max_seq_len": 64}), seed=0).eval()
    batch, cpu = windows(torch.Generator().manual_seed(1)), torch.device("cpu")
    pieces = cut_windows(batch, 16)
    assert pieces.shape == (8, 17)
    # every target of the window once, in order: piece j's last target is piece j + 1's first input
    assert torch.equal(pieces[:, 1:].reshape(2, 64), batch[:, 1:])
    assert torch.equal(pieces[:-1, -1], pieces[1:, 0]) and torch.equal(pieces[::4, 0], batch[:, 0])
    loss_of = document_window_loss(EOT) if document_mask else window_loss
    with torch.no_grad():
        cut = loss_of(model, pieces, cpu)
        alone = torch.stack([loss_of(model, piece[None], cpu) for piece in pieces])
        whole = loss_of(model, batch, cpu)
    assert cut.item() == pytest.approx(alone.mean().item(), rel=1e-6)  # the same number of targets in each piece
    assert abs(cut.item() - whole.item()) > 1e-4  # shorter contexts: another loss


@pytest.mark.parametrize(
    "ranks, ds, options",
    [
        (1, "zero3.json", {"document_mask": True}),
        (2, "zero1.json", {"tensor_parallel": 2}),
        (2, "zero2.json", {}),
    ],
)
def test_layouts_that_only_see_another_batch_shape_are_accepted(dataset_dir, tmp_path, ranks, ds, options):
    spec = check(dataset_dir, tmp_path, ranks, ds, seq_len_warmup=4, **options).spec
    assert spec.seq_len == 32 and spec.tokens_per_step == 32 * spec.batch.global_size  # the loader's full windows


def test_pipeline_stages_refuse_it_in_one_line(dataset_dir, tmp_path):
    with pytest.raises(UserError) as caught:
        check(dataset_dir, tmp_path, 2, "zero1.json", pipeline_parallel=2, seq_len_warmup=4)
    message = str(caught.value)
    assert "--seq-len-warmup with --pipeline-parallel 2: not supported yet" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
