"""Documents inside a sequence: block-diagonal causal masks, so attention never crosses from one document (or packed
fine-tuning example) into another, and positions that restart with each."""

from __future__ import annotations

from collections.abc import Callable

import torch


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention mask [B, 1, T, T] of sequences cut into segments ([B, T] segment ids, -1 for
    padding): a position sees the earlier positions of its own segment only; a padding position sees itself (no
    empty softmax row). Fine-tuning's packed examples and pretraining's documents (`document_layout`)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal & (segments[:, None, :] >= 0)
    return (mask | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]


def document_layout(idx: torch.Tensor, eot: int) -> dict[str, torch.Tensor]:
    """`positions` and `mask` for GPT.forward that keep attention inside each document of packed windows [B, T]:
    a document starts at its <|endoftext|> token (`eot`), positions restart there (RoPE, learned positions), and
    the mask is block-diagonal causal. The tokens before a window's first <|endoftext|> are one document too."""
    T = idx.shape[1]
    starts = idx == eot
    steps = torch.arange(T, device=idx.device).expand_as(idx)
    first = torch.where(starts, steps, torch.zeros_like(steps)).cummax(dim=1).values  # its document's first token
    return {"positions": steps - first, "mask": segment_mask(starts.long().cumsum(dim=1))}


def document_scored(score: Callable, eot: int) -> Callable:
    """`score(inputs, targets, **forward)` (a model, or `Engine.score`) as `(inputs, targets)` with attention inside
    each document (`document_layout`): how a --document-mask run's windows are scored, in its validation and by
    `dsllm evaluate`."""
    return lambda inputs, targets: score(inputs, targets, **document_layout(inputs, eot))
