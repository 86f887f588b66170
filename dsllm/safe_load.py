"""How we read torch files: never by running a pickle's code.

A `.pt` file is a pickle, and unpickling can call any function the file names. Inside
`weights_only_loads()` every `torch.load` in the process (ours and DeepSpeed's, which asks for full
unpickling) is a weights-only load: tensors, plain containers and numbers, plus the few
DeepSpeed types below. A file that holds anything else is a UserError naming it, and nothing in it runs.

`python -m dsllm.safe_load universal --input_folder CKPT --output_folder OUT [--inject_missing_state]`
runs DeepSpeed's `ds_to_universal` the same way (its worker processes are forked, so they inherit it).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import re
import sys
from collections.abc import Iterator

import torch

from dsllm.errors import UserError, run_cli

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch's own switch: also covers callers of torch.serialization.load


def deepspeed_types() -> list[type]:
    """The non-tensor objects DeepSpeed 0.19.8 pickles into its checkpoints (found by loading ZeRO 0-3, fp32 and
    bf16, with and without offload, and universal ones). Each is a small record of numbers: unpickling one runs
    its own constructor or sets its attributes, nothing else."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [
        LossScaler,  # ZeRO 1-3 optimizer state "loss_scaler" (static scale 1 in fp32/bf16)
        DynamicLossScaler,  # the same under fp16 (GPU only, so from DeepSpeed's source): numbers and a dtype
        ZeroStageEnum,  # ZeRO 1-3 optimizer state "zero_stage"
        fragment_address,
    ]  # ZeRO 1-2 "param_slice_mappings": (numel, start) of each parameter's slice


def refusal(path, err: pickle.UnpicklingError) -> UserError:
    """The one-line error for a file the weights-only unpickler refused."""
    name = re.search(r"GLOBAL (\S+)", str(err))
    what = f"it calls {name.group(1)}" if name else "it uses pickle instructions a weights-only load refuses"
    if not isinstance(path, (str, os.PathLike)):  # an open file
        path = getattr(path, "name", path)
    return UserError(
        f"{path}: holds objects other than tensors and plain data ({what}), so "
        "it was not loaded (it may be malicious); delete it and use a checkpoint from a source you trust"
    )


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` in this process, for the duration, loads weights only (see the module docstring).
    Process-wide, so enter it from the main thread; nesting is fine. Restores torch.load on exit."""
    original, env_before = torch.load, os.environ.get(FORCE_ENV)
    allowed = deepspeed_types()

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)  # torch refuses a custom unpickler with weights_only
        try:
            with torch.serialization.safe_globals(allowed):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            raise refusal(f, err) from None

    torch.load = load
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    finally:
        torch.load = original
        if env_before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = env_before


def universal(argv: list[str]) -> int:
    """DeepSpeed's `ds_to_universal` (same arguments) under `weights_only_loads`."""
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *argv]  # it parses sys.argv itself
    args = ds_to_universal.parse_arguments()
    if multiprocessing.get_start_method() != "fork":  # spawned workers would not inherit the patch
        args.num_extract_workers = args.num_merge_workers = 1
    with weights_only_loads():
        ds_to_universal.main(args)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["universal"]:
        raise UserError(
            "usage: python -m dsllm.safe_load universal --input_folder CKPT --output_folder OUT "
            "[--inject_missing_state]"
        )
    return universal(argv[1:])


if __name__ == "__main__":
    sys.exit(run_cli(main))
