"""Continued pretraining: a pretraining run that starts from a trained model's weights (`--init`), not random ones.

The model is the --init folder's (its config.json, the shapes its weights have); `--model.FIELD` may change only
what no weight's shape depends on (`model_config.WEIGHT_FREE_FIELDS`): RoPE and its scaling, the context of a RoPE
model, dropout and recompute. That is how a model trained at a short context is extended to a longer one
(`--model.rope_scaling yarn --model.max_seq_len 4x`). The dataset must be tokenized as the model was. Pre-flight
checks every stored name and shape against the run's model (a damaged or foreign file is said before any rank
starts). Each rank then builds its part of the model (`dsllm.engine.new_model`) with the stored values in place of
seeded ones (`dsllm.model.initial_value`), reading only the parameters it holds: any ZeRO stage (ZeRO-3 partitions
them as they are built), pipeline stages, tensor and expert shards. The optimizer and schedule start fresh at step
0. A run folder with checkpoints of its own resumes them (`--resume auto`): the weights of --init are for a fresh
start only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from dsllm.errors import UserError
from dsllm.model_config import WEIGHT_FREE_FIELDS, ModelConfig, continued_model_config, resolve_model_config

if TYPE_CHECKING:
    from dsllm.model_dir import StoredWeights
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


def init_weights(init: str, model: ModelConfig) -> StoredWeights:
    """The --init weights, every name and shape checked against the run's `model` (which `init_model_config` let
    no override reshape); each rank reads only the values of the parameters it builds."""
    from dsllm.model_dir import StoredWeights

    weights = StoredWeights(init)
    weights.check(model)
    return weights
