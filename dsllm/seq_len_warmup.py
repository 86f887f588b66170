"""Sequence-length warmup (`--seq-len-warmup`): the first optimizer steps train on shorter windows, growing to
`--seq-len`.

The loader keeps giving full windows of seq_len + 1 tokens, so the data order, `consumed_samples` and the tokens per
step are those of a run without warmup: nothing is skipped, tokens/s stays comparable, and a resume is exact by
construction. During the warmup each micro batch is cut into shorter windows (`cut_windows`), every target token still
trained on, each piece attending only inside itself. The length is a pure function of the optimizer step, read from
DeepSpeed's engine: its `global_steps` counts optimizer steps (not micro batches) and comes back with a checkpoint.
Validation keeps scoring full windows.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dsllm.errors import UserError

if TYPE_CHECKING:  # (no torch here: `dsllm pretrain --help` and pre-flight stay fast)
    import torch

    from dsllm.engine import LossOf

DEFAULT_HALVINGS = 3  # the default start: --seq-len / 8
SHORTEST_DEFAULT = 8  # ... but no shorter than this many tokens


@dataclasses.dataclass(frozen=True)
class SeqLenWarmup:
    """The schedule: windows of `start` tokens at step 0, `seq_len` from step `steps` on."""

    seq_len: int
    start: int
    steps: int

    def length(self, step: int) -> int:
        """The window length of optimizer step `step` (0-based, the step being trained): the linear ramp from `start`
        to `seq_len` over `steps`, rounded down to start, 2 x start, ..., seq_len, so every length cuts a window into
        whole pieces and few shapes are ever compiled."""
        if step >= self.steps:
            return self.seq_len
        length = self.start
        # 2 x length <= start + (seq_len - start) * step / steps, in integers
        while 2 * length * self.steps <= self.start * self.steps + (self.seq_len - self.start) * step:
            length *= 2
        return length

    def loss(self, loss_of: LossOf) -> LossOf:
        """`loss_of` on the micro batch cut to this step's windows; `module` is DeepSpeed's engine."""

        def loss(module, batch: torch.Tensor, device: torch.device) -> torch.Tensor:
            length = self.length(module.global_steps)
            if length < self.seq_len:  # cut on the device: the pinned batch's copy stays non-blocking
                batch = cut_windows(batch.to(device, non_blocking=True), length)
            return loss_of(module, batch, device)

        return loss


def cut_windows(batch: torch.Tensor, length: int) -> torch.Tensor:
    """Windows [B, T + 1] as [B * T / length, length + 1]: consecutive pieces share one token (a piece's last target is
    the next one's first input), so every target of the window is still predicted once."""
    return batch.unfold(1, length + 1, length).reshape(-1, length + 1)


def halves(seq_len: int) -> list[int]:
    """seq_len / 2, seq_len / 4, ... as long as they are whole: the lengths a warmup can start from."""
    lengths = []
    while seq_len % 2 == 0:
        seq_len //= 2
        lengths.append(seq_len)
    return lengths


def seq_len_warmup(steps: int, start: int | None, seq_len: int) -> SeqLenWarmup | None:
    """The warmup of --seq-len-warmup and --seq-len-start for a run of `seq_len` tokens per window (None: off). The
    default start is --seq-len / 8, or the shortest of its halves of at least 8 tokens."""
    if not steps:
        return None
    lengths = halves(seq_len)
    choices = ", ".join(map(str, lengths))
    if not lengths:
        raise UserError(
            f"--seq-len-warmup {steps}: --seq-len {seq_len} is odd, no shorter window divides it; use an even "
            "--seq-len (e.g. a power of two) or drop --seq-len-warmup"
        )
    if start is None:
        fitting = [n for n in lengths[:DEFAULT_HALVINGS] if n >= SHORTEST_DEFAULT]
        if not fitting:
            raise UserError(
                f"--seq-len-warmup {steps}: --seq-len {seq_len} has no half of {SHORTEST_DEFAULT} tokens or more to "
                f"start from; pass --seq-len-start (one of {choices}) or drop --seq-len-warmup"
            )
        start = fitting[-1]
    elif start not in lengths:
        raise UserError(f"--seq-len-start {start}: not --seq-len {seq_len} halved; use one of {choices}")
    return SeqLenWarmup(seq_len, start, steps)
