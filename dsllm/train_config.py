"""The training run's options: one dataclass field each, parsed from the command line of
`launch/pretrain.py`. Model options come as `--model PRESET_OR_JSON` plus `--model.FIELD VALUE`."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing

from dsllm.errors import ArgumentParser, UserError, finite


@dataclasses.dataclass
class TrainConfig:
    ds_config: str  # the DeepSpeed JSON, passed to DeepSpeed after its "auto" fields are filled
    data: str | None = None  # prepared dataset folder; None: the embedded default corpus
    model: str = "tiny"  # preset name or JSON file
    model_overrides: dict = dataclasses.field(default_factory=dict)  # {field: value} from --model.FIELD VALUE
    out: str = "runs/default"  # run folder: config.json, metrics.jsonl, checkpoints/, final weights
    max_steps: int = 300  # optimizer steps
    seq_len: int | None = None  # tokens per sample; None: the model's max_seq_len
    micro_batch_size: int | None = None  # per rank; fills train_micro_batch_size_per_gpu when "auto"
    grad_accum: int | None = None  # fills gradient_accumulation_steps when "auto"
    global_batch_size: int | None = None  # fills train_batch_size when "auto"
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int | None = None  # linear warmup; None: 5% of max_steps
    weight_decay: float = 0.1  # decoupled; not applied to norms, biases and embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # global gradient-norm clipping
    precision: str = "auto"  # auto (bf16 where supported), bf16, fp16 or fp32: fills bf16/fp16.enabled
    eval_interval: int = 100  # steps between evaluations (and one at the end)
    eval_windows: int = 64  # fixed validation windows per evaluation
    save_interval: int = 100  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest complete checkpoints kept
    resume: str = "auto"  # auto (newest complete checkpoint of --out), none, or a checkpoint path
    seed: int = 1234  # model init and data order
    log_interval: int = 10  # steps between log lines
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row
    loader_workers: int = 2  # DataLoader worker processes per rank
    sample_tokens: int = 64  # tokens generated from the validation text at the end (0: none)
    peak_tflops: float | None = None  # device peak for MFU; None: from the GPU table
    collective_timeout: float = 600.0  # seconds a collective may wait for a hung rank before the job fails
    stop_grace: float = 120.0  # seconds from SIGINT/SIGTERM/SIGUSR1 to the checkpoint; past it, exit without one
    compile: bool = False  # torch.compile the model inside the engine (engine.compile(); inductor on CPU and GPU)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    def check(self) -> None:
        """Every option in range, before any rank starts: one line naming the flag and what it takes."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{_flag(field.name)} {value}: not a finite number; pass a number")
        at_least = {
            "max_steps": 1,
            "eval_interval": 1,
            "save_interval": 1,
            "log_interval": 1,
            "eval_windows": 1,
            "max_nonfinite_steps": 1,
            "keep_checkpoints": 1,
            "loader_workers": 0,
            "sample_tokens": 0,
            "seed": 0,
            "seq_len": 1,
            "micro_batch_size": 1,
            "grad_accum": 1,
            "global_batch_size": 1,
            "warmup_steps": 0,
        }
        for name, least in at_least.items():
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"{_flag(name)} {value}: must be {least} or more")
        above_zero = {
            "lr": "the peak learning rate",
            "peak_tflops": "the device's peak TFLOPS",
            "collective_timeout": "the timeout in seconds",
        }
        for name, what in above_zero.items():
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{_flag(name)} {value}: {what} must be above 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"--min-lr-ratio {self.min_lr_ratio}: the cosine floor is a fraction of --lr, in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{_flag(name)} {getattr(self, name)}: must be in [0, 1), e.g. 0.9 and 0.95")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"{_flag(name)} {getattr(self, name)}: must be 0 or more (0: off)")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"--precision {self.precision}: use auto, bf16, fp16 or fp32")
        if self.warmup >= self.max_steps and self.max_steps > 1:
            raise UserError(
                f"--warmup-steps {self.warmup} is not below --max-steps {self.max_steps}; shorten the warmup"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="pretrain.py",
        description="Pretrain a GPT on the DeepSpeed engine. Model options: "
        "--model PRESET_OR_JSON and --model.FIELD VALUE (e.g. --model.norm rmsnorm).",
    )
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_overrides":
            continue
        flag = "--ds_config" if field.name == "ds_config" else _flag(field.name)
        kind = next(
            (t for t in (bool, int, float) if hints[field.name] == t or t in typing.get_args(hints[field.name])), str
        )
        arg_type = {int: int, float: finite}.get(kind, str)
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action="store_true", help=f"(default {field.default})")
        elif field.name == "ds_config":
            parser.add_argument(
                flag, "--ds-config", dest="ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)"
            )
        else:
            parser.add_argument(
                flag, dest=field.name, type=arg_type, default=field.default, help=f"(default {field.default})"
            )
    # the DeepSpeed launcher appends --local_rank=N
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_train_args(argv: list[str] | None) -> TrainConfig:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest, i = {}, [], 0
    while i < len(argv):  # pull out --model.FIELD VALUE / --model.FIELD=VALUE
        arg = argv[i]
        if arg.startswith("--model."):
            key, eq, value = arg[len("--model.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg}: needs a value, e.g. {arg} VALUE")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    args = vars(build_parser().parse_args(rest))
    args.pop("local_rank", None)
    config = TrainConfig(**args, model_overrides=overrides)
    config.check()
    return config


def world_from_env() -> tuple[int, int, int]:
    """(rank, local rank, world size) as the launcher (or MPI) sets them; (0, 0, 1) for a plain run."""
    for rank_var, local_var, size_var in (
        ("RANK", "LOCAL_RANK", "WORLD_SIZE"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(local_var, 0)), int(os.environ[size_var])
    return 0, 0, 1
