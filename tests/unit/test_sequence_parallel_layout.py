"""Sequence-parallel layouts in pre-flight (no ranks started): what DeepSpeed-Ulysses cannot split is one line before
any rank starts; a valid layout resolves the data-parallel batch and which piece of every window each rank reads.
The runs themselves (real ranks) are in tests/e2e/test_sequence_parallel.py."""

import dataclasses
import json

import pytest
import torch
from test_pipeline_layout import check

from dsllm.data.loader import TokenWindows
from dsllm.errors import UserError
from dsllm.world import World


@pytest.mark.parametrize(
    "ranks, model, options, message",
    [
        (3, None, {}, "--sequence-parallel 2: the 3 rank(s) do not divide into sequence groups of 2"),
        (2, {"n_heads": 2, "n_kv_heads": 1}, {}, "model.n_kv_heads = 1 is not divisible by 2"),
        (4, {"n_heads": 6, "n_kv_heads": 6, "d_model": 96}, {"sequence_parallel": 4}, "model.n_heads = 6 is not"),
        (2, None, {"seq_len": 31}, "--seq-len 31 is not divisible by 2"),
        (2, {"dropout": 0.1}, {}, "--model.dropout 0.1: the ranks of a sequence group would draw the same dropout"),
        (2, None, {"ds": "zero3.json"}, "--sequence-parallel 2 with ZeRO-3: not supported yet"),
        (4, None, {"tensor_parallel": 2}, "--sequence-parallel 2 with --tensor-parallel 2: not supported yet"),
        (4, None, {"pipeline_parallel": 2}, "--sequence-parallel 2 with --pipeline-parallel 2: not supported yet"),
        (2, {"moe_experts": 4}, {}, "--sequence-parallel 2 with --model.moe_experts 4: not supported yet"),
        (2, None, {"document_mask": True}, "--sequence-parallel 2 with --document-mask: not supported yet"),
        (2, None, {"seq_len_warmup": 2}, "--sequence-parallel 2 with --seq-len-warmup 2: not supported yet"),
        (2, None, {"compile": True}, "--sequence-parallel 2 with --compile: not supported yet"),
    ],
)
def test_layouts_ulysses_cannot_split_are_one_line(dataset_dir, tmp_path, ranks, model, options, message):
    options = {"sequence_parallel": 2, **options}
    ds = options.pop("ds", "zero1.json")
    with pytest.raises(UserError) as caught:
        check(dataset_dir, tmp_path, ranks, ds, model, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_json_with_its_own_sequence_parallel_size_is_refused(dataset_dir, tmp_path):
    (tmp_path / "sp.json").write_text(json.dumps({"sequence_parallel_size": 2}))
    with pytest.raises(UserError, match='has "sequence_parallel_size"; remove it and use --sequence-parallel N'):
        check(dataset_dir, tmp_path, 2, str(tmp_path / "sp.json"), sequence_parallel=2)


def test_a_valid_layout_resolves_the_batch_and_the_pieces(dataset_dir, tmp_path):
    spec = check(dataset_dir, tmp_path, 4, sequence_parallel=2, grad_accum=2).spec
    assert (spec.sequence_parallel, spec.data_parallel_size) == (2, 2)
    assert spec.batch.global_size == 4 * 2 * 2  # micro x accumulation x data-parallel replicas, not x ranks
    assert spec.ds["train_batch_size"] == 16
    # DeepSpeed's sequence groups are consecutive ranks: ranks 0,1 read replica 0's windows, pieces 0 and 1
    ranks = [dataclasses.replace(spec, world=World(r, r, 4)) for r in range(4)]
    assert [(s.data_parallel_rank, s.sequence_parallel_rank) for s in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert spec.layout() == " (2 sequence-parallel x 2 data-parallel; sequence groups: ranks 0-1, 2-3)"


def test_each_rank_reads_its_piece_of_every_window_and_the_next_token(dataset_dir):
    whole = TokenWindows(dataset_dir / "train", 32)
    pieces = [TokenWindows(dataset_dir / "train", 32, piece=(p, 4)) for p in range(4)]
    assert all(len(p) == len(whole) for p in pieces)
    for index in (0, 5, len(whole) - 1):
        window = whole[index]
        for p, windows in enumerate(pieces):
            assert torch.equal(windows[index], window[p * 8 : p * 8 + 9])  # 8 inputs, and the target of the last
    with pytest.raises(ValueError, match="piece 0 of 3: not an equal piece of a 32-token window"):
        TokenWindows(dataset_dir / "train", 32, piece=(0, 3))
