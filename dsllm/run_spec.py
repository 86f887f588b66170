"""What pre-flight resolves once, before any rank starts: the world, the batch arithmetic, the precision,
the ZeRO stage, the sequence length, the model and the DeepSpeed JSON with its "auto" fields filled.

`RunSpec` is frozen and holds only resolved values (no None meaning "not given"): the command line's raw
values stay in `TrainConfig`. Building blocks take the fields they need, not the whole spec. No torch here,
so the command line and `--help` stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from dsllm.ds_config import Batch
from dsllm.model_config import ModelConfig
from dsllm.world import World


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """A run as it will execute on this world. Parallel layouts beyond data parallelism (pipeline, tensor,
    sequence, expert) add their degrees here; `batch.world_size` is the data-parallel size."""

    world: World
    model: ModelConfig
    seq_len: int  # tokens per sample (the model sees seq_len inputs and predicts seq_len targets)
    batch: Batch  # micro batch per rank x accumulation x data-parallel ranks
    precision: str  # bf16, fp16 or fp32 (never "auto" here)
    zero_stage: int  # 0-3
    ds: dict[str, Any] = dataclasses.field(repr=False)  # the DeepSpeed JSON, "auto" filled, for deepspeed.initialize
    pipeline_stages: int = 1  # DeepSpeed's PipelineModule stages; world.size / pipeline_stages are data-parallel
    pipeline_partition: str = "blocks"  # how the layers split over the stages (dsllm.pipeline.PARTITIONS)
    tensor_parallel: int = 1  # DeepSpeed AutoTP ranks per layer: consecutive ranks (a data x tensor mesh)
    expert_parallel: int = 1  # DeepSpeed MoE ep_size: consecutive data-parallel ranks split each sparse block's experts
    sequence_parallel: int = 1  # DeepSpeed-Ulysses: consecutive ranks each hold a piece of every window

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_size * self.seq_len

    @property
    def data_parallel_size(self) -> int:
        return self.world.size // (self.pipeline_stages * self.tensor_parallel * self.sequence_parallel)

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel index. DeepSpeed's pipe x data x model grid (and AutoTP's data x tensor mesh)
        numbers the tensor axis fastest, then the data axis: rank = (stage * D + replica) * T + tensor index; its
        sequence groups are consecutive ranks too: rank = replica * S + piece. Ranks that differ only in their
        stage, tensor index or piece read the same samples."""
        return (self.world.rank // (self.tensor_parallel * self.sequence_parallel)) % self.data_parallel_size

    @property
    def sequence_parallel_rank(self) -> int:
        """Which piece of every window this rank holds (sequence parallelism)."""
        return self.world.rank % self.sequence_parallel

    @property
    def tensor_parallel_rank(self) -> int:
        return self.world.rank % self.tensor_parallel

    @property
    def expert_rank(self) -> int:
        """This rank's place among the ranks that split the experts (DeepSpeed's expert-parallel groups are
        consecutive ranks), so it holds experts expert_rank x experts / expert_parallel on."""
        return self.world.rank % self.expert_parallel

    def layout(self) -> str:
        """The parallel layout as said at start-up: '' for data parallelism alone, else which ranks hold what."""
        data = self.data_parallel_size
        if self.tensor_parallel > 1:
            groups = _rank_groups(self.tensor_parallel, data * self.pipeline_stages)
            stages = f"{self.pipeline_stages} pipeline stages x " if self.pipeline_stages > 1 else ""
            return f" ({stages}{self.tensor_parallel} tensor-parallel x {data} data-parallel; tensor groups: {groups})"
        if self.pipeline_stages > 1:
            return f" ({self.pipeline_stages} pipeline stages x {data} data-parallel)"
        if self.sequence_parallel > 1:
            groups = _rank_groups(self.sequence_parallel, data)
            return f" ({self.sequence_parallel} sequence-parallel x {data} data-parallel; sequence groups: {groups})"
        if self.expert_parallel > 1:
            groups = _rank_groups(self.expert_parallel, data // self.expert_parallel)
            return f" ({data} data-parallel; experts split over {groups})"
        return ""

    def deepspeed_config(self, load_universal: bool = False) -> dict[str, Any]:
        """A fresh copy of the DeepSpeed JSON for `deepspeed.initialize`; `load_universal` when resuming through
        a universal checkpoint (another world size or ZeRO stage)."""
        ds = copy.deepcopy(self.ds)
        checkpoint = {k: v for k, v in ds.get("checkpoint", {}).items() if k != "load_universal"}
        if load_universal:
            checkpoint["load_universal"] = True
        if checkpoint:
            ds["checkpoint"] = checkpoint
        else:
            ds.pop("checkpoint", None)
        return ds


def _rank_groups(size: int, count: int) -> str:
    """'ranks 0-1, 2-3, ...': the first of `count` groups of `size` consecutive ranks."""
    groups = ", ".join(f"{g * size}-{g * size + size - 1}" for g in range(min(count, 4)))
    return f"ranks {groups}" + (", ..." if count > 4 else "")
