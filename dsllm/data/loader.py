"""Training data: fixed-length token windows from a memory-mapped dataset (or from each source of a weighted
mixture), and a resumable loader."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from fractions import Fraction

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dsllm.data.format import TokenFile
from dsllm.data.mixture import MixtureOrder
from dsllm.data.sampler import WindowOrder, WindowSampler
from dsllm.data.shards import ShardedTokenFile


class TokenWindows(Dataset):
    """Window i is tokens[i*seq_len : i*seq_len + seq_len + 1] (inputs and shifted targets), read from
    the memory map without loading the file; windows do not overlap and the last partial one is dropped.
    `piece` (p, n): only the p-th of n equal pieces of each window is read, with the token after it (sequence
    parallelism: the rank holding piece p of every window). `data`: a split's prefix, its TokenFile, or a sharded
    dataset's split (dsllm.data.shards.ShardedTokenFile, read through the same `tokens[a:b]`)."""

    def __init__(
        self, data: str | os.PathLike | TokenFile | ShardedTokenFile, seq_len: int, piece: tuple[int, int] = (0, 1)
    ):
        self.file = TokenFile(data) if isinstance(data, (str, os.PathLike)) else data
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        if seq_len % piece[1] or not 0 <= piece[0] < piece[1]:
            raise ValueError(f"piece {piece[0]} of {piece[1]}: not an equal piece of a {seq_len}-token window")
        self.seq_len = seq_len
        self.piece_length = seq_len // piece[1]
        self.piece_start = piece[0] * self.piece_length
        self._len = max(0, (self.file.num_tokens - 1) // seq_len)  # (read per sample: kept, the file never changes)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} outside 0..{len(self) - 1}")
        start = index * self.seq_len + self.piece_start
        window = self.file.tokens[start : start + self.piece_length + 1]
        return torch.from_numpy(window.astype(np.int64))

    def order(self, seed: int) -> WindowOrder:
        return WindowOrder(len(self), self.file.fingerprint, self.seq_len, seed)

    def tail(self) -> torch.Tensor | None:
        """The tokens after the last full window (its last token included, as the first input): the targets the
        windows leave out, fewer than seq_len; None when there are none. Scoring only (`dsllm.scoring`): training
        never reads it."""
        start = self._len * self.seq_len
        if self.file.num_tokens - start < 2:
            return None
        return torch.from_numpy(self.file.tokens[start : self.file.num_tokens].astype(np.int64))


class MixtureWindows(Dataset):
    """The windows of a mixture's sources as one dataset: index = the source's offset (the windows of the sources
    before it) + its window; `order(seed)` is the mixture's sample order over these indices."""

    def __init__(self, sources: dict[str, TokenWindows], phases: list[tuple[int, dict[str, Fraction]]]):
        self.sources, self.phases = sources, phases
        self.parts = list(sources.values())
        self.offsets = [sum(len(w) for w in self.parts[:s]) for s in range(len(self.parts))]
        self.seq_len = self.parts[0].seq_len

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.parts[-1])

    def __getitem__(self, index: int) -> torch.Tensor:
        s = bisect_right(self.offsets, index) - 1
        return self.parts[s][index - self.offsets[s]]

    def order(self, seed: int) -> MixtureOrder:
        sources = [(name, len(w), w.file.fingerprint) for name, w in self.sources.items()]
        return MixtureOrder(sources, self.phases, self.seq_len, seed)


class ResumableLoader:
    """Micro-batches for one data-parallel rank. `consumed_samples` counts global samples (all ranks)
    handed to the training loop, not what loader workers prefetched, so `state_dict()` taken after a
    step resumes exactly at the next sample."""

    def __init__(
        self,
        windows: TokenWindows | MixtureWindows,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_epochs_warning: float = float("inf"),
    ):
        self.windows, self.micro_batch_size, self.world_size = windows, micro_batch_size, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = WindowSampler(windows.order(seed), rank, world_size)
        self.max_epochs_warning, self._warned = max_epochs_warning, set()

    @property
    def consumed_samples(self) -> int:
        return self.sampler.consumed_samples

    def __iter__(self) -> Iterator[torch.Tensor]:
        loader = DataLoader(
            self.windows,
            batch_size=self.micro_batch_size,
            sampler=self.sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers else None,
        )
        for batch in loader:
            self.sampler.consumed_samples += self.micro_batch_size * self.world_size
            yield batch

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def report(self) -> tuple[dict, list[str]]:
        """For the step log: a mixture's tokens and epochs per source so far ({"sources": ...}; nothing for one
        dataset), and a warning, once per source, when a source is read more than `max_epochs_warning` times."""
        seen = self.sampler.order.seen(self.consumed_samples)
        if seen is None:
            return {}, []
        warnings = []
        for name, counts in seen.items():
            if counts["epochs"] > self.max_epochs_warning and name not in self._warned:
                self._warned.add(name)
                warnings.append(
                    f"warning: source {name} has been read {counts['epochs']:.2f} times over (more than "
                    f"--max-epochs-warning {self.max_epochs_warning:g}): repeated data; give it a lower weight or more "
                    "data"
                )
        return {"sources": seen}, warnings

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
