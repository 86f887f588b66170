"""What DeepSpeed writes into a training checkpoint, read without unpickling: its model-states files, the
consolidated fp32 weights (`zero_to_fp32`), and the per-rank RNG state we add (safetensors + JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from dsllm.checkpoint.store import COMPLETE_MARKER
from dsllm.errors import UserError
from dsllm.safe_load import weights_only_loads


def consolidated_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a training checkpoint of any ZeRO stage and world size (`zero_to_fp32` for
    stages 1-3; ZeRO-0 checkpoints hold the whole module, in the training precision). Weights-only loads."""
    import contextlib
    import io

    marker = json.loads((checkpoint / COMPLETE_MARKER).read_text())
    require_model_states(checkpoint, marker["zero_stage"])
    if marker["model"].get("moe_experts"):
        return _experts_state_dict(checkpoint)
    if marker.get("tensor_parallel", 1) > 1:
        return _universal_state_dict(checkpoint, marker["model"], marker.get("pipeline_stages", 1) > 1)
    with weights_only_loads():
        if marker.get("pipeline_stages", 1) > 1:
            return _pipeline_state_dict(checkpoint, marker["model"]["n_layers"])
        if marker["zero_stage"] == 0:
            states = torch.load(checkpoint / model_states_file(0), map_location="cpu")
            return {k: v.float() for k, v in states["module"].items()}
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # its progress chatter is not for the user (and `evaluate`'s stdout is one JSON object)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)


def _pipeline_state_dict(checkpoint: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """A pipeline checkpoint's weights: DeepSpeed writes each layer of `dsllm.pipeline.layers_of` to its own
    layer_NN-model_states.pt (the tied LM head is the embedding's, in layer 00), renamed to GPT's names."""
    from dsllm.pipeline import to_gpt_state

    state = {}
    for index in range(n_layers + 3):
        path = checkpoint / f"layer_{index:02d}-model_states.pt"
        if path.is_file():
            state.update(to_gpt_state(n_layers, index, torch.load(path, map_location="cpu")))
        elif index < n_layers + 2:  # every layer but an LM head tied to the embedding has a file
            raise UserError(f"{path}: missing, so this checkpoint is incomplete; use another checkpoint of the run")
    return {k: v.float() for k, v in state.items()}


def _experts_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A Mixture-of-Experts checkpoint's weights, in the training precision (as ZeRO-0's): DeepSpeed saves the
    module without its experts (mp_rank_00) and each expert in a file of its own, under its index among all of the
    layer's experts, which are GPT's names with every expert on one rank. (DeepSpeed 0.19.8's universal conversion
    doubles an expert replicated on 2 data-parallel ranks, and zero_to_fp32 reads no expert files.)"""
    with weights_only_loads():
        state = torch.load(checkpoint / model_states_file(0), map_location="cpu")["module"]
        for path in sorted(checkpoint.glob("layer_*_expert_*_mp_rank_00_model_states.pt")):
            state.update(torch.load(path, map_location="cpu"))
    return {k: v.float() for k, v in state.items()}


def _universal_state_dict(checkpoint: Path, model: dict, pipeline: bool) -> dict[str, torch.Tensor]:
    """A tensor-parallel checkpoint's weights: DeepSpeed's universal checkpoint merges each parameter's AutoTP
    shards (the q|k|v and gate|up sub-parameters each in place) and a pipeline's stages into zero/NAME/fp32.pt;
    converted once, cached next to the checkpoint, and the resume path uses the same folder. A pipeline's names
    are its layers' ("3.block.attn.qkv.weight", "tied_modules.embedding.tok.weight"), renamed to GPT's."""
    from dsllm.checkpoint.checkpointer import convert_to_universal
    from dsllm.pipeline import gpt_name

    folder = convert_to_universal(checkpoint) / "zero"
    state = {}
    with weights_only_loads():
        for path in sorted(folder.glob("*/fp32.pt")):
            name = gpt_name(model["n_layers"], path.parent.name) if pipeline else path.parent.name
            if name is not None:
                state[name] = torch.load(path, map_location="cpu")["param"].float()
    if model.get("tie_embeddings", True):  # one parameter; a universal lm_head entry would be a leftover shard
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    return state


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
