"""Model folders: our `config.json` + `model.safetensors` + `tokenizer.json`, what `generate`,
`evaluate`, `export` and `finetune --init` load; any of them also takes a run folder or a training
checkpoint (consolidated on the fly), and `pick_device` places the model for them."""

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

from dsllm.checkpoint.states import consolidated_state_dict
from dsllm.checkpoint.store import CHECKPOINTS_DIR, COMPLETE_MARKER, complete_checkpoints
from dsllm.errors import UserError
from dsllm.model import GPT
from dsllm.model_config import ModelConfig
from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_dir(
    model: GPT, directory: str | os.PathLike, tokenizer_file: str | os.PathLike | None = None, extra: dict | None = None
) -> Path:
    """Write the weights (fp32, safetensors), the model config and the tokenizer into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fp32 = model
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        fp32 = GPT(model.config)
        fp32.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    save_model(fp32, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(
        json.dumps({"model": model.config.to_dict(), **(extra or {})}, indent=2) + "\n"
    )
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    return directory


def read_model_config(config_path: Path) -> ModelConfig:
    """The model config in a model or run folder's config.json (its "model" entry)."""
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing; the model folder or run is incomplete")
    try:
        return ModelConfig.from_dict(json.loads(config_path.read_text())["model"], where=str(config_path))
    except (ValueError, KeyError) as err:
        raise UserError(f"{config_path}: not a dsllm model config ({err})") from None


def resolve_model_source(path: str | os.PathLike) -> tuple[Path, Path | None, Path]:
    """(config.json, training checkpoint or None for model.safetensors, run or model folder) for a model
    folder, a run folder (its final weights, else its newest complete checkpoint), or a checkpoint folder; a
    folder's model.safetensors itself stands for its folder (what `dsllm evaluate` reports it scored)."""
    path = Path(path)
    if path.name == WEIGHTS_FILE and path.is_file():
        path = path.parent
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
    config_path, checkpoint, home = resolve_model_source(path)
    config = read_model_config(config_path)
    model = GPT(config)
    source = home / WEIGHTS_FILE if checkpoint is None else checkpoint
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


class StoredWeights:
    """A saved model's weights (`resolve_model_source`), read one parameter at a time by the name `initial_value`
    gives it in the whole GPT ("blocks.1.mlp.experts.2.fc.weight", a tied weight under "tok_embeddings.weight"):
    what a continued pretraining run (`--init`) builds its model from, in any layout, each rank reading only the
    parameters it holds. A model folder's safetensors file is memory-mapped, so no rank reads the whole of it; a
    training checkpoint is consolidated on the CPU first. `check` compares every name and shape with the run's
    model before any rank starts."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        config_path, checkpoint, home = resolve_model_source(path)
        self.config_path, self.source = config_path, home / WEIGHTS_FILE if checkpoint is None else checkpoint
        self._checkpoint, self._file, self._names = checkpoint, None, None

    def names(self) -> dict[str, str]:
        """{name in the whole GPT: name where it is stored}."""
        from dsllm.experts import expert_names

        if self._names is None:
            self._names = {}
            for key in self._keys():
                self._names.setdefault(expert_names(key), key)
            if "tok_embeddings.weight" not in self._names and "lm_head.weight" in self._names:  # a tied weight
                self._names["tok_embeddings.weight"] = self._names["lm_head.weight"]
        return self._names

    def check(self, config: ModelConfig) -> None:
        """Every parameter of the GPT of `config` is stored, with its shape, and nothing else is (a UserError
        naming the first difference); the weights themselves are not read."""
        from dsllm.experts import expert_names

        with torch.device("meta"):
            expected = {expert_names(n): tuple(p.shape) for n, p in GPT(config, seed=0).named_parameters()}
        names = self._guarded(self.names)
        missing = sorted(set(expected) - set(names))
        tied = {"lm_head.weight"} if config.tie_embeddings else set()
        unexpected = sorted(set(names) - set(expected) - tied)
        if missing or unexpected:
            raise UserError(
                f"{self.path}: weights do not fit {self.config_path} (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); they come from another model"
            )
        for name, shape in expected.items():
            stored = self._guarded(lambda key=names[name]: self._shape(key))
            if stored != shape:
                raise UserError(
                    f"{self.source}: cannot load these weights into the model of {self.config_path} ({name}: "
                    f"{list(stored)} stored, {list(shape)} in the model); they come from another model"
                )

    def value(self, name: str, shape) -> torch.Tensor:
        """The fp32 value of the whole GPT's parameter `name` (of `shape`: `check` saw to it)."""
        value = self._guarded(lambda: self._read(self.names()[name])).float()
        if tuple(value.shape) != tuple(shape):  # (a model other than the one checked)
            raise RuntimeError(f"{self.source}: {name} is {list(value.shape)}, the model's {list(shape)}")
        return value

    def close(self) -> None:
        """Let go of the file (or the consolidated weights) once the model is built."""
        self._file = None

    def _keys(self) -> list[str]:
        if self._checkpoint is not None:
            return list(self._consolidated())
        return list(self._opened().keys())

    def _shape(self, key: str) -> tuple[int, ...]:
        if self._checkpoint is not None:
            return tuple(self._consolidated()[key].shape)
        return tuple(self._opened().get_slice(key).get_shape())

    def _read(self, key: str) -> torch.Tensor:
        if self._checkpoint is not None:
            return self._consolidated()[key]
        return self._opened().get_tensor(key)

    def _opened(self):
        if self._file is None:
            from safetensors import safe_open

            self._file = safe_open(str(self.source), framework="pt", device="cpu")
        return self._file

    def _consolidated(self) -> dict[str, torch.Tensor]:
        if self._file is None:
            self._file = consolidated_state_dict(self._checkpoint)
        return self._file

    def _guarded(self, read):
        """`read()`, a damaged or unreadable file said in one line."""
        try:
            return read()
        except (OSError, KeyError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                SafetensorError) as err:  # fmt: skip
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"{self.source}: cannot load these weights into the model of {self.config_path} ({detail[:200]}); "
                "they come from another model or the files are damaged"
            ) from None


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


def model_inputs(path: str | os.PathLike, flag: str) -> list[tuple[str, Path]]:
    """What loading a model from `path` reads (see `resolve_model_source`): the config, tokenizer and
    weights in its run or model folder, every checkpoint of the run, and the checkpoint itself."""
    config, checkpoint, home = resolve_model_source(path)
    found = [(flag, config)] + [(flag, home / name) for name in (TOKENIZER_FILE, WEIGHTS_FILE, CHECKPOINTS_DIR)]
    return found + ([(flag, checkpoint)] if checkpoint is not None else [])
