"""The DeepSpeed JSON checked field by field before any rank starts: the top-level keys and sections
DeepSpeed knows (with did-you-mean), the optimizer and scheduler it would build and their parameters, its
own pydantic models and asserts on the resolved config, and the monitors' packages. DeepSpeed reads many
sections with dict.get, so without this a typo would be ignored silently, or fail after the model is built.
"""

from __future__ import annotations

import copy
import difflib
import importlib.util
import json
from typing import Any

from dsllm.errors import UserError

AUTO = "auto"


DOCS = "https://www.deepspeed.ai/docs/config-json/"


_SCHEDULERS_WITH_AUTO = ("WarmupCosineLR", "WarmupDecayLR", "WarmupLR")


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
    from dsllm.ds_config_optimizer import check_optimizer, check_scheduler  # (it imports this module)

    check_optimizer(config, where)  # types and parameter names now, values ("auto" included) once filled
    check_scheduler(config, where)


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
    from dsllm.ds_config_optimizer import _check_value, _number, check_optimizer, check_scheduler

    if "gradient_clipping" in config:
        clip = config["gradient_clipping"]
        _check_value(
            where,
            "gradient_clipping",
            clip,
            _number(clip) and clip >= 0,
            "must be a finite number, 0 or more (0: no clipping)",
        )
    check_optimizer(config, where)
    check_scheduler(config, where)
    _check_with_deepspeed(config, where)
    _check_monitors(config, where)
