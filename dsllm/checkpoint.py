"""Model folders: our `config.json` + `model.safetensors` + `tokenizer.json`, what `generate`,
`evaluate` and `export` load."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.tokenizer import TOKENIZER_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(model: GPT, directory: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None,
                   extra: dict | None = None) -> Path:
    """Write the weights (fp32, safetensors), the model config and the tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fp32 = GPT(model.config)
    fp32.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_model(fp32, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps({"model": model.config.to_dict(), **(extra or {})}, indent=2) + "\n")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


def load_model_dir(directory: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """Load a model folder written by `save_model_dir`; a missing or mismatched file is a UserError."""
    directory = Path(directory)
    config_path, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights.is_file():
        raise UserError(f"{directory}: no model here (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                        "pass a folder written by training or dsllm.checkpoint.save_model_dir")
    try:
        config = ModelConfig.from_dict(json.loads(config_path.read_text())["model"], where=str(config_path))
    except (ValueError, KeyError) as err:
        raise UserError(f"{config_path}: not a dsllm model config ({err})") from None
    model = GPT(config)
    missing, unexpected = load_model(model, str(weights), strict=False, device=str(device))
    if missing or unexpected:
        raise UserError(f"{weights}: weights do not fit {config_path} (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}); the two files come from different models")
    return model.to(device)
