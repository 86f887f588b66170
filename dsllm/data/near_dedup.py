"""Near-duplicate removal (`--near-dedup`): documents that differ in a few words (boilerplate with a changed date,
mirrored pages, templated text) are dropped the way exact duplicates are, the first one kept.

Each cleaned document becomes the set of its word 5-grams (lower-cased, split on whitespace), summarised by a
128-permutation MinHash (datasketch's, scheme affine32), cut into b bands of r rows for locality-sensitive
hashing, with b and r those datasketch's MinHashLSH picks for the threshold (equal weights on false positives and
negatives: 0.8 gives 9 bands of 13 rows). A document is a near duplicate when one of its bands equals a band of a
kept document; its bands are then not remembered, so the kept set is what a reader sees, in input order.

Signatures are computed where documents are cleaned (the worker processes of `prepare`), the band keys compared
in the one process that writes, in input order: the result does not depend on the number of workers. The index
is a set of 64-bit band keys, b per kept document (~660 bytes for b = 9, measured): MinHashLSH itself keeps a
set per band entry (~3 KB per document), which would cap a 100M-document corpus at a far larger machine.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

NUM_PERM = 128
SHINGLE_WORDS = 5
DEFAULT_THRESHOLD = 0.8
_MINHASH_SEED = 1  # the permutations: fixed, so signatures compare across runs and processes
_SCHEME = "affine32"  # datasketch >= 2: collision-free permutations, 4-byte hash values


@functools.cache
def bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band) for a Jaccard threshold, as datasketch's MinHashLSH optimises them. Near 1 its
    optimum is one band, which MinHashLSH refuses: 2 bands of 64 rows there (only near-identical sets match)."""
    from datasketch import MinHashLSH

    try:
        lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    except ValueError:  # "The number of bands are too small (b < 2)"
        return 2, NUM_PERM // 2
    return lsh.b, lsh.r


def describe(threshold: float | None) -> dict | None:
    """The settings meta.json records (None when near-dedup is off)."""
    if threshold is None:
        return None
    b, r = bands(threshold)
    return {"threshold": threshold, "num_perm": NUM_PERM, "shingle_words": SHINGLE_WORDS, "bands": b, "rows": r}


def shingles(text: str) -> set[bytes]:
    """The word 5-grams of a document, lower-cased; a shorter document is one shingle of all its words."""
    words = text.lower().split()
    return {
        " ".join(words[i : i + SHINGLE_WORDS]).encode("utf-8", "surrogatepass")
        for i in range(max(1, len(words) - SHINGLE_WORDS + 1))
    }


class Signer:
    """Band keys of documents: one per process (it holds the permutations, made once)."""

    def __init__(self, threshold: float):
        from datasketch import MinHash

        self.bands, self.rows = bands(threshold)
        self._permutations = MinHash(num_perm=NUM_PERM, seed=_MINHASH_SEED, scheme=_SCHEME).permutations
        # the band number is hashed in, so equal values in different bands are different keys
        self._prefixes = [band.to_bytes(2, "little") for band in range(self.bands)]

    def band_keys(self, texts: list[str]) -> np.ndarray:
        """(len(texts), bands) uint64: a 64-bit hash of each band of each document's MinHash."""
        from datasketch import MinHash

        keys = np.empty((len(texts), self.bands), dtype=np.uint64)
        for i, text in enumerate(texts):
            minhash = MinHash(num_perm=NUM_PERM, permutations=self._permutations, scheme=_SCHEME)
            minhash.update_batch(shingles(text))
            values = minhash.hashvalues.astype("<u4").tobytes()
            width = 4 * self.rows
            for band, prefix in enumerate(self._prefixes):
                band_bytes = prefix + values[band * width : (band + 1) * width]
                keys[i, band] = int.from_bytes(hashlib.blake2b(band_bytes, digest_size=8).digest(), "little")
        return keys


class NearDeduplicator:
    """The band keys of the kept documents; `is_duplicate` decides in the order documents are offered."""

    def __init__(self):
        self._seen: set[int] = set()

    def is_duplicate(self, keys: np.ndarray) -> bool:
        """True when a band matches a kept document's; otherwise the document is kept and its bands remembered."""
        row = keys.tolist()
        if not self._seen.isdisjoint(row):
            return True
        self._seen.update(row)
        return False
