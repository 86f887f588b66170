"""Pipeline parallelism: the GPT as DeepSpeed's `PipelineModule`, trained by its `PipelineEngine` (1F1B).

The model is the same `GPT` every other layout trains, cut into a flat list of layers DeepSpeed partitions into
stages: [embedding, block 0, ..., block N-1, final norm, LM head]. The layers are `LayerSpec`s: a stage builds only
its own, each the GPT's own submodule (`Block`, the norm, ...) with the values the whole model has there (each
parameter's initial value comes from the run's seed and its GPT name, `dsllm.model.initial_value`), so no rank ever
holds the whole model and the curve is that of the unpartitioned one. A stage's trained layers map back onto GPT
parameter names (`to_gpt_state`, used when a pipeline checkpoint is consolidated).
With tied embeddings the LM head is a `TiedLayerSpec` of the embedding: DeepSpeed keeps the copy on the first and
the last stage equal and sums their gradients.

Between stages only the hidden states travel: each block recomputes its rotary tables from the sequence length
(training uses positions 0..T-1), so no stage needs anything from another but x.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsllm.errors import UserError
from dsllm.model import Block, causal_lm_loss, init_weights, make_norm, rotary_embedding, softcap
from dsllm.model_config import ModelConfig
from dsllm.tensor_parallel import TensorSplit, split_on_meta

# how a run's --pipeline-partition maps to DeepSpeed's partition_method
PARTITIONS = {
    "blocks": "type:BlockPipe",  # the same number of transformer blocks per stage (embedding and head ride along)
    # the same number of layers per stage, the LM head (+ loss) counting as one: on CPU, tiny preset, 2 stages x 8
    # micro batches, 0.86 of the 1F1B ideal against 0.72 for "blocks", whose last stage also carries the head
    "uniform": "uniform",
    "parameters": "parameters",  # balance parameter counts (a big vocabulary weighs on the first and last stage)
}


def _built(factory, config: ModelConfig, seed: int, prefix: str, split: TensorSplit | None = None) -> nn.Module:
    """`factory()` built on the meta device (no memory, no default initialisation), then given the values the whole
    GPT's parameters named `prefix`... have (`initial_value`). With a tensor-parallel `split` (3D), only this rank's
    shards of them (`split_on_meta`, under the GPT's own names; a token embedding split over the vocabulary)."""
    if split is None:
        with torch.device("meta"):
            module = factory()
        module.to_empty(device="cpu")
        init_weights(module, config, seed, prefix)
        return module
    path = prefix.rstrip(".").split(".")  # "blocks.3." -> nested {"blocks": {"3": module}}: the GPT's names

    def nested() -> nn.Module:
        module = factory()
        for name in reversed(path):
            module = nn.ModuleDict({name: module})
        return module

    embedding = path[0] if path == ["tok_embeddings"] else None
    module, _ = split_on_meta(nested, config, seed, split, embedding)
    for name in path:
        module = module[name]
    return module


class EmbeddingPipe(nn.Module):
    """Token (+ learned position) embedding and dropout: idx [B, T] -> x [B, T, d]."""

    def __init__(self, config: ModelConfig, seed: int, split: TensorSplit | None = None):
        super().__init__()
        token = lambda: nn.Embedding(config.vocab_size, config.d_model)  # noqa: E731
        self.tok = _built(token, config, seed, "tok_embeddings.", split)
        self.pos = None
        if config.positions == "learned":
            position = lambda: nn.Embedding(config.max_seq_len, config.d_model)  # noqa: E731
            self.pos = _built(position, config, seed, "pos_embeddings.")
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        if self.pos is not None:
            x = x + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.dropout(x)


class BlockPipe(nn.Module):
    """One transformer block; its rotary tables come from the sequence length."""

    def __init__(self, config: ModelConfig, seed: int, index: int, split: TensorSplit | None = None):
        super().__init__()
        self.block, self.config = _built(lambda: Block(config), config, seed, f"blocks.{index}.", split), config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotary = None
        if self.config.positions == "rope":
            positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], x.shape[1])
            rotary = rotary_embedding(positions, self.config, x.dtype)
        return self.block(x, rotary)


class NormPipe(nn.Module):
    def __init__(self, config: ModelConfig, seed: int):
        super().__init__()
        self.norm = _built(lambda: make_norm(config), config, seed, "norm.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class HeadPipe(nn.Module):
    """The (untied) LM head: x -> logits (soft-capped as the model's)."""

    def __init__(self, config: ModelConfig, seed: int, split: TensorSplit | None = None):
        super().__init__()
        head = lambda: nn.Linear(config.d_model, config.vocab_size, bias=False)  # noqa: E731
        self.head, self.cap = _built(head, config, seed, "lm_head.", split), config.logit_softcap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(self.head(x), self.cap)


def capped_tied_head(cap: float | None, embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """`tied_head`'s logits soft-capped as the model's (`dsllm.model.softcap`)."""
    return softcap(tied_head(embedding, x), cap)


def tied_head(embedding: EmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """Logits of the embedding's weight. When tensor parallelism split it over the vocabulary (3D), a column-
    parallel projection as AutoTP's own layers make it: each rank its slice of the logits, gathered, and the
    gradient of x summed over the ranks in backward (each rank's slice of the vocabulary gives a part of it)."""
    group = getattr(embedding.tok, "mp_group", None)  # DeepSpeed's VocabParallelEmbedding
    if group is None:
        return F.linear(x, embedding.tok.weight)
    from deepspeed.module_inject.layers import ColumnParallel, GatherFromTensorParallelRegion

    logits = F.linear(ColumnParallel.apply(group, x), embedding.tok.weight)
    return GatherFromTensorParallelRegion.apply(group, logits, tuple(embedding.tok._partition_sizes))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GPT.forward's own loss (mean cross-entropy in fp32, targets of -100 ignored)."""
    return causal_lm_loss(logits, shift_labels=targets)


def training_loss(config: ModelConfig):
    """The pipeline engine's loss function, which it runs in training only (scoring takes the logits: Engine.score):
    GPT.forward's training loss, the model's z-loss included."""
    if not config.z_loss:
        return next_token_loss
    from dsllm.model import z_loss

    return lambda logits, targets: next_token_loss(logits, targets) + config.z_loss * z_loss(logits, targets)


def layers_of(config: ModelConfig, seed: int, split: TensorSplit | None = None) -> list:
    """The pipeline's layers, in order, as DeepSpeed's LayerSpecs: a stage builds only its own layers, each with the
    values the whole GPT of `seed` would have there (`dsllm.model.initial_value`); with a tensor-parallel `split`,
    only this rank's shards of them."""
    import functools

    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if config.tie_embeddings:
        weight = ["tok.weight"]
        first = TiedLayerSpec("embedding", EmbeddingPipe, config, seed, split, tied_weight_attr=weight)
        head = functools.partial(capped_tied_head, config.logit_softcap) if config.logit_softcap else tied_head
        last = TiedLayerSpec("embedding", EmbeddingPipe, config, seed, split, forward_fn=head, tied_weight_attr=weight)
    else:
        first, last = LayerSpec(EmbeddingPipe, config, seed, split), LayerSpec(HeadPipe, config, seed, split)
    blocks = [LayerSpec(BlockPipe, config, seed, i, split) for i in range(config.n_layers)]
    return [first, *blocks, LayerSpec(NormPipe, config, seed), last]


def to_gpt_state(n_layers: int, index: int, layer_state: dict) -> dict:
    """A pipeline checkpoint's layer file (layer_NN-model_states.pt) of layer `index` of `layers_of`, as GPT
    state-dict entries."""
    if index == 0:
        renames = {"tok.": "tok_embeddings.", "pos.": "pos_embeddings."}
    elif index <= n_layers:
        renames = {"block.": f"blocks.{index - 1}."}
    elif index == n_layers + 1:
        renames = {"norm.": "norm."}
    else:
        renames = {"head.": "lm_head."}
    return {
        theirs + key[len(ours) :]: value
        for key, value in layer_state.items()
        for ours, theirs in renames.items()
        if key.startswith(ours)
    }


def gpt_name(n_layers: int, name: str) -> str | None:
    """A PipelineModule parameter's name ("3.block.attn.qkv.weight", "tied_modules.embedding.tok.weight") as GPT's
    ("blocks.2.attn.qkv.weight", "tok_embeddings.weight")."""
    index, key = name.split(".", 1)
    if index == "tied_modules":  # the embedding (layer 0), its weight also the tied head's
        index, key = "0", key.split(".", 1)[1]
    return next(iter(to_gpt_state(n_layers, int(index), {key: None})), None)


def pipeline_name(n_layers: int, tied: bool, name: str) -> str | None:
    """GPT's parameter name as the PipelineModule's of `layers_of` (None: a tied head, which is the embedding)."""
    if name.startswith("tok_embeddings."):
        rest = name.removeprefix("tok_embeddings.")
        return f"tied_modules.embedding.tok.{rest}" if tied else f"0.tok.{rest}"
    if name.startswith("pos_embeddings."):
        return "0.pos." + name.removeprefix("pos_embeddings.")
    if name.startswith("blocks."):
        _, index, rest = name.split(".", 2)
        return f"{int(index) + 1}.block.{rest}"
    if name.startswith("norm."):
        return f"{n_layers + 1}.{name}"
    if name.startswith("lm_head."):
        return None if tied else f"{n_layers + 2}.head." + name.removeprefix("lm_head.")
    return None


def check_pipeline(model, world_size: int, stages: int, partition: str, compile_: bool) -> None:
    """A pipeline layout that cannot run is one line before any rank starts (`model` a ModelConfig)."""
    if stages == 1:
        return
    for field in ("value_embeddings", "unet_skips"):
        if getattr(model, field):
            raise UserError(
                f"--pipeline-parallel {stages} with --model.{field} {getattr(model, field)}: not supported (it joins "
                "blocks that different stages would hold); drop one of them"
            )
    if world_size % stages:
        raise UserError(
            f"--pipeline-parallel {stages}: the {world_size} rank(s) do not divide into {stages} stages; launch a "
            f"multiple of {stages} ranks (deepspeed --num_gpus N) or change --pipeline-parallel"
        )
    if stages > model.n_layers:
        raise UserError(
            f"--pipeline-parallel {stages}: more stages than the model's {model.n_layers} transformer blocks; use "
            f"at most {model.n_layers} stages"
        )
    blocks = blocks_per_stage(model, stages, partition)
    if 0 in blocks:  # DeepSpeed's pipeline engine hangs in the first step on such a stage (seen on 2 CPU ranks)
        raise UserError(
            f"--pipeline-partition {partition} leaves stage {blocks.index(0)} of {stages} without a "
            f"transformer block (blocks per stage: {blocks}); use --pipeline-partition blocks or fewer stages"
        )
    if compile_:
        raise UserError(f"--compile with --pipeline-parallel {stages}: not supported yet; drop one of them")


def blocks_per_stage(config, stages: int, partition: str) -> list[int]:
    """Transformer blocks each stage gets, by DeepSpeed's own partition functions over the layers of `layers_of`
    (for "parameters", a block's and a norm's counts from modules built on the meta device: no memory)."""
    from deepspeed.runtime import utils as ds_utils

    from dsllm.model import Block, make_norm

    n = config.n_layers
    is_block = [0] + [1] * n + [0, 0]
    if partition == "uniform":
        parts = ds_utils.partition_uniform(num_items=len(is_block), num_parts=stages)
    elif partition == "blocks":
        parts = ds_utils.partition_balanced(weights=is_block, num_parts=stages)
    else:
        with torch.device("meta"):
            block = sum(p.numel() for p in Block(config).parameters())
            norm = sum(p.numel() for p in make_norm(config).parameters())
        positions = config.max_seq_len * config.d_model if config.positions == "learned" else 0
        embedding = config.vocab_size * config.d_model + positions
        weights = [embedding] + [block] * n + [norm, config.vocab_size * config.d_model]  # (a tied head counts too)
        parts = ds_utils.partition_balanced(weights=weights, num_parts=stages)
    return [sum(is_block[parts[s] : parts[s + 1]]) for s in range(stages)]


def pipeline_module(
    config: ModelConfig, seed: int, stages: int, partition: str, tensor: int = 1, section: dict | None = None
):
    """DeepSpeed's PipelineModule of the GPT of `config` and `seed` in `stages` stages (after init_distributed);
    with `tensor` > 1 on its pipe x data x model grid (the model axis fastest: a stage's tensor-parallel ranks are
    consecutive, as AutoTP's own mesh has them), each rank building only its shards of its stage's layers, split by
    AutoTP with the DeepSpeed JSON's tensor_parallel `section` (dsllm.tensor_parallel.autotp_section). The model's
    activation checkpointing becomes the module's: each transformer block recomputed in backward (torch's non-reentrant
    checkpoint, or DeepSpeed's), the embedding and the head not."""
    import functools

    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    layout, split = {"num_stages": stages}, None
    if tensor > 1:
        data = dist.get_world_size() // (stages * tensor)
        topology = PipeModelDataParallelTopology(num_pp=stages, num_mp=tensor, num_dp=data)
        layout = {"topology": topology}
        # the stage's tensor group, the ranks of the grid's slice group (which exists only once PipelineModule has
        # built the layers): every rank creates every group, in the same order. AutoTP in training mode reads it
        # from DeepSpeed's `groups`, not from its argument (engine.build_engine sets the grid's there later)
        from deepspeed.utils import groups

        for ranks in topology.get_axis_comm_lists("model"):
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                split, groups._TENSOR_MODEL_PARALLEL_GROUP = TensorSplit(section, group), group
    checkpointing = {"activation_checkpoint_interval": 0}
    if config.activation_checkpointing != "none":
        checkpointing = {"activation_checkpoint_interval": 1, "checkpointable_layers": [BlockPipe.__name__]}
        if config.activation_checkpointing == "torch":
            checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
            checkpointing["activation_checkpoint_func"] = checkpoint
    return PipelineModule(
        layers=layers_of(config, seed, split),
        **layout,
        loss_fn=training_loss(config),
        partition_method=PARTITIONS[partition],
        **checkpointing,
    )
