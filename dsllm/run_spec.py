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

    @property
    def tokens_per_step(self) -> int:
        return self.batch.global_size * self.seq_len

    @property
    def data_parallel_size(self) -> int:
        return self.world.size // self.pipeline_stages

    @property
    def data_parallel_rank(self) -> int:
        """This rank's data-parallel index: DeepSpeed's pipe x data grid numbers the data axis fastest (stage s holds
        ranks s*D .. s*D+D-1), so ranks that differ only in their stage read the same samples."""
        return self.world.rank % self.data_parallel_size

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
