"""Model folders: our `config.json` + `model.safetensors` + `tokenizer.json`, what `generate`,
`evaluate` and `export` load."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer

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


def _model_config(config_path: Path) -> ModelConfig:
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; the model folder or run is incomplete")
    try:
        return ModelConfig.from_dict(json.loads(config_path.read_text())["model"], where=str(config_path))
    except (ValueError, KeyError) as err:
        raise UserError(f"{config_path}: not a dsllm model config ({err})") from None


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a training checkpoint of any ZeRO stage and world size (`zero_to_fp32` for
    stages 1-3; ZeRO-0 checkpoints hold the whole module, in the training precision)."""
    import contextlib
    import io

    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    if marker["zero_stage"] == 0:
        states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in states["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # its progress chatter is not for the user (and `evaluate`'s stdout is one JSON object)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def resolve_model_source(path: str | os.PathLike) -> tuple[Path, Path | None, Path]:
    """(config.json, training checkpoint or None for model.safetensors, run or model folder) for a model
    folder, a run folder (its final weights, else its newest complete checkpoint), or a checkpoint folder."""
    path = Path(path)
    if (path / COMPLETE_MARKER).is_file():
        return path.parent.parent / CONFIG_FILE, path, path.parent.parent
    if (path / WEIGHTS_FILE).is_file():
        return path / CONFIG_FILE, None, path
    done = complete_checkpoints(path / CHECKPOINTS_DIR)
    if done:
        return path / CONFIG_FILE, done[-1], path
    raise UserError(f"{path}: no model here (needs {WEIGHTS_FILE}, or complete checkpoints under {CHECKPOINTS_DIR}/); "
                    "pass a run folder, a checkpoints/stepNNNNNNNN folder or a model folder")


def load_model_dir(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPT:
    """Load a model (see `resolve_model_source`); weights that do not fit the config are a UserError."""
    config_path, checkpoint, _ = resolve_model_source(path)
    config = _model_config(config_path)
    model = GPT(config)
    source = Path(path) / WEIGHTS_FILE if checkpoint is None else checkpoint
    try:
        if checkpoint is None:
            missing, unexpected = load_model(model, str(source), strict=False, device="cpu")
        else:
            missing, unexpected = model.load_state_dict(consolidated_state_dict(checkpoint), strict=False)
            missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_embeddings)]
    except (RuntimeError, OSError, KeyError, ValueError, AssertionError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, SafetensorError) as err:  # shapes of another model, or damaged files
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "size mismatch" in line), first[0] if first else type(err).__name__)
        raise UserError(f"{source}: cannot load these weights into the model of {config_path} ({detail[:200]}); "
                        "they come from another model or the files are damaged") from None
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit {config_path} (missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}); they come from another model")
    return model.to(device)


def model_tokenizer(home: Path) -> tuple[Tokenizer, Path]:
    """The tokenizer a model was trained with: `tokenizer.json` in its run or model folder (`resolve_model_source`)."""
    path = home / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(f"{home}: no {TOKENIZER_FILE} next to the model; copy in the tokenizer it was trained with")
    return load_tokenizer(path), path


def pick_device(name: str) -> torch.device:
    """`--device`: auto (cuda when there is one, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device here; use --device cpu")
    return device


# -- training checkpoints: DeepSpeed's layout plus our state ---------------------------------------------
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "dsllm_complete.json"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _step_of(tag_dir: Path) -> int:
    try:
        return int(tag_dir.name[4:])
    except ValueError:
        return -1


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """Tag folders whose save finished on every rank (the marker is written last), oldest first."""
    if not checkpoints.is_dir():
        return []
    tags = [p for p in checkpoints.iterdir() if p.is_dir() and p.name.startswith("step") and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags, key=_step_of)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """`auto`: the newest complete checkpoint of the run, or None for a fresh start; `none`: fresh
    (refused if the run already has checkpoints); a path: that tag folder, or a checkpoints folder."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    if resume == "auto":
        done = complete_checkpoints(checkpoints)
        return done[-1] if done else None
    if resume == "none":
        if complete_checkpoints(checkpoints):
            raise UserError(f"{checkpoints}: the run already has checkpoints; pass --resume auto to continue it, "
                            "or choose a new --out")
        return None
    path = Path(resume)
    if (path / COMPLETE_MARKER).is_file():
        return path
    done = complete_checkpoints(path) or complete_checkpoints(path / CHECKPOINTS_DIR)
    if not done:
        raise UserError(f"--resume {resume}: no complete checkpoint there; pass a checkpoints/stepNNNNNNNN folder, "
                        "a run folder, auto or none")
    return done[-1]


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json_atomic(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(partial, path)


def prune_checkpoints(checkpoints: Path, keep_last: int, newest: Path) -> None:
    """Keep the newest `keep_last` complete checkpoints; drop incomplete ones older than `newest`
    (left by a run killed while saving)."""
    done = complete_checkpoints(checkpoints)
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for p in checkpoints.iterdir():
        if p.is_dir() and p.name.startswith("step") and not (p / COMPLETE_MARKER).exists() and _step_of(p) < _step_of(newest):
            shutil.rmtree(p, ignore_errors=True)
