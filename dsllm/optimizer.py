"""The optimizer's side of a run, one owner: the parameter groups (decay, no decay, embedding and head lr / weight
decay), the optimizer handed to `deepspeed.initialize` when the JSON's would not do (torch AdamW, DeepSpeed's CPU
Lion), Muon's split of the groups (the blocks' matrices to Muon, the rest to AdamW), and the pre-flight checks of
the groups' options. `dsllm.engine.build_engine` uses them."""

from __future__ import annotations

import torch


def param_groups(
    model: torch.nn.Module,
    weight_decay: float,
    lr: float | None = None,
    *,
    embedding_lr_scale: float = 1.0,
    head_lr_scale: float = 1.0,
    embedding_weight_decay: float = 0.0,
) -> list[dict]:
    """The optimizer's named groups: "decay" (matrices, `weight_decay`), "no_decay" (norms, biases), "embedding"
    (token and learned-position embeddings; a tied head is the embedding, and so is an embedding split over the
    vocabulary) at `embedding_lr_scale` x lr and `embedding_weight_decay`, "head" (an untied LM head, decayed as a
    matrix) at `head_lr_scale` x lr. The embeddings join "no_decay" and the head "decay" when their settings are
    those groups' (the default: the groups of earlier runs, so their checkpoints resume). With `lr`, every group
    carries its own "lr" (lr x its scale): a schedule that multiplies each group's initial lr by a factor per step
    (LambdaLR, DeepSpeed's WarmupCosineLR) keeps the ratios. `model` may be a pipeline stage's part of it (the head
    there is "N.head"). Experts' parameters (MoE) then form groups of their own, as DeepSpeed's MoE needs."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding

    embeddings = (torch.nn.Embedding, VocabParallelEmbedding)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, embeddings)}
    own_embedding = embedding_lr_scale != 1.0 or embedding_weight_decay != 0.0
    own_head = head_lr_scale != 1.0
    named = {
        "decay": (weight_decay, 1.0),
        "no_decay": (0.0, 1.0),
        "embedding": (embedding_weight_decay, embedding_lr_scale),
        "head": (weight_decay, head_lr_scale),
    }
    members: dict[str, list] = {name: [] for name in named}
    for name, param in model.named_parameters():  # (a tied head: the embedding's name, which comes first)
        ndim = len(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitioned (zero.Init): data is empty
        if id(param) in embedding_ids:
            group = "embedding" if own_embedding else "no_decay"
        elif name == "lm_head.weight" or name.endswith(".head.weight"):  # the GPT's, a pipeline's HeadPipe
            group = "head" if own_head else "decay"
        else:
            group = "decay" if ndim >= 2 else "no_decay"
        members[group].append(param)
    groups = []
    for name, (decay, scale) in named.items():
        if members[name] or name in ("decay", "no_decay"):  # (the two groups of earlier runs always, in order)
            group = {"params": members[name], "weight_decay": decay, "name": name}
            if lr is not None:
                group["lr"] = lr * scale
            groups.append(group)
    from deepspeed.moe.utils import has_moe_layers, split_params_into_different_moe_groups_for_optimizer

    if has_moe_layers(model)[0]:  # experts' parameters in groups of their own: DeepSpeed reduces them apart
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


# DeepSpeed schedulers that set one absolute lr on every group (the others scale each group's own)
_ONE_LR_SCHEDULERS = ("WarmupLR", "WarmupDecayLR", "OneCycle", "LRRangeTest")


def check_lr_groups(config, model, ds: dict, where: str) -> None:
    """`param_groups`' options that cannot take effect are one line before any rank starts: a head lr scale when the
    head is the embedding, and an lr scale under a DeepSpeed JSON scheduler that gives every group the same lr."""
    from dsllm.errors import UserError

    if config.head_lr_scale != 1.0 and model.tie_embeddings:
        raise UserError(
            f"--head-lr-scale {config.head_lr_scale} with a tied LM head (model.tie_embeddings true): the head is the "
            "embedding; pass --model.tie_embeddings false, or use --embedding-lr-scale"
        )
    scaled = [
        f"--{name.replace('_', '-')} {getattr(config, name)}"
        for name in ("embedding_lr_scale", "head_lr_scale")
        if getattr(config, name) != 1.0
    ]
    kind = ds.get("scheduler", {}).get("type")
    if scaled and kind in _ONE_LR_SCHEDULERS:
        raise UserError(
            f"{scaled[0]} with {where}'s scheduler {kind}, which sets one lr for every parameter group; use a JSON "
            "with WarmupCosineLR or without a scheduler (dsllm's schedule), or drop the scale"
        )


def optimizer_type(ds: dict) -> str:
    """The JSON's optimizer.type, lower case ('' when it has none: build_engine's torch AdamW)."""
    return str(ds.get("optimizer", {}).get("type", "")).lower()


def client_optimizer(ds: dict, groups: list[dict], device: torch.device, lr: float, betas: tuple[float, float]):
    """The optimizer build_engine hands `deepspeed.initialize`, or None for the one DeepSpeed builds from the JSON.
    No optimizer section: torch's AdamW. A Lion section on the CPU accelerator without offload: DeepSpeed's CPU
    Lion (its C++ op), as DeepSpeed's engine builds FusedLion, which has no CPU kernel ("This op had not been
    implemented on CPU backend"); the section leaves `ds` (the run's config.json still records it)."""
    if "optimizer" not in ds:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if optimizer_type(ds) == "lion" and device.type == "cpu" and offload in ("none", None):
        from deepspeed.ops.lion import DeepSpeedCPULion

        params = dict(ds.pop("optimizer").get("params", {}))
        if "betas" in params:
            params["betas"] = tuple(params["betas"])
        return DeepSpeedCPULion(groups, **params)
    return None


def muon_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the parameters Muon updates, by the usual rule: the matrices of the blocks (2-D or more: attention
    and MLP projections, experts); not embeddings (token, position), the LM head (tied or not), norms or biases,
    which AdamW updates."""
    from deepspeed.module_inject.layers import VocabParallelEmbedding

    embeddings = (torch.nn.Embedding, VocabParallelEmbedding)
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, embeddings)}
    excluded |= {id(p) for name, p in model.named_parameters() if name.split(".")[-2:-1] == ["lm_head"]}
    return {id(p) for p in model.parameters() if len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in excluded}


def tag_muon(model: torch.nn.Module) -> None:
    """Set `param.use_muon`, which DeepSpeed's Muon splits its groups by (`deepspeed.initialize` sets it again
    from the names, "embed" and "lm_head" excluded: `check_muon_tags` then checks the two rules agree)."""
    chosen = muon_parameters(model)
    for param in model.parameters():
        param.use_muon = id(param) in chosen


def muon_halves(groups: list[dict], lr: float, muon_lr: float) -> list[dict]:
    """Each group as its Muon half and its AdamW half (tagged parameters first). DeepSpeed's Muon makes the same
    split but gives both halves a group's own "lr": here a group's lr is read as --lr x a scale, and its Muon half
    gets --muon-lr x that scale (a group without "lr" leaves both to the JSON's lr and muon_lr)."""
    halves = []
    for index, group in enumerate(groups):
        for use_muon in (True, False):
            params = [p for p in group["params"] if bool(getattr(p, "use_muon", False)) is use_muon]
            if not params:
                continue
            half = {
                **group,
                "params": params,
                "name": f"{group.get('name', f'group{index}')}-{'muon' if use_muon else 'adamw'}",
            }
            if use_muon and "lr" in group:
                half["lr"] = muon_lr * group["lr"] / lr
            halves.append(half)
    return halves


def check_muon_tags(model: torch.nn.Module) -> None:
    """DeepSpeed's tags (by parameter name) are the module rule's: a new module named otherwise would be updated
    by the wrong half of Muon without a word. A bug, not a user error."""
    chosen = muon_parameters(model)
    wrong = [name for name, p in model.named_parameters() if bool(getattr(p, "use_muon", False)) != (id(p) in chosen)]
    if wrong:
        raise RuntimeError(f"DeepSpeed tagged use_muon unlike dsllm.optimizer.muon_parameters for {', '.join(wrong)}")
