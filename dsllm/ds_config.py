"""The DeepSpeed JSON: read it, fill its "auto" fields from our config, check it, pass it on.

We never generate the file. Fields set explicitly in the JSON win; a command-line value that
contradicts one is an error, as is batch arithmetic that does not add up or a ZeRO/feature
combination DeepSpeed would reject late. Everything here runs before any rank starts work.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any

from dsllm.errors import UserError

AUTO = "auto"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_SCHEDULERS_WITH_AUTO = ("WarmupCosineLR", "WarmupDecayLR", "WarmupLR")
DOCS = "https://www.deepspeed.ai/docs/config-json/"
# The top-level keys DeepSpeed 0.19 reads (DeepSpeedConfig._initialize_params and the engine): any other key
# would be ignored silently, so a misspelled one is refused with the nearest known key.
TOP_LEVEL_KEYS = frozenset(
    """
    train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps managed_gradient_accumulation
    optimizer scheduler gradient_clipping zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
    bf16 bfloat16 fp16 torch_autocast data_types communication_data_type seq_parallel_communication_data_type
    prescale_gradients gradient_predivide_factor gradient_allreduce_op disable_allgather steps_per_print
    wall_clock_breakdown memory_breakdown dump_state disable_python_gc log_level activation_checkpointing
    comms_logger flops_profiler autotuning tensorboard wandb csv_monitor comet checkpoint datastates_ckpt aio
    pipeline data_efficiency dataloader_drop_last hybrid_engine weight_quantization compile timers tensor_parallel
    expert_parallel use_data_before_expert_parallelism sequence_parallel_size vocabulary_size""".split()
)
# Sections that must be JSON objects ({...}); DeepSpeed fails with an AttributeError or TypeError otherwise.
OBJECT_SECTIONS = (
    "optimizer",
    "scheduler",
    "zero_optimization",
    "bf16",
    "bfloat16",
    "fp16",
    "torch_autocast",
    "data_types",
    "activation_checkpointing",
    "comms_logger",
    "flops_profiler",
    "autotuning",
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "checkpoint",
    "datastates_ckpt",
    "aio",
    "pipeline",
    "data_efficiency",
    "hybrid_engine",
    "weight_quantization",
    "compile",
    "timers",
    "tensor_parallel",
)
# monitor section -> (module DeepSpeed imports for it, our setup.py extra)
MONITORS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "comet": ("comet_ml", "comet")}


class DSConfigError(UserError):
    """The DeepSpeed JSON is missing, malformed or inconsistent with the run."""


@dataclasses.dataclass(frozen=True)
class RunValues:
    """What our config contributes to the DeepSpeed JSON (None: not given on the command line)."""

    micro_batch_size: int | None
    grad_accum: int | None
    global_batch_size: int | None
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    precision: str  # auto, bf16, fp16, fp32
    hidden_size: int | None = None  # the model's d_model: sizes ZeRO-3's buckets when they are "auto"


@dataclasses.dataclass(frozen=True)
class Batch:
    micro: int
    accumulation: int
    world_size: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accumulation * self.world_size


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DSConfigError(f"--ds_config {path}: no such file; use one of ds_configs/*.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DSConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}); fix the file") from None
    if not isinstance(config, dict):
        raise DSConfigError(f"{path}: must hold a JSON object (a DeepSpeed config)")
    return config


def _explicit(value: Any) -> bool:
    return value is not None and value != AUTO


def _merge(name: str, cli_flag: str, json_value: Any, cli_value: Any, where: str) -> Any:
    if _explicit(json_value) and cli_value is not None and json_value != cli_value:
        raise DSConfigError(
            f'{cli_flag} {cli_value} contradicts {name} = {json_value} in {where}; drop one, or set {name} to "auto"'
        )
    return json_value if _explicit(json_value) else cli_value


def resolve_batch(config: dict, run: RunValues, world_size: int, where: str) -> Batch:
    """micro x accumulation x data-parallel world size = global batch, from whichever are given."""
    micro = _merge(
        "train_micro_batch_size_per_gpu",
        "--micro-batch-size",
        config.get("train_micro_batch_size_per_gpu"),
        run.micro_batch_size,
        where,
    )
    accum = _merge(
        "gradient_accumulation_steps", "--grad-accum", config.get("gradient_accumulation_steps"), run.grad_accum, where
    )
    total = _merge(
        "train_batch_size", "--global-batch-size", config.get("train_batch_size"), run.global_batch_size, where
    )
    for name, value in (
        ("train_micro_batch_size_per_gpu", micro),
        ("gradient_accumulation_steps", accum),
        ("train_batch_size", total),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DSConfigError(f'{name} = {value!r} in {where}: must be a positive integer or "auto"')
    if total is not None:
        if micro is None and accum is None:
            accum = 1
        if micro is None:
            micro, rest = divmod(total, accum * world_size)
        elif accum is None:
            accum, rest = divmod(total, micro * world_size)
        else:
            rest = total - micro * accum * world_size
        if rest or micro < 1 or accum < 1 or micro * accum * world_size != total:
            raise DSConfigError(
                f"batch arithmetic: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {accum} x data-parallel world size {world_size}; make train_batch_size "
                f'a multiple of micro-batch x world size ({(micro or 1) * world_size}), or set it to "auto"'
            )
    return Batch(micro or 8, accum or 1, world_size)


def resolve_precision(config: dict, requested: str, supports_bf16: bool, has_gpu: bool, where: str) -> str:
    bf16 = config.get("bf16", {}).get("enabled", False)
    fp16 = config.get("fp16", {}).get("enabled", False)
    if requested not in PRECISIONS:
        raise DSConfigError(f"--precision {requested}: use one of {', '.join(PRECISIONS)}")
    if bf16 is True and fp16 is True:
        raise DSConfigError(f"{where}: bf16.enabled and fp16.enabled are both true; enable one")
    explicit = "bf16" if bf16 is True else "fp16" if fp16 is True else None
    if explicit is None and bf16 != AUTO and fp16 != AUTO:
        explicit = "fp32"
    if explicit and requested not in ("auto", explicit):
        raise DSConfigError(
            f"--precision {requested} contradicts {where}, which sets {explicit}; "
            'drop one, or set bf16.enabled / fp16.enabled to "auto"'
        )
    # auto: bf16 on a GPU that has it, else fp16 on a GPU; fp32 on CPU, where bf16 measured 0.62x fp32's tokens/s
    # even with avx512_bf16 (benchmarks/results/2026-11-21-throughput-*)
    precision = explicit or (
        requested
        if requested != "auto"
        else "bf16"
        if has_gpu and supports_bf16 and bf16 == AUTO
        else "fp16"
        if has_gpu and fp16 == AUTO
        else "fp32"
    )
    if precision == "fp16" and not has_gpu:
        raise DSConfigError(f"fp16 is not supported on CPU ({where}); use bf16 or fp32 (--precision)")
    if precision == "bf16" and not supports_bf16:
        raise DSConfigError(f"bf16 is not supported on this device ({where}); use fp16 or fp32 (--precision)")
    return precision


def _check_zero(config: dict, where: str) -> int:
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        raise DSConfigError(f"zero_optimization.stage = {stage!r} in {where}: use 0, 1, 2 or 3")
    for name in ("offload_param", "offload_optimizer"):
        if not isinstance(zero.get(name, {}), dict):
            raise DSConfigError(
                f"{where}: zero_optimization.{name} is {_json(zero[name])}, but must be an object: "
                'write {"device": "cpu"} or remove it'
            )
    offload_param = zero.get("offload_param", {}).get("device", "none")
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none")
    if offload_param not in ("none", None) and stage != 3:
        raise DSConfigError(
            f"zero_optimization.offload_param needs stage 3, {where} has stage {stage}; "
            "use ds_configs/zero3_offload.json or remove offload_param"
        )
    if offload_optimizer not in ("none", None):
        if stage == 0:
            raise DSConfigError(
                f"zero_optimization.offload_optimizer needs stage 1, 2 or 3, {where} has stage 0; "
                "use ds_configs/zero2_offload.json"
            )
        kind = config.get("optimizer", {}).get("type", "").lower()
        if kind not in ("adam", "adamw"):
            raise DSConfigError(
                f"zero_optimization.offload_optimizer runs DeepSpeed's CPU Adam: set optimizer.type "
                f'to "AdamW" in {where} (it is {kind or "missing"})'
            )
    if config.get("pipeline", {}).get("stages", 1) not in (1, "auto") and stage >= 2:
        raise DSConfigError(f"pipeline parallelism cannot run with ZeRO stage {stage} ({where}); use stage 0 or 1")
    return stage


def _fill_auto(config: dict, run: RunValues, batch: Batch, precision: str) -> None:
    def fill(section: dict, key: str, value: Any) -> None:
        if section.get(key) == AUTO:
            section[key] = value

    fill(config, "train_micro_batch_size_per_gpu", batch.micro)
    fill(config, "gradient_accumulation_steps", batch.accumulation)
    fill(config, "train_batch_size", batch.global_size)
    config.setdefault("train_micro_batch_size_per_gpu", batch.micro)
    config.setdefault("gradient_accumulation_steps", batch.accumulation)
    config.setdefault("train_batch_size", batch.global_size)
    fill(config, "gradient_clipping", run.grad_clip)
    for name in ("bf16", "fp16"):
        if name in config:
            fill(config[name], "enabled", precision == name)
    optimizer = config.get("optimizer", {}).get("params", {})
    fill(optimizer, "lr", run.lr)
    fill(optimizer, "betas", list(run.betas))
    fill(optimizer, "weight_decay", run.weight_decay)
    scheduler = config.get("scheduler", {})
    params = scheduler.get("params", {})
    if scheduler.get("type") in _SCHEDULERS_WITH_AUTO:
        fill(params, "total_num_steps", run.max_steps)
        fill(params, "warmup_num_steps", max(1, run.warmup_steps))
        fill(params, "cos_min_ratio", run.min_lr_ratio)
        fill(params, "warmup_max_lr", run.lr)
        fill(params, "warmup_min_lr", 0.0)
    zero = config.get("zero_optimization", {})
    if run.hidden_size:  # sized to the model as HF Trainer does, instead of DeepSpeed's fixed 5e8-element buckets
        hidden = run.hidden_size  # (ZeRO-3 allocates its reduce bucket whole: 1.9 GiB in fp32 even for a tiny model)
        fill(zero, "reduce_bucket_size", hidden * hidden)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden)


def _did_you_mean(word: str, known) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _json(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list, str, bool, type(None), int, float)) else repr(value)


def _sections_without_models() -> dict[str, set[str]]:
    """The fields of the sections DeepSpeed 0.19 parses without a pydantic model, from its own constant modules."""
    from deepspeed.profiling import constants as profiler
    from deepspeed.runtime.activation_checkpointing import config as checkpointing

    def fields(module, prefix: str) -> set[str]:
        return {
            value
            for name, value in vars(module).items()
            if name.startswith(prefix) and not name.endswith(("_DEFAULT", "_FORMAT")) and isinstance(value, str)
        }

    return {
        "activation_checkpointing": fields(checkpointing, "ACT_CHKPT_") - {"activation_checkpointing"},
        "flops_profiler": fields(profiler, "FLOPS_PROFILER_") - {"flops_profiler"},
    }


def _check_shape(config: dict, where: str) -> None:
    """Top-level keys DeepSpeed knows, and the sections that must be objects, before anything reads them."""
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS

    for key in config:
        if key in _REMOVED_TOP_LEVEL_CONFIG_KEYS:
            reason = _REMOVED_TOP_LEVEL_CONFIG_KEYS[key].split(". ")[0]
            raise DSConfigError(f"{where}: {key}: {reason} in DeepSpeed 0.19; remove the key")
        if key not in TOP_LEVEL_KEYS:
            raise DSConfigError(
                f'{where}: unknown top-level key "{key}"{_did_you_mean(key, TOP_LEVEL_KEYS)}; '
                f"DeepSpeed would ignore it: fix the spelling or remove it (keys: {DOCS})"
            )
    for key in OBJECT_SECTIONS:
        if key in config and not isinstance(config[key], dict):
            example = (
                '{"type": "AdamW", "params": {...}}, or remove it for dsllm\'s AdamW'
                if key == "optimizer"
                else '{"type": "WarmupCosineLR", "params": {...}}, or remove it for dsllm\'s cosine schedule'
                if key == "scheduler"
                else '{"stage": 2}'
                if key == "zero_optimization"
                else f'{{"enabled": {_json(config[key]).lower() if isinstance(config[key], bool) else "true"}}}'
            )
            raise DSConfigError(f"{where}: {key} is {_json(config[key])}, but must be an object: write {example}")
    for key, known in _sections_without_models().items():  # DeepSpeed reads these with dict.get: typos go unseen
        for field in config.get(key, {}):
            if field not in known:
                raise DSConfigError(
                    f"{where}: {key}.{field}: not a DeepSpeed field{_did_you_mean(field, known)}; "
                    f"fix the spelling or remove it (it takes {', '.join(sorted(known))})"
                )
    for key in ("optimizer", "scheduler"):
        section = config.get(key)
        if section is None:
            continue
        if not isinstance(section.get("type"), str):
            raise DSConfigError(
                f"{where}: {key}.type is {_json(section.get('type'))}: name the {key} as a string, "
                f'e.g. "{"AdamW" if key == "optimizer" else "WarmupCosineLR"}"'
            )
        if not isinstance(section.get("params", {}), dict):
            raise DSConfigError(
                f"{where}: {key}.params is {_json(section['params'])}, but must be an object of "
                "the constructor's keyword arguments"
            )
        extra = set(section) - {"type", "params", "legacy_fusion"}
        if extra:
            name = sorted(extra)[0]
            raise DSConfigError(
                f"{where}: {key}.{name}: not a {key} field{_did_you_mean(name, ['type', 'params'])}; "
                f'{key} takes "type" and "params" (move it into params)'
            )
    _check_optimizer(config, where)  # types and parameter names now, values ("auto" included) once filled
    _check_scheduler(config, where)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(where: str, name: str, value: Any, ok: bool, need: str) -> None:
    if not ok and value != AUTO:  # "auto" is checked once filled
        raise DSConfigError(f"{where}: {name} = {_json(value)}: {need}")


def _optimizer_class(kind: str, params: dict, cpu_offload: bool):
    """The class DeepSpeed's engine builds for optimizer.type (engine._configure_basic_optimizer), and the
    keyword arguments the engine itself takes from params or passes (so the user may or may not set them)."""
    import torch

    name = kind.lower()
    if name in ("adam", "adamw"):
        popped = {"torch_adam", "adam_w_mode", "fp32_optimizer_states"}
        if params.get("torch_adam"):
            return torch.optim.AdamW, popped | {"foreach"}, set()
        if cpu_offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam, popped, {"adamw_mode"}
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam, popped, set()
    if name == "lamb":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb, set(), {"max_grad_norm"}
    if name == "adagrad":
        if cpu_offload:
            from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

            return DeepSpeedCPUAdagrad, set(), set()
        return torch.optim.Adagrad, set(), set()
    if name == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        return (DeepSpeedCPULion if cpu_offload else FusedLion), set(), set()
    return None, set(), set()


def _torch_optimizers() -> dict:
    import torch

    return {
        n: c
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    }


def _check_optimizer(config: dict, where: str) -> None:
    """optimizer.type one DeepSpeed builds, params its constructor takes, and values that train."""
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    section = config.get("optimizer")
    if section is None:
        return
    kind, params = section["type"], section.get("params", {})
    torch_optimizers = _torch_optimizers()
    if kind.lower() not in DEEPSPEED_OPTIMIZERS and kind not in torch_optimizers:
        known = ["Adam", "AdamW", "Lamb", "Adagrad", "Lion", "Muon", *sorted(torch_optimizers)]
        ops = {
            "fusedadam": "AdamW",
            "deepspeedcpuadam": "AdamW",
            "cpuadam": "AdamW",
            "fusedlamb": "Lamb",
            "fusedlion": "Lion",
            "deepspeedcpulion": "Lion",
            "deepspeedcpuadagrad": "Adagrad",
        }
        hint = (
            f' (did you mean "{ops[kind.lower()]}"? DeepSpeed builds {kind} from it)'
            if kind.lower() in ops
            else _did_you_mean(kind, known)
        )
        raise DSConfigError(
            f'{where}: optimizer.type "{kind}" is not an optimizer DeepSpeed builds'
            f"{hint}; use Adam, AdamW, Lamb, Adagrad, Lion, Muon (any case) "
            "or a torch.optim class name"
        )
    if kind.lower() in ("muadam", "muadamw", "musgd") and importlib.util.find_spec("mup") is None:
        raise DSConfigError(f'{where}: optimizer.type "{kind}" needs the mup package; pip install mup, or use AdamW')
    if "max_grad_norm" in params:
        raise DSConfigError(
            f"{where}: optimizer.params.max_grad_norm: DeepSpeed refuses it as an optimizer parameter; "
            'set the top-level "gradient_clipping" (or --grad-clip) instead'
        )
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {})
    cpu_offload = isinstance(offload, dict) and offload.get("device") in ("cpu", "nvme")
    cls, popped, passed = _optimizer_class(kind, params, cpu_offload)
    if cls is None and kind in torch_optimizers:
        cls = torch_optimizers[kind]
    if cls is not None:  # Muon and the mup optimizers take keys their constructors do not declare: not checked
        accepted = (set(list(inspect.signature(cls).parameters)[1:]) | popped) - passed
        for name in params:
            if name not in accepted:
                raise DSConfigError(
                    f"{where}: optimizer.params.{name}: not a parameter of {kind} (DeepSpeed builds "
                    f"{cls.__name__}){_did_you_mean(name, accepted)}; it takes "
                    f"{', '.join(sorted(accepted))}"
                )
    p = "optimizer.params."
    if "lr" in params:
        _check_value(
            where,
            p + "lr",
            params["lr"],
            _number(params["lr"]) and params["lr"] > 0,
            "the learning rate must be a finite number above 0",
        )
    if "betas" in params:
        betas = params["betas"]
        _check_value(
            where,
            p + "betas",
            betas,
            isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_number(b) and 0 <= b < 1 for b in betas),
            "must be a list of two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
    if "weight_decay" in params:
        _check_value(
            where,
            p + "weight_decay",
            params["weight_decay"],
            _number(params["weight_decay"]) and params["weight_decay"] >= 0,
            "must be a finite number, 0 or more",
        )
    if "eps" in params:
        _check_value(
            where,
            p + "eps",
            params["eps"],
            _number(params["eps"]) and params["eps"] > 0,
            "must be a finite number above 0, e.g. 1e-8",
        )


def _scheduler_class(kind: str):
    import torch
    from deepspeed.runtime import lr_schedules

    if kind in lr_schedules.VALID_LR_SCHEDULES:
        return getattr(lr_schedules, kind)
    found = getattr(torch.optim.lr_scheduler, kind, None)
    if isinstance(found, type) and issubclass(found, torch.optim.lr_scheduler.LRScheduler):
        return found
    return None


def _check_scheduler(config: dict, where: str) -> None:
    """scheduler.type one DeepSpeed builds, params its constructor takes, and a schedule that makes sense."""
    import torch
    from deepspeed.runtime import lr_schedules

    section = config.get("scheduler")
    if section is None:
        return
    kind, params = section["type"], section.get("params", {})
    cls = _scheduler_class(kind)
    if cls is None:
        torch_names = [n for n in vars(torch.optim.lr_scheduler) if _scheduler_class(n)]
        raise DSConfigError(
            f'{where}: scheduler.type "{kind}" is not a scheduler DeepSpeed builds'
            f"{_did_you_mean(kind, [*lr_schedules.VALID_LR_SCHEDULES, *torch_names])}; use one of "
            f"{', '.join(lr_schedules.VALID_LR_SCHEDULES)} or a torch.optim.lr_scheduler class name"
        )
    accepted = set(list(inspect.signature(cls).parameters)[1:])
    for name in params:
        if name not in accepted:
            raise DSConfigError(
                f"{where}: scheduler.params.{name}: not a parameter of {kind}"
                f"{_did_you_mean(name, accepted)}; it takes {', '.join(sorted(accepted))}"
            )
    p = "scheduler.params."
    if "warmup_num_steps" in params and kind in _SCHEDULERS_WITH_AUTO:
        steps = params["warmup_num_steps"]
        _check_value(
            where,
            p + "warmup_num_steps",
            steps,
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            f"{kind} needs a whole number of 1 or more (DeepSpeed refuses 0 and warms up "
            'over at least 2 steps); set 1 for the shortest warmup, or "auto" for --warmup-steps',
        )
    if "total_num_steps" in params:
        steps = params["total_num_steps"]
        _check_value(
            where,
            p + "total_num_steps",
            steps,
            isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1,
            'must be a whole number of 1 or more, or "auto" for --max-steps',
        )
    for name in ("cos_min_ratio", "warmup_min_ratio"):
        if name in params:
            _check_value(
                where,
                p + name,
                params[name],
                _number(params[name]) and 0 <= params[name] <= 1,
                "must be a fraction of the peak learning rate in [0, 1]",
            )
    for name in ("warmup_min_lr", "warmup_max_lr"):
        values = params.get(name)
        if values is not None:
            values = values if isinstance(values, list) else [values]
            _check_value(
                where,
                p + name,
                params[name],
                all(_number(v) and v >= 0 for v in values),
                "must be a finite learning rate, 0 or more",
            )
    if "warmup_type" in params:
        _check_value(
            where,
            p + "warmup_type",
            params["warmup_type"],
            params["warmup_type"] in ("linear", "log"),
            'use "linear" or "log" (DeepSpeed silently falls back to log for anything else)',
        )


def _pydantic_models() -> dict:
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    found, todo = {}, [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.__name__, cls)
        todo += cls.__subclasses__()
    return found


def _field_names(model_name: str, loc: tuple) -> list[str]:
    """The field names (and aliases) of the model at `loc` inside the model named `model_name`: for "did you mean"."""
    import typing

    import pydantic

    cls = _pydantic_models().get(model_name)
    for part in loc:
        field = cls.model_fields.get(part) if cls else None
        if field is None:
            return []
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)
    if cls is None:
        return []
    return [n for name, f in cls.model_fields.items() for n in (name, f.alias) if n]


# DeepSpeed's pydantic model -> the JSON section it reads
_MODEL_SECTIONS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
    "CompileConfig": "compile",
    "HybridEngineConfig": "hybrid_engine",
    "WeightQuantConfig": "weight_quantization",
    "DeepSpeedMonitorConfig": "",
}


def _check_with_deepspeed(config: dict, where: str) -> None:
    """DeepSpeed's own parser (its pydantic models and asserts) on the resolved config, errors in one line.
    train_batch_size is left for DeepSpeed to derive: it sees world size 1 here, we checked the real one."""
    import logging

    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from deepspeed.utils import logger

    probe = copy.deepcopy(config)
    probe.pop("train_batch_size", None)
    level = logger.level
    logger.setLevel(logging.ERROR)  # it logs the world size it sees and warnings we report ourselves
    try:
        DeepSpeedConfig(probe)
    except pydantic.ValidationError as err:
        first = err.errors(include_url=False)[0]
        section = _MODEL_SECTIONS.get(err.title)
        loc = tuple(str(part) for part in first["loc"])
        if section is None:  # another model: name the section that holds the key
            section = next((k for k, v in config.items() if isinstance(v, dict) and loc and loc[0] in v), err.title)
        path = ".".join(p for p in (section, *loc) if p)
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            fix = (
                f"not a DeepSpeed field{_did_you_mean(loc[-1], _field_names(err.title, loc[:-1]))}; "
                f"fix the spelling or remove it ({DOCS})"
            )
        else:
            fix = f"{message} (got {_json(first.get('input'))}); fix the value ({DOCS})"
        raise DSConfigError(f"{where}: {path}: {fix}") from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise DSConfigError(f"{where}: DeepSpeed rejects it: {_first_line(err)}; fix the file ({DOCS})") from None
    finally:
        logger.setLevel(level)


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _check_monitors(config: dict, where: str) -> None:
    """An enabled tensorboard/wandb/comet monitor needs its package, or DeepSpeed fails after the model is built."""
    from deepspeed.monitor.config import get_monitor_config

    monitors = get_monitor_config(config)
    for section, (module, extra) in MONITORS.items():
        if getattr(monitors, section).enabled and importlib.util.find_spec(module) is None:
            raise DSConfigError(
                f"{where}: {section}.enabled is true but the {module} package is not installed; "
                f'pip install -e ".[{extra}]", or set {section}.enabled to false'
            )


def check_deepspeed_fields(config: dict, where: str) -> None:
    """Every field of a resolved config: ours for meaning, then DeepSpeed's own parser, then the monitors."""
    if "gradient_clipping" in config:
        clip = config["gradient_clipping"]
        _check_value(
            where,
            "gradient_clipping",
            clip,
            _number(clip) and clip >= 0,
            "must be a finite number, 0 or more (0: no clipping)",
        )
    _check_optimizer(config, where)
    _check_scheduler(config, where)
    _check_with_deepspeed(config, where)
    _check_monitors(config, where)


def _unresolved(value: Any, path: str = "") -> list[str]:
    if value == AUTO:
        return [path or "(top level)"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _unresolved(v, f"{path}.{k}" if path else k)]
    return []


def resolve_ds_config(
    raw: dict, run: RunValues, world_size: int, where: str, supports_bf16: bool, has_gpu: bool
) -> tuple[dict, Batch, str, int]:
    """Returns (the config to hand DeepSpeed, the batch, the precision, the ZeRO stage)."""
    config = copy.deepcopy(raw)
    _check_shape(config, where)
    stage = _check_zero(config, where)
    batch = resolve_batch(config, run, world_size, where)
    precision = resolve_precision(config, run.precision, supports_bf16, has_gpu, where)
    _fill_auto(config, run, batch, precision)
    left = _unresolved(config)
    if left:
        raise DSConfigError(f'{where}: "auto" is not supported for {", ".join(left)}; set a value')
    check_deepspeed_fields(config, where)
    return config, batch, precision, stage
