"""Batch-size warmup (`--batch-size-warmup`): the global batch grows from `--batch-size-start` samples to the run's over
the first optimizer steps, as GPT-3's batch ramp and Megatron's `--rampup-batch-size` do.

Only the number of micro batches a step accumulates changes: the micro batch stays the same (no new shapes, no more
memory), and so does the loader, which hands out micro batches in one fixed order; a step simply takes fewer of them.
The accumulation is a pure function of the optimizer step (`BatchWarmup.accumulation`) and the loader's position is
counted in samples, so a resumed run continues exactly. DeepSpeed's engine is told each step's accumulation
(`Engine.train_batch`): `set_train_batch_size` changes the gradient_accumulation_steps its `backward` divides the
loss by, and each micro batch's accumulation boundary is set explicitly, because DeepSpeed's own test of it (a running
micro-step counter modulo the accumulation) is wrong once the accumulation has changed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dsllm.errors import UserError

if TYPE_CHECKING:
    from dsllm.ds_config import Batch


@dataclasses.dataclass(frozen=True)
class BatchWarmup:
    """The ramp: `per_micro` samples per micro batch over all data-parallel ranks; `start` micro batches accumulated
    at step 0, `full` (the run's --grad-accum) from step `steps` on."""

    per_micro: int
    start: int
    full: int
    steps: int

    def accumulation(self, step: int) -> int:
        """The micro batches of optimizer step `step` (0-based, the step being trained): start + floor((full - start)
        x step / steps), the linear ramp rounded down to whole micro batches, and full from step `steps` on."""
        if step >= self.steps:
            return self.full
        return self.start + (self.full - self.start) * step // self.steps

    def global_batch(self, step: int) -> int:
        """The samples optimizer step `step` (0-based) trains on, over all ranks."""
        return self.per_micro * self.accumulation(step)

    def samples(self, steps: int) -> int:
        """The samples the first `steps` optimizer steps train on together."""
        ramp = min(steps, self.steps)
        return sum(self.global_batch(s) for s in range(ramp)) + (steps - ramp) * self.per_micro * self.full


def batch_warmup(
    steps: int, start: int | None, batch: Batch, pipeline_stages: int = 1, sequence_parallel: int = 1
) -> BatchWarmup | None:
    """The ramp of --batch-size-warmup and --batch-size-start for a run of `batch` (None: off). The default start is
    one micro batch per data-parallel rank. Refuses what cannot ramp in one line."""
    if not steps:
        return None
    per_micro = batch.micro * batch.world_size
    if pipeline_stages > 1:
        raise UserError(
            f"--batch-size-warmup with --pipeline-parallel {pipeline_stages}: not supported yet (DeepSpeed's pipeline "
            "engine fixes its micro batches per step when it is built); drop one of them"
        )
    if sequence_parallel > 1:
        raise UserError(
            f"--batch-size-warmup with --sequence-parallel {sequence_parallel}: not supported yet (DeepSpeed's "
            "engine has no data-parallel size to change the batch by under Ulysses); drop one of them"
        )
    if batch.accumulation == 1:
        raise UserError(
            f"--batch-size-warmup {steps}: the run accumulates 1 micro batch per step, there is no smaller batch to "
            f"ramp from; raise --grad-accum and lower --micro-batch-size (global batch {batch.global_size} now)"
        )
    if start is None:
        start = per_micro
    if start % per_micro or start >= batch.global_size:
        choices = ", ".join(str(per_micro * n) for n in range(1, min(batch.accumulation, 5)))
        more = ", ..." if batch.accumulation > 5 else ""
        raise UserError(
            f"--batch-size-start {start}: not a multiple of {per_micro} samples (--micro-batch-size {batch.micro} x "
            f"{batch.world_size} data-parallel ranks) below the global batch {batch.global_size}; use one of "
            f"{choices}{more}"
        )
    return BatchWarmup(per_micro, start // per_micro, batch.accumulation, steps)
