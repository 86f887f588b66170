"""The training run's options: one dataclass field each, parsed from the command line of
`launch/pretrain.py`. Model options come as `--model PRESET_OR_JSON` plus `--model.FIELD VALUE`."""
from __future__ import annotations

import argparse
import dataclasses
import os

from dsllm.errors import ArgumentParser, UserError


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
    compile: bool = False  # torch.compile the model inside the engine (engine.compile(); inductor on CPU and GPU)

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.max_steps // 20)

    def check(self) -> None:
        positive = ("max_steps", "eval_interval", "save_interval", "log_interval", "eval_windows",
                    "max_nonfinite_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be 1 or more")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "global_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: must be 1 or more")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UserError("--lr must be positive and --min-lr-ratio in [0, 1]")
        if self.warmup >= self.max_steps and self.max_steps > 1:
            raise UserError(f"--warmup-steps {self.warmup} is not below --max-steps {self.max_steps}; shorten the warmup")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="pretrain.py", description="Pretrain a GPT on the DeepSpeed engine. Model options: "
                            "--model PRESET_OR_JSON and --model.FIELD VALUE (e.g. --model.norm rmsnorm).")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_overrides":
            continue
        flag = "--ds_config" if field.name == "ds_config" else _flag(field.name)
        kind = str(field.type).replace(" | None", "")
        arg_type = {"int": int, "float": float}.get(kind, str)
        if kind == "bool":
            parser.add_argument(flag, dest=field.name, action="store_true", help=f"(default {field.default})")
        elif field.name == "ds_config":
            parser.add_argument(flag, "--ds-config", dest="ds_config", required=True, help="DeepSpeed JSON (ds_configs/*.json)")
        else:
            parser.add_argument(flag, dest=field.name, type=arg_type, default=field.default,
                                help=f"(default {field.default})")
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
            key, eq, value = arg[len("--model."):].partition("=")
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
    for rank_var, local_var, size_var in (("RANK", "LOCAL_RANK", "WORLD_SIZE"),
                                          ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
                                          ("PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(local_var, 0)), int(os.environ[size_var])
    return 0, 0, 1
