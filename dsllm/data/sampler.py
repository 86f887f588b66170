"""Sample order as a pure function of (seed, dataset fingerprint, seq_len, global sample index).

Global sample i is window `permutation_e(i mod N)` of epoch e = i // N, where the permutation is a
keyed Feistel network over [0, N) (cycle-walking): O(1) memory, no shuffle array, and the same for
any world size or loader worker count. Rank r of W takes global samples r, r+W, r+2W, ... from the
consumed-samples position, so every optimizer step sees the same global batch whatever W is.

The rounds run in numpy on a rank's next `CHUNK` samples at once: a few array operations per chunk
instead of Python arithmetic per sample (and per cycle-walking pass, up to 4 for some N).
`WindowSampler` takes any order with `windows(indices)`, `state()` and `check(state, consumed)`: one
dataset's `WindowOrder` here, a weighted mixture's `dsllm.data.mixture.MixtureOrder`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np

from dsllm.errors import UserError

_ROUNDS = 4
_MIX = np.uint64(0x9E3779B97F4A7C15)
CHUNK = 1024  # samples a rank's order computes at once


class DataFingerprintError(UserError):
    """A resumed run's dataset or sequence length is not the one its checkpoint was trained on."""


def _round_keys(seed: int, fingerprint: str, seq_len: int, epoch: int) -> list[int]:
    digest = hashlib.blake2b(f"{seed}|{fingerprint}|{seq_len}|{epoch}".encode(), digest_size=8 * _ROUNDS).digest()
    return [int.from_bytes(digest[8 * r : 8 * r + 8], "little") for r in range(_ROUNDS)]


class WindowOrder:
    """The global sample index -> window index mapping for one dataset and sequence length."""

    def __init__(self, num_windows: int, fingerprint: str, seq_len: int, seed: int):
        if num_windows < 1:
            raise UserError(
                f"dataset {fingerprint[:12]} has no full window of {seq_len + 1} tokens; "
                "use a shorter --seq-len or more data"
            )
        self.num_windows, self.fingerprint, self.seq_len, self.seed = num_windows, fingerprint, seq_len, seed
        self._half_bits = max(1, ((num_windows - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half_bits) - 1)
        self._keys: dict[int, np.ndarray] = {}  # epoch -> its round keys (uint64[_ROUNDS])

    def _epoch_keys(self, epochs: np.ndarray) -> np.ndarray:
        """[len(epochs), _ROUNDS] round keys, each epoch's derived once (a chunk spans one or two)."""
        unique, which = np.unique(epochs, return_inverse=True)
        if len(self._keys) > 64:
            self._keys.clear()
        for epoch in unique.tolist():
            if epoch not in self._keys:
                self._keys[epoch] = np.array(_round_keys(self.seed, self.fingerprint, self.seq_len, epoch), np.uint64)
        return np.stack([self._keys[epoch] for epoch in unique.tolist()])[which]

    def _feistel(self, x: np.ndarray, keys: np.ndarray) -> np.ndarray:
        bits, mask = np.uint64(self._half_bits), self._mask
        left, right = x >> bits, x & mask
        for r in range(_ROUNDS):  # uint64 products wrap modulo 2**64
            mixed = (right ^ keys[:, r]) * _MIX
            left, right = right, left ^ ((mixed ^ (mixed >> np.uint64(29))) & mask)
        return (left << bits) | right

    def windows(self, global_indices) -> np.ndarray:
        """The window of each global sample index (int64 array in, int64 array out)."""
        epochs, positions = np.divmod(np.asarray(global_indices, dtype=np.int64), self.num_windows)
        keys = self._epoch_keys(epochs)
        x = self._feistel(positions.astype(np.uint64), keys)
        walking = np.flatnonzero(x >= self.num_windows)
        while walking.size:  # cycle-walk back into [0, N): a bijection on [0, N)
            x[walking] = self._feistel(x[walking], keys[walking])
            walking = walking[x[walking] >= self.num_windows]
        return x.astype(np.int64)

    def window(self, global_index: int) -> int:
        return int(self.windows([global_index])[0])

    def state(self) -> dict:
        """What a checkpoint records of the order, so that a resumed run can prove it reads the same."""
        return {
            "fingerprint": self.fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "num_windows": self.num_windows,
        }

    def check(self, state: dict, consumed_samples: int) -> None:
        """Refuse (DataFingerprintError) a checkpoint's `state()` that is not this order's."""
        if "mixture" in state:
            raise DataFingerprintError(
                f"the checkpoint was trained on a mixture of {', '.join(state['mixture']['sources'])}, but --data is "
                f"one dataset ({self.fingerprint}): resuming would silently change the data; pass the original "
                "--data or start a new run"
            )
        if state["fingerprint"] != self.fingerprint:
            raise DataFingerprintError(
                f"the checkpoint was trained on dataset {state['fingerprint']}, but --data is {self.fingerprint}: "
                "resuming would silently change the data; pass the original dataset or start a new run"
            )
        check_seq_len_and_seed(state, self.seq_len, self.seed)

    def seen(self, consumed_samples: int) -> dict | None:
        """Per-source accounting (a mixture's); one dataset has none."""
        return None


def check_seq_len_and_seed(state: dict, seq_len: int, seed: int) -> None:
    if state["seq_len"] != seq_len or state["seed"] != seed:
        raise DataFingerprintError(
            f"the checkpoint used seq_len {state['seq_len']} and data seed {state['seed']}, this run "
            f"{seq_len} and {seed}: the sample order would change; use the checkpoint's values"
        )


class WindowSampler:
    """Endless, resumable, rank-sharded sampler of window indices (a torch `Sampler` by duck typing)."""

    def __init__(self, order: WindowOrder, rank: int = 0, world_size: int = 1, consumed_samples: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.order, self.rank, self.world_size = order, rank, world_size
        self.consumed_samples = consumed_samples

    def __iter__(self) -> Iterator[int]:
        index, stride = self.consumed_samples + self.rank, self.world_size
        while True:
            yield from self.order.windows(np.arange(index, index + CHUNK * stride, stride)).tolist()
            index += CHUNK * stride

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, **self.order.state()}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state["consumed_samples"])
        self.order.check(state, consumed)
        self.consumed_samples = consumed
