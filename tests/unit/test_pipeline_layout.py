"""Pipeline layouts: each one DeepSpeed cannot run is refused by pre-flight (one line naming the flag, before any
rank starts), and the pipeline's layers, each built apart, are the GPT's own, mapped back onto its parameter names. The
runs themselves (2 real ranks) are in tests/e2e/test_pipeline.py."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from runs import ROOT, free_port

from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import resolve_model_config
from dsllm.pipeline import PARTITIONS, layers_of, to_gpt_state
from dsllm.pretrain import preflight
from dsllm.train_config import PIPELINE_PARTITIONS, TrainConfig
from dsllm.world import World

SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "mlp_multiple_of": 32}


def check(dataset_dir, tmp_path, ranks, ds="zero1.json", model=None, **options):
    config = TrainConfig(
        ds_config=ds if "/" in ds else f"ds_configs/{ds}",
        data=str(dataset_dir),
        out=str(tmp_path / "run"),
        model_overrides={**SMALL, **(model or {})},
        **{"seq_len": 32, "micro_batch_size": 4, **options},
    )
    return preflight(config, World(rank=0, local_rank=0, size=ranks))


@pytest.mark.parametrize(
    "ranks, ds, model, options, message",
    [
        (2, "zero2.json", None, {}, "ZeRO-2 and 3 partition the gradients"),
        (2, "zero3.json", None, {}, "use ds_configs/zero1.json (or zero0.json) with pipeline stages"),
        (3, "zero1.json", None, {}, "the 3 rank(s) do not divide into 2 stages"),
        (4, "zero1.json", {"n_layers": 3}, {"pipeline_parallel": 4}, "more stages than the model's 3 transformer"),
        (2, "zero1.json", None, {"compile": True}, "--compile with --pipeline-parallel 2: not supported yet"),
        (2, "zero1.json", None, {"pipeline_partition": "uniform"}, "uniform leaves stage 1 of 2 without a transformer"),
    ],
)
def test_layouts_deepspeed_cannot_run_are_one_line(dataset_dir, tmp_path, ranks, ds, model, options, message):
    options = {"pipeline_parallel": 2, **options}
    with pytest.raises(UserError) as caught:
        check(dataset_dir, tmp_path, ranks, ds, model, **options)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_valid_layout_resolves_the_data_parallel_batch(dataset_dir, tmp_path):
    spec = check(dataset_dir, tmp_path, 4, pipeline_parallel=2, grad_accum=2).spec
    assert (spec.pipeline_stages, spec.data_parallel_size) == (2, 2)
    assert spec.batch.global_size == 4 * 2 * 2  # micro x micro batches x data-parallel replicas, not x ranks
    assert spec.ds["train_batch_size"] == 16
    last = check(dataset_dir, tmp_path, 4, pipeline_parallel=2).spec
    assert [dataclasses.replace(last, world=World(r, r, 4)).data_parallel_rank for r in range(4)] == [0, 1, 0, 1]
    with pytest.raises(UserError, match="--pipeline-partition layers: use blocks, uniform, parameters"):
        TrainConfig(ds_config="ds_configs/zero1.json", out="x", pipeline_partition="layers")
    assert tuple(PARTITIONS) == PIPELINE_PARTITIONS


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_the_layers_built_apart_are_the_gpts_and_map_back_to_its_names(tied, positions):
    """What DeepSpeed builds on the stages (each layer on its own; a tied spec once, its head as forward_fn) holds
    the values the whole GPT of the same seed has, under names `to_gpt_state` maps back, and running the layers in
    order is the GPT's forward."""
    from deepspeed.pipe import TiedLayerSpec

    config = resolve_model_config("tiny", {**SMALL, "tie_embeddings": tied, "positions": positions})
    gpt = GPT(config, seed=1234)
    layers, built, state, run = layers_of(config, 1234), {}, {}, []
    assert len(layers) == config.n_layers + 3
    for index, spec in enumerate(layers):
        if isinstance(spec, TiedLayerSpec):
            module = built.setdefault(spec.key, spec.build())
            if spec.forward_fn is not None:  # the tied head: the embedding's weight, saved with layer 0
                run.append(functools.partial(spec.forward_fn, module))
                continue
        else:
            module = spec.build()
        run.append(module)
        state.update(to_gpt_state(config.n_layers, index, module.state_dict()))
    expected = {k: v for k, v in gpt.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not torch.equal(state["blocks.0.attn.qkv.weight"], GPT(config, seed=1235).blocks[0].attn.qkv.weight)
    idx = torch.randint(0, config.vocab_size, (2, 16))
    x = idx
    for layer in run:
        x = layer(x)
    assert torch.equal(x, gpt(idx)[0])


RECOMPUTES = """
import json, sys, torch, deepspeed
from dsllm.model_config import resolve_model_config
from dsllm.pipeline import BlockPipe, next_token_loss, pipeline_module
deepspeed.init_distributed(dist_backend="gloo")
calls = {}
for mode in ("none", "torch", "deepspeed"):
    config = resolve_model_config("tiny", {**json.loads(sys.argv[1]), "activation_checkpointing": mode})
    module = pipeline_module(config, 0, 1, "blocks").train()
    count = [0]
    for layer in module.forward_funcs:
        if isinstance(layer, BlockPipe):
            # a pre-hook: torch's non-reentrant checkpoint stops a recompute early, before forward hooks run
            layer.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    idx = torch.randint(0, 64, (2, 16))
    module._precompute_checkpointable_values()  # as DeepSpeed's PipelineEngine does when it takes the module
    next_token_loss(module(idx), idx).backward()
    calls[mode] = count[0]
print(json.dumps(calls))
"""


def test_activation_checkpointing_recomputes_each_block_of_a_stage(tmp_path):
    """A stage's blocks run forward once more in backward when the model asks for activation checkpointing
    (torch's or DeepSpeed's); the 2-rank curve with it is in tests/e2e/test_pipeline.py."""
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(free_port())
    small = {**SMALL, "n_layers": 3, "vocab_size": 64}
    proc = subprocess.run(
        [sys.executable, "-c", RECOMPUTES, json.dumps(small)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"none": 3, "torch": 6, "deepspeed": 6}
