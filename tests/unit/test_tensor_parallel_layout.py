"""Tensor-parallel layouts in pre-flight (no ranks started): what AutoTP cannot split is one line, exit 2 in the
command; a valid layout resolves the data-parallel batch, the rank layout and DeepSpeed's AutoTP section."""

import dataclasses
import json

import pytest
from test_pipeline_layout import check

from dsllm.errors import UserError
from dsllm.world import World


@pytest.mark.parametrize(
    "ranks, model, options, message",
    [
        (3, None, {}, "the 3 rank(s) do not divide into groups of 2"),
        (2, {"n_heads": 2, "n_kv_heads": 1, "d_model": 64}, {}, "model.n_kv_heads = 1 is not divisible by 2"),
        (4, {"n_heads": 6, "n_kv_heads": 6, "d_model": 96}, {"tensor_parallel": 4}, "model.n_heads = 6 is not"),
        (2, {"mlp_hidden": 33}, {}, "the MLP hidden size (model.mlp_hidden) = 33 is not divisible by 2"),
        (2, {"vocab_size": 321}, {}, "model.vocab_size = 321 is not divisible by 2"),
        (2, {"dropout": 0.1}, {}, "--model.dropout 0.1: the tensor-parallel ranks would draw the same dropout"),
        (2, None, {"compile": True}, "--compile with --tensor-parallel 2: not supported yet"),
        (2, None, {"ds": "zero0.json"}, "--tensor-parallel 2 with ZeRO-0: use ds_configs/zero1.json or zero2.json"),
        (2, None, {"ds": "zero3.json"}, "fails on ZeRO-3 AutoTP checkpoints (DeepSpeed 0.19.8)"),
        (6, None, {"pipeline_parallel": 2}, "the 6 rank(s) do not divide into groups of 2 x 2 pipeline stages"),
        (4, {"qk_norm": True}, {"pipeline_parallel": 2}, "--pipeline-parallel 2 and --model.qk_norm: not supported"),
        (2, {"z_loss": 1e-4}, {}, "--tensor-parallel 2 with --model.z_loss 0.0001: not supported yet"),
    ],
)
def test_layouts_autotp_cannot_split_are_one_line(dataset_dir, tmp_path, ranks, model, options, message):
    options = {"tensor_parallel": 2, **options}
    ds = options.pop("ds", "zero1.json")
    with pytest.raises(UserError) as caught:
        check(dataset_dir, tmp_path, ranks, ds, model, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_json_with_its_own_tensor_parallel_section_is_refused(dataset_dir, tmp_path):
    config = {"train_micro_batch_size_per_gpu": "auto", "tensor_parallel": {"autotp_size": 2}}
    (tmp_path / "tp.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match='has a "tensor_parallel" section; remove it and use --tensor-parallel N'):
        check(dataset_dir, tmp_path, 2, str(tmp_path / "tp.json"), tensor_parallel=2)


def test_a_valid_layout_resolves_the_batch_the_ranks_and_autotp(dataset_dir, tmp_path):
    spec = check(dataset_dir, tmp_path, 4, tensor_parallel=2, grad_accum=2).spec
    assert (spec.tensor_parallel, spec.data_parallel_size) == (2, 2)
    assert spec.batch.global_size == 4 * 2 * 2  # micro x accumulation x data-parallel replicas, not x ranks
    assert spec.ds["train_batch_size"] == 16
    # AutoTP's mesh numbers the tensor axis fastest: ranks 0,1 are replica 0, ranks 2,3 replica 1
    ranks = [dataclasses.replace(spec, world=World(r, r, 4)) for r in range(4)]
    assert [(s.data_parallel_rank, s.tensor_parallel_rank) for s in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert spec.layout() == " (2 tensor-parallel x 2 data-parallel; tensor groups: ranks 0-1, 2-3)"
    section = spec.ds["tensor_parallel"]
    assert section["autotp_size"] == 2 and section["vocab_parallel_lm_head"] is True
    qkv = section["partition_config"]["layer_specs"][0]
    head = spec.model.head_dim
    assert qkv["shape"] == [[4 * head, 2 * head, 2 * head], -1]  # [q | k | v] of 4 query and 2 key/value heads
    plain = check(dataset_dir, tmp_path, 2).spec
    assert "tensor_parallel" not in plain.ds and plain.layout() == ""
    # 3D: DeepSpeed's pipe x data x model grid, the model axis fastest: rank = (stage * D + replica) * T + tensor
    cube = check(dataset_dir, tmp_path, 8, tensor_parallel=2, pipeline_parallel=2).spec
    ranks = [dataclasses.replace(cube, world=World(r, r, 8)) for r in range(8)]
    assert [s.data_parallel_rank for s in ranks] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert cube.layout() == (
        " (2 pipeline stages x 2 tensor-parallel x 2 data-parallel; tensor groups: ranks 0-1, 2-3, 4-5, 6-7)"
    )
    assert cube.ds["tensor_parallel"]["vocab_parallel_lm_head"] is False  # the head is a pipeline layer of its own
