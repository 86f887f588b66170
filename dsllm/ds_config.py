"""The DeepSpeed JSON: read it, fill its "auto" fields from our config, check it, pass it on.

We never generate the file. Fields set explicitly in the JSON win; a command-line value that
contradicts one is an error, as is batch arithmetic that does not add up or a ZeRO/feature
combination DeepSpeed would reject late (`ds_config_checks` checks every field). Everything here runs
before any rank starts work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsllm.ds_config_checks import (
    _SCHEDULERS_WITH_AUTO,
    AUTO,
    DSConfigError,
    _check_shape,
    _json,
    check_deepspeed_fields,
)

if TYPE_CHECKING:
    from dsllm.train_config import TrainConfig

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclasses.dataclass(frozen=True)
class Batch:
    """The batch arithmetic: micro batch per rank x accumulation steps x data-parallel ranks = global batch."""

    micro: int
    accumulation: int
    world_size: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accumulation * self.world_size

    @property
    def per_rank(self) -> int:
        """Samples one rank handles per optimizer step."""
        return self.micro * self.accumulation


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


def resolve_batch(
    config: dict, micro: int | None, accumulation: int | None, total: int | None, world_size: int, where: str
) -> Batch:
    """micro x accumulation x data-parallel world size = global batch, from whichever are given."""
    micro = _merge(
        "train_micro_batch_size_per_gpu",
        "--micro-batch-size",
        config.get("train_micro_batch_size_per_gpu"),
        micro,
        where,
    )
    accum = _merge(
        "gradient_accumulation_steps", "--grad-accum", config.get("gradient_accumulation_steps"), accumulation, where
    )
    total = _merge("train_batch_size", "--global-batch-size", config.get("train_batch_size"), total, where)
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
        if kind not in ("adam", "adamw", "lion"):
            raise DSConfigError(
                f"zero_optimization.offload_optimizer runs DeepSpeed's CPU Adam (or CPU Lion): set optimizer.type "
                f'to "AdamW" in {where} (it is {kind or "missing"})'
            )
    if config.get("pipeline", {}).get("stages", 1) not in (1, "auto") and stage >= 2:
        raise DSConfigError(f"pipeline parallelism cannot run with ZeRO stage {stage} ({where}); use stage 0 or 1")
    return stage


# --optimizer -> the optimizer section dsllm fills into a JSON that has none ("auto": from the options, below)
_OPTIMIZER_SECTIONS = {
    "muon": {
        "type": "Muon",  # DeepSpeed's MuonWithAuxAdam: Muon for the parameters tagged use_muon, AdamW for the rest
        "params": {"lr": AUTO, "muon_lr": AUTO, "momentum": AUTO, "betas": AUTO, "eps": 1e-8, "weight_decay": AUTO},
    },
    "lion": {"type": "Lion", "params": {"lr": AUTO, "betas": AUTO, "weight_decay": AUTO}},
}


def _fill_optimizer(config: dict, choice: str, where: str) -> None:
    """--optimizer muon or lion: the JSON's optimizer section. A JSON without one, or with the shipped configs'
    AdamW whose lr is "auto" (left to dsllm's options), gets the chosen one; a JSON that names another optimizer
    with values of its own is refused (the user's file and the option disagree)."""
    if choice not in _OPTIMIZER_SECTIONS:
        return  # adamw: the JSON's own optimizer, else torch's AdamW (dsllm.engine.build_engine)
    section = config.get("optimizer")
    left_to_dsllm = section is not None and str(section.get("type", "")).lower() in ("adam", "adamw")
    left_to_dsllm = left_to_dsllm and section.get("params", {}).get("lr") == AUTO
    if section is None or left_to_dsllm:
        config["optimizer"] = copy.deepcopy(_OPTIMIZER_SECTIONS[choice])
    elif str(section.get("type", "")).lower() != choice:
        raise DSConfigError(
            f'--optimizer {choice}: {where} names its own optimizer ({section.get("type")}); remove its "optimizer" '
            f"section (dsllm fills it from --optimizer) or drop --optimizer"
        )


def _fill_auto(config: dict, run: TrainConfig, batch: Batch, precision: str, hidden_size: int | None) -> None:
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
    fill(optimizer, "betas", [run.beta1, run.beta2])
    fill(optimizer, "weight_decay", run.weight_decay)
    if str(config.get("optimizer", {}).get("type", "")).lower() == "muon":
        fill(optimizer, "muon_lr", run.muon_lr)
        fill(optimizer, "momentum", run.muon_momentum)
    scheduler = config.get("scheduler", {})
    params = scheduler.get("params", {})
    if scheduler.get("type") in _SCHEDULERS_WITH_AUTO:
        fill(params, "total_num_steps", run.max_steps)
        fill(params, "warmup_num_steps", max(1, run.warmup))
        fill(params, "cos_min_ratio", run.min_lr_ratio)
        fill(params, "warmup_max_lr", run.lr)
        fill(params, "warmup_min_lr", 0.0)
    zero = config.get("zero_optimization", {})
    if hidden_size:  # sized to the model as HF Trainer does, instead of DeepSpeed's fixed 5e8-element buckets
        hidden = hidden_size  # (ZeRO-3 allocates its reduce bucket whole: 1.9 GiB in fp32 even for a tiny model)
        fill(zero, "reduce_bucket_size", hidden * hidden)
        fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        fill(zero, "stage3_param_persistence_threshold", 10 * hidden)


def _unresolved(value: Any, path: str = "") -> list[str]:
    if value == AUTO:
        return [path or "(top level)"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _unresolved(v, f"{path}.{k}" if path else k)]
    return []


def resolve_ds_config(
    raw: dict,
    run: TrainConfig,
    world_size: int,
    where: str,
    supports_bf16: bool,
    has_gpu: bool,
    hidden_size: int | None = None,
) -> tuple[dict, Batch, str, int]:
    """Returns (the config to hand DeepSpeed, the batch, the precision, the ZeRO stage). `run` contributes the
    batch sizes, optimizer and schedule values and the precision; `hidden_size` (the model's d_model) sizes
    ZeRO's buckets when they are "auto"."""
    config = copy.deepcopy(raw)
    _check_shape(config, where)
    _fill_optimizer(config, run.optimizer, where)
    stage = _check_zero(config, where)
    batch = resolve_batch(config, run.micro_batch_size, run.grad_accum, run.global_batch_size, world_size, where)
    precision = resolve_precision(config, run.precision, supports_bf16, has_gpu, where)
    _fill_auto(config, run, batch, precision, hidden_size)
    left = _unresolved(config)
    if left:
        raise DSConfigError(f'{where}: "auto" is not supported for {", ".join(left)}; set a value')
    check_deepspeed_fields(config, where)
    return config, batch, precision, stage
