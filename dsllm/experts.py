"""Mixture-of-Experts layouts: DeepSpeed's MoE parameters under the model's own names, and which layouts can split a
model's experts over ranks (pretraining's --expert-parallel and `dsllm plan --expert-parallel` ask the same)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dsllm.errors import UserError

if TYPE_CHECKING:
    from dsllm.model_config import ModelConfig

_LOCAL_EXPERT = re.compile(r"\.mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.")


def expert_names(name: str, first_expert: int = 0) -> str:
    """A parameter's name with DeepSpeed's MoE layer's inner path as the model's own: the router
    ("blocks.1.mlp.deepspeed_moe.gate.wg.weight" -> "blocks.1.mlp.router.weight") and each expert by its index among
    all of the layer's experts (a rank holding experts from `first_expert` on numbers its own from 0):
    "blocks.1.mlp.deepspeed_moe.experts.deepspeed_experts.0.fc.weight" -> "blocks.1.mlp.experts.2.fc.weight"."""
    name = name.replace(".mlp.deepspeed_moe.gate.wg.", ".mlp.router.")
    return _LOCAL_EXPERT.sub(lambda m: f".mlp.experts.{first_expert + int(m.group(1))}.", name)


def check_expert_split(model: ModelConfig, size: int, ranks: int, unit: str = "rank") -> None:
    """--expert-parallel `size`: experts to split, evenly, over groups of `size` of the `ranks` data-parallel ranks
    (`unit` "GPU" for a plan's GPUs)."""
    training = unit == "rank"  # (pretraining's flags; a plan names a model instead)
    if size > 1 and not model.moe_experts:
        fix = f"set --model.moe_experts (a multiple of {size})" if training else "plan a Mixture-of-Experts model"
        raise UserError(f"--expert-parallel {size}: the model has no experts to split; {fix} or drop --expert-parallel")
    if size == 1:
        return
    if model.moe_experts % size:
        raise UserError(
            f"--expert-parallel {size}: the {model.moe_experts} experts of a sparse block do not split evenly over "
            f"{size} {unit}s; use a divisor of {'--model.moe_experts' if training else model.moe_experts}"
        )
    if ranks % size:
        what = "data-parallel rank(s)" if training else f"{unit}(s)"
        raise UserError(
            f"--expert-parallel {size}: the {ranks} {what} do not divide into groups of {size}; use a multiple of "
            f"{size} {unit}s or change --expert-parallel"
        )


def check_experts(
    model: ModelConfig, stages: int, tensor: int, experts: int, data: int, zero_stage: int, ds_config: str
) -> None:
    """Mixture-of-Experts blocks run on data parallelism with ZeRO-0/1/2, their experts split over `experts` of the
    `data` data-parallel ranks (DeepSpeed's MoE layer has no pipeline or AutoTP path of ours yet, and DeepSpeed
    does not train MoE layers under ZeRO-3)."""
    check_expert_split(model, experts, data)
    if not model.moe_experts:
        return
    if stages > 1 or tensor > 1:
        flag = f"--pipeline-parallel {stages}" if stages > 1 else f"--tensor-parallel {tensor}"
        raise UserError(f"--model.moe_experts {model.moe_experts} with {flag}: not supported yet; drop one of them")
    if zero_stage == 3:
        raise UserError(
            f"--model.moe_experts {model.moe_experts} with {ds_config} (ZeRO-3): DeepSpeed does not train MoE layers "
            "under ZeRO-3; use ds_configs/zero1.json or zero2.json"
        )
