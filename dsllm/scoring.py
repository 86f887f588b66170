"""Loss, perplexity and bits per byte of a model over a fixed, deterministic set of windows of a token split:
the training loop's evaluation (every rank a share) and `dsllm evaluate`'s (one process: by default every target of
the split, the tail after the last full window included, `split_totals`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and numpy load inside the functions, so commands' `--help` answers at once
    import torch
    from tokenizers import Tokenizer

    from dsllm.data.loader import TokenWindows


def eval_indices(windows: TokenWindows, count: int) -> list[int]:
    """`count` windows spread evenly over the split (all of them when there are fewer)."""
    import numpy as np

    n = len(windows)
    if count >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def token_byte_lengths(tokenizer: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each id stands for. Byte-level BPE writes one character per byte; special tokens
    (end-of-text) count as 0 bytes, since they are separators, not text."""
    import torch

    lengths = torch.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=torch.float64)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        lengths[index] = 0 if token in special else len(token)
    return lengths


def evaluate(
    model,
    windows: TokenWindows,
    indices: list[int],
    micro_batch: int,
    device,
    byte_lengths: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    counted: bool = True,
) -> dict:
    """Loss, perplexity and bits per byte over the windows (`score_totals`, then `scores`)."""
    totals = score_totals(
        model, windows, indices, micro_batch, device, byte_lengths, rank, world_size, progress, counted
    )
    return scores(*totals)


def score_totals(
    model,
    windows: TokenWindows,
    indices: list[int],
    micro_batch: int,
    device,
    byte_lengths: torch.Tensor,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    counted: bool = True,
) -> list[float]:
    """[summed target-token loss, target tokens, their UTF-8 bytes] over the windows (sharded across the
    data-parallel `rank`s, then all-reduced over every rank): totals, so that several sets of windows (a mixture's
    sources) add up. `model(inputs, targets)` gives (logits, mean loss): the loss when there is one (a
    vocabulary-parallel head's logits are a shard), else the logits are scored; (None, None) on a pipeline stage
    before the last. `counted`: False on the ranks whose totals another rank already holds (tensor-parallel
    ranks past the first). `progress`: a bar on stderr when it is a terminal (the command's; the trainer's
    evaluation stays silent)."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    mine = indices[rank::world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, tokens, bytes
    # every rank runs the same number of forward passes (ZeRO-3 gathers parameters collectively)
    batches = math.ceil(len(indices) / world_size / micro_batch)
    with torch.no_grad():
        for b in tqdm(range(batches), desc="evaluating", unit="batch", disable=None if progress else True):
            chunk = mine[b * micro_batch : (b + 1) * micro_batch]
            rows = torch.stack([windows[i] for i in (chunk or mine[:1] or indices[:1])]).to(device)
            scored = _row_totals(model, rows, byte_lengths)
            if chunk and counted and scored is not None:
                totals += scored
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)  # (a pipeline's stages before the last contribute zeros)
    return totals.tolist()


def _row_totals(model, rows: torch.Tensor, byte_lengths: torch.Tensor) -> torch.Tensor | None:
    """[summed loss, targets, their bytes] of one batch of windows (inputs rows[:, :-1], targets rows[:, 1:]);
    None on a pipeline stage before the last."""
    import torch
    import torch.nn.functional as F

    targets = rows[:, 1:]
    logits, loss = model(rows[:, :-1], targets)
    if logits is None and loss is None:
        return None
    if loss is not None:
        nll = loss.double() * targets.numel()
    else:
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
    return torch.stack(
        [
            nll.double(),
            torch.tensor(targets.numel(), dtype=torch.float64, device=rows.device),
            byte_lengths.to(rows.device)[targets].sum(),
        ]
    )


def split_totals(
    model, windows: TokenWindows, micro_batch: int, device, byte_lengths: torch.Tensor, progress: bool = False
) -> list[float]:
    """`score_totals` over EVERY target of the split, on one process: all the full windows, then the tokens after
    the last one (`TokenWindows.tail`, shorter than a window) as a batch of their own, so nothing is padded and
    nothing is left out: num_tokens - 1 targets in all. What `dsllm evaluate` scores by default and
    benchmarks/quality.py reports."""
    import torch

    totals = score_totals(
        model, windows, list(range(len(windows))), micro_batch, device, byte_lengths, progress=progress
    )
    tail = windows.tail()
    if tail is not None:
        with torch.no_grad():
            scored = _row_totals(model, tail[None].to(device), byte_lengths)
        if scored is not None:
            totals = [a + b for a, b in zip(totals, scored.tolist())]
    return totals


def scores(nll: float, tokens: float, n_bytes: float) -> dict:
    """Loss, perplexity and bits per byte of `score_totals`' totals."""
    loss = nll / tokens
    return {
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "tokens": int(tokens),
    }
