"""Training data: fixed-length token windows from a memory-mapped dataset, and a resumable loader."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dsllm.data.format import TokenFile
from dsllm.data.sampler import WindowOrder, WindowSampler


class TokenWindows(Dataset):
    """Window i is tokens[i*seq_len : i*seq_len + seq_len + 1] (inputs and shifted targets), read from
    the memory map without loading the file; windows do not overlap and the last partial one is dropped.
    `piece` (p, n): only the p-th of n equal pieces of each window is read, with the token after it (sequence
    parallelism: the rank holding piece p of every window)."""

    def __init__(self, data: str | os.PathLike | TokenFile, seq_len: int, piece: tuple[int, int] = (0, 1)):
        self.file = data if isinstance(data, TokenFile) else TokenFile(data)
        if seq_len < 1:
            raise ValueError("seq_len must be positive")
        if seq_len % piece[1] or not 0 <= piece[0] < piece[1]:
            raise ValueError(f"piece {piece[0]} of {piece[1]}: not an equal piece of a {seq_len}-token window")
        self.seq_len = seq_len
        self.piece_length = seq_len // piece[1]
        self.piece_start = piece[0] * self.piece_length

    def __len__(self) -> int:
        return max(0, (self.file.num_tokens - 1) // self.seq_len)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} outside 0..{len(self) - 1}")
        start = index * self.seq_len + self.piece_start
        window = self.file.tokens[start : start + self.piece_length + 1]
        return torch.from_numpy(window.astype(np.int64))

    def order(self, seed: int) -> WindowOrder:
        return WindowOrder(len(self), self.file.fingerprint, self.seq_len, seed)


class ResumableLoader:
    """Micro-batches for one data-parallel rank. `consumed_samples` counts global samples (all ranks)
    handed to the training loop, not what loader workers prefetched, so `state_dict()` taken after a
    step resumes exactly at the next sample."""

    def __init__(
        self,
        windows: TokenWindows,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        self.windows, self.micro_batch_size, self.world_size = windows, micro_batch_size, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.sampler = WindowSampler(windows.order(seed), rank, world_size)

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

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
