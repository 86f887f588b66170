"""Continued pretraining: a pretraining run that starts from a trained model's weights (`--init`), not random ones.

The model is the --init folder's (its config.json, the shapes its weights have); `--model.FIELD` may change only
what no weight's shape depends on (`model_config.WEIGHT_FREE_FIELDS`): RoPE and its scaling, the context of a RoPE
model, dropout and recompute. That is how a model trained at a short context is extended to a longer one
(`--model.rope_scaling yarn --model.max_seq_len 4x`). The dataset must be tokenized as the model was. Pre-flight
reads the weights on the CPU (a damaged file is said before any rank starts); `dsllm.pretrain.run` loads them into
the run's model before DeepSpeed wraps it, and the optimizer and schedule start fresh at step 0. A run folder
with checkpoints of its own resumes them (`--resume auto`): the weights of --init are for a fresh start only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import UserError
from dsllm.model_config import WEIGHT_FREE_FIELDS, ModelConfig, continued_model_config, resolve_model_config

if TYPE_CHECKING:
    import torch

    from dsllm.run_spec import RunSpec
    from dsllm.train_config import TrainConfig


def init_model_config(config: TrainConfig, data_tokenizer_hash: bytes, data_dir: Path) -> ModelConfig:
    """The run's model: the --init folder's with the --model.FIELD overrides its weights allow; refuses a dataset
    tokenized otherwise and a --model that names another model. Nothing is written, the weights are not read."""
    from dsllm.model_dir import model_tokenizer, read_model_config, resolve_model_source
    from dsllm.tokenizer import tokenizer_hash

    config_file, _, home = resolve_model_source(config.init)
    trained = read_model_config(config_file)
    tokenizer, tokenizer_file = model_tokenizer(home)
    if tokenizer_hash(tokenizer) != data_tokenizer_hash:
        raise UserError(
            f"--init {config.init}: its tokenizer ({tokenizer_file}) is not the one --data {data_dir} was made with; "
            f"continue on a dataset prepared with it (data_pipeline/prepare.py --tokenizer {tokenizer_file})"
        )
    if config.model is not None:  # the same model named again is harmless; another one is a mistake
        named = resolve_model_config(config.model)
        shaping = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("vocab_size", *WEIGHT_FREE_FIELDS)]
        differ = [name for name in shaping if getattr(named, name) != getattr(trained, name)]
        if differ:
            name = differ[0]
            raise UserError(
                f"--model {config.model}: not the model of --init {config.init} ({name} = {getattr(named, name)!r}, "
                f"there {getattr(trained, name)!r}); drop --model: the model comes from --init"
            )
    return continued_model_config(trained, config.model_overrides, f"--init {config.init}")


def check_init_layout(spec: RunSpec, config: TrainConfig) -> None:
    """The weights load into the whole model each rank builds: data parallelism with ZeRO-0/1/2 (dense or with
    every expert on each rank). ZeRO-3 (partitioned as built), pipeline stages, tensor and expert shards build only
    a part of it."""
    parts = (
        (spec.zero_stage == 3, f"{config.ds_config} (ZeRO-3)"),
        (spec.pipeline_stages > 1, f"--pipeline-parallel {spec.pipeline_stages}"),
        (spec.tensor_parallel > 1, f"--tensor-parallel {spec.tensor_parallel}"),
        (spec.expert_parallel > 1, f"--expert-parallel {spec.expert_parallel}"),
    )
    layout = next((what for partial, what in parts if partial), None)
    if layout is not None:
        raise UserError(
            f"--init {config.init} with {layout}: not supported yet (the weights load into a whole model on each "
            "rank); use data parallelism with ds_configs/zero0.json, zero1.json or zero2.json"
        )


def init_weights(init: str) -> dict[str, torch.Tensor]:
    """The --init weights on the CPU, by the name the run's model gives each (its parameters have the same shapes:
    `init_model_config` let no override change one)."""
    from dsllm.model_dir import load_model_dir

    return load_model_dir(init).state_dict()
