"""A reproducible sample of about N bytes of cleaned text (`train-tokenizer --sample-bytes N`), drawn in one pass
over a corpus of any size, in memory that grows with N, not with the corpus.

Each document gets a rank, a keyed hash of its text and the seed; the sample is the documents of smallest rank
whose UTF-8 sizes sum to at most N (a document larger than N on its own is passed over). That set depends on
the documents and the seed only, not on their order, the input formats or how they were split into files, and
it is uniform across documents: each input contributes in proportion to its size, whatever the order of the
inputs. Exact duplicates share a rank, so they are in or out together (and, with dedup on, counted once).

Mixture weights (a weight w per input) would enter through the rank: the Efraimidis-Spirakis key u ** (1 / w)
of a uniform draw u, smallest first, samples an input in proportion to its size times w. The training-time
mixtures are not there yet, so every input has w = 1 here.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterator

from dsllm.data.cleaning import document_hash

_PERSON = b"dsllm-tok-sample"  # keys this draw apart from prepare's train/val split, which also hashes documents


class TextSample:
    """Offer every document once (`offer`); then `documents()` gives the sample in the order it was offered.

    Memory: the sampled text (at most `budget` bytes) plus ~300 bytes per sampled document, kept in a max-heap
    on rank; a document that pushes the total over the budget evicts the largest ranks, and from then on no
    document of rank above the last evicted one can enter (the sample stays the smallest-rank prefix)."""

    def __init__(self, budget: int, seed: int, dedup: bool = True):
        self.budget = budget
        self.key = seed.to_bytes(8, "little", signed=True)
        self.dedup = dedup
        self.bytes = 0  # of the documents in the sample
        self.count = 0  # documents in the sample
        self.offered = 0
        self.duplicates = 0  # offered again while in the sample (dedup on)
        self.too_large = 0  # larger than the whole budget
        self._heap: list[tuple[int, int, int, str]] = []  # (-rank, order, size, text): the largest rank on top
        self._ranks: set[int] = set()
        self._cutoff = 1 << 64  # ranks at or above it are out for good

    def rank(self, text: str) -> int:
        digest = hashlib.blake2b(document_hash(text), key=self.key, person=_PERSON, digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def offer(self, text: str) -> None:
        order, self.offered = self.offered, self.offered + 1
        size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        if size > self.budget:
            self.too_large += 1
            return
        rank = self.rank(text)
        if rank >= self._cutoff:
            return
        if self.dedup and rank in self._ranks:
            self.duplicates += 1
            return
        heapq.heappush(self._heap, (-rank, order, size, text))
        self._ranks.add(rank)
        self.bytes += size
        self.count += 1
        # over budget: the largest ranks go, and with them any copy of theirs (dedup off: copies share a rank)
        while self.bytes > self.budget or -self._heap[0][0] >= self._cutoff:
            negative_rank, _, evicted_size, _ = heapq.heappop(self._heap)
            self._cutoff = -negative_rank
            self._ranks.discard(-negative_rank)
            self.bytes -= evicted_size
            self.count -= 1
            if not self._heap:
                break

    def documents(self) -> Iterator[str]:
        """The sampled documents in the order they were offered, once; the sample's memory is released as they are
        taken (`bytes` and `count` still describe it)."""
        entries = sorted(self._heap, key=lambda entry: entry[1], reverse=True)  # the first offered at the end
        self._heap, self._ranks = [], set()
        while entries:
            yield entries.pop()[3]
