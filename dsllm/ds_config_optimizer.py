"""The optimizer and scheduler sections of a DeepSpeed JSON: the class DeepSpeed would build for each type,
the parameters its constructor takes (did-you-mean for the rest), and values that train. Types and names are
checked before "auto" is filled, values after (`ds_config_checks.check_deepspeed_fields`)."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
from pathlib import Path
from typing import Any

from dsllm.ds_config_checks import _SCHEDULERS_WITH_AUTO, AUTO, DSConfigError, _did_you_mean, _json


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
    if name == "muon":  # DeepSpeed's MuonWithAuxAdam: its engine splits the keys between the Muon and Adam halves
        from deepspeed.runtime.engine import DeepSpeedEngine

        keys = {*DeepSpeedEngine._MUON_HALF_KEYS, *DeepSpeedEngine._ADAM_HALF_KEYS, "muon_lr", "adam_lr"}
        return _MuonParams, keys | {"adam_w_mode", "torch_adam", "fp32_optimizer_states", "per_head_muon"}, set()
    return None, set(), set()


class _MuonParams:
    """Stands for DeepSpeed's Muon in the parameter check: it takes only the keys `_optimizer_class` lists."""

    def __init__(self, params) -> None: ...


_MuonParams.__name__ = "MuonWithAuxAdam"


def _torch_optimizers() -> dict:
    import torch

    return {
        n: c
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
    }


def check_optimizer(config: dict, where: str) -> None:
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


def check_scheduler(config: dict, where: str) -> None:
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


def check_optimizer_layout(
    config: dict, where: str, *, pipeline: int, tensor: int, sequence: int, experts: int, moe: bool
) -> None:
    """Muon (--optimizer muon, or a JSON's "Muon") on the layouts it is wired and tested for: ZeRO-0/1/2 data
    parallelism, dense models. Elsewhere DeepSpeed's Muon fails late or is untested here (ZeRO-3: "Muon and reduce
    scatter cannot be used together"): one line before any rank starts."""
    if str(config.get("optimizer", {}).get("type", "")).lower() != "muon":
        return
    zero = config.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    unsupported = [
        (zero.get("stage", 0) == 3, f"ZeRO-3 ({where})"),
        (offload, f"optimizer offload ({where})"),
        (pipeline > 1, f"--pipeline-parallel {pipeline}"),
        (tensor > 1, f"--tensor-parallel {tensor}"),
        (sequence > 1, f"--sequence-parallel {sequence}"),
        (experts > 1 or moe, "a Mixture-of-Experts model (--model.moe_experts)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise DSConfigError(
                f"--optimizer muon with {what}: not supported yet (dsllm runs DeepSpeed's Muon on ZeRO-0/1/2 data "
                "parallelism of a dense model); use a ZeRO-0/1/2 JSON without an optimizer section and data "
                "parallelism alone, or --optimizer adamw"
            )
    clip = config.get("gradient_clipping", 0)
    if zero.get("stage", 0) in (1, 2) and clip not in (0, None, AUTO):
        # measured (tiny, 60 steps, ZeRO-1): val loss 6.76 clipped at 1.0 vs 6.29 unclipped (AdamW 6.47)
        raise DSConfigError(
            f"--optimizer muon with ZeRO-{zero['stage']} ({where}) and gradient clipping {clip}: DeepSpeed's ZeRO-1/2 "
            "clip the norm of Muon's orthogonalised update, not the gradient; pass --grad-clip 0, or use ZeRO-0 "
            "(ds_configs/zero0.json), which clips the gradient before Muon"
        )


def _optimizer_family(config: dict) -> str:
    kind = str(config.get("optimizer", {}).get("type", "")).lower()
    return "adamw" if kind in ("", "adam", "adamw") else kind  # "": dsllm.engine's torch AdamW


def check_resume_optimizer(config: dict, checkpoint: Path | None) -> None:
    """A checkpoint resumes under the optimizer it was trained with, as its run's config.json records it: another
    one's state does not load (DeepSpeed fails on it with a KeyError)."""
    if checkpoint is None:
        return
    try:
        recorded = json.loads((Path(checkpoint).parent.parent / "config.json").read_text())["deepspeed"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no record to compare with: DeepSpeed's load says what it finds
    saved, ours = _optimizer_family(recorded), _optimizer_family(config)
    if saved != ours:
        raise DSConfigError(
            f"{checkpoint}: trained with --optimizer {saved}, this run has {ours}; resume with --optimizer {saved} "
            "(and a JSON that agrees), or start from its weights with a fresh optimizer (--init)"
        )
