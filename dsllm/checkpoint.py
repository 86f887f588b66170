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
from dsllm.safe_load import weights_only_loads
from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer
from dsllm.train_checkpoint import CHECKPOINTS_DIR, COMPLETE_MARKER, complete_checkpoints

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(
    model: GPT, directory: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None, extra: dict | None = None
) -> Path:
    """Write the weights (fp32, safetensors), the model config and the tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fp32 = GPT(model.config)
    fp32.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_model(fp32, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(
        json.dumps({"model": model.config.to_dict(), **(extra or {})}, indent=2) + "\n"
    )
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
    stages 1-3; ZeRO-0 checkpoints hold the whole module, in the training precision). Weights-only loads."""
    import contextlib
    import io

    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    require_model_states(checkpoint, marker["zero_stage"])
    with weights_only_loads():
        if marker["zero_stage"] == 0:
            states = torch.load(checkpoint / model_states_file(0), map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress chatter is not for the user (and `evaluate`'s stdout is one JSON object)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def model_states_file(zero_stage: int, rank: int = 0) -> str:
    """DeepSpeed's model-states file in a checkpoint folder: one in all, or one per rank under ZeRO-3."""
    return f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"


def require_model_states(checkpoint: Path, zero_stage: int, rank: int = 0) -> None:
    """A one-line error naming the model-states file when it is gone (DeepSpeed's own is an empty assert)."""
    path = checkpoint / model_states_file(zero_stage, rank)
    if not path.is_file():
        raise UserError(
            f"{path}: missing, so this checkpoint is incomplete; use another checkpoint of the run "
            "(or copy the file back)"
        )


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
    raise UserError(
        f"{path}: no model here (needs {WEIGHTS_FILE}, or complete checkpoints under {CHECKPOINTS_DIR}/); "
        "pass a run folder, a checkpoints/stepNNNNNNNN folder or a model folder"
    )


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
    except (
        RuntimeError,
        OSError,
        KeyError,
        ValueError,
        AssertionError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        SafetensorError,
    ) as err:  # shapes of another model, or damaged files
        first = str(err).strip().splitlines()
        detail = next(
            (line.strip() for line in first if "size mismatch" in line), first[0] if first else type(err).__name__
        )
        raise UserError(
            f"{source}: cannot load these weights into the model of {config_path} ({detail[:200]}); "
            "they come from another model or the files are damaged"
        ) from None
    if missing or unexpected:
        raise UserError(
            f"{path}: weights do not fit {config_path} (missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(unexpected)[:3]}); they come from another model"
        )
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


# -- the RNG state a training checkpoint carries per rank (safetensors + JSON metadata, never a pickle) ---
def rng_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"rng_rank{rank:05d}.safetensors"


def save_rng(tag_dir: Path, rank: int) -> Path:
    """This rank's python, numpy, torch and CUDA generator states, so a resumed run draws the same numbers."""
    import random

    import numpy as np
    from safetensors.torch import save_file

    version, python_state, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {
        "python_version": version,
        "python_gauss_next": gauss_next,
        "numpy_algorithm": algorithm,
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
    }
    path = rng_file(tag_dir, rank)
    save_file(tensors, str(path), metadata={"dsllm_rng": json.dumps(meta)})
    return path


def load_rng(tag_dir: Path, rank: int) -> bool:
    """Restore what `save_rng` wrote; False when the checkpoint has no RNG file for this rank."""
    import random

    import numpy as np
    from safetensors import safe_open

    path = rng_file(tag_dir, rank)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["dsllm_rng"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        random.setstate((meta["python_version"], tuple(tensors["python"].tolist()), meta["python_gauss_next"]))
        np.random.set_state(
            (
                meta["numpy_algorithm"],
                tensors["numpy"].numpy().astype(np.uint32),
                meta["numpy_pos"],
                meta["numpy_has_gauss"],
                meta["numpy_cached_gaussian"],
            )
        )
        torch.set_rng_state(tensors["torch"])
    except (SafetensorError, OSError, KeyError, TypeError, ValueError, RuntimeError) as err:
        raise UserError(
            f"{path}: not an RNG state written by dsllm ({str(err).strip()[:200]}); the checkpoint is "
            "damaged: resume from another one with --resume PATH"
        ) from None
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True
