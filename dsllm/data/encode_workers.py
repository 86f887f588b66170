"""The data stage's worker processes: the corpus in batches of documents, each cleaned and tokenized (and, with
near-dedup, signed) in a process of its own (`_process` keeps at most 2 x workers batches in flight and yields
results in order), and what to say when the pool breaks (which worker died, and why it likely did)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from dsllm.data.cleaning import CleaningConfig, clean, document_hash, drop_reason
from dsllm.data.near_dedup import Signer
from dsllm.data.shards import OTHER_SHARD, shard_of
from dsllm.data.sources import CorpusReader
from dsllm.errors import UserError
from dsllm.tokenizer import encode_as_text, eot_id

BATCH_DOCUMENTS = 512  # a batch ends at this many documents or characters, whichever comes first
BATCH_CHARACTERS = 1 << 20
_worker: dict = {}  # what each worker process keeps between batches (its tokenizer, cleaning settings)

# BLAS/OpenMP thread pools are of no use to a worker (numpy does no linear algebra here) and numpy's OpenBLAS
# starts one when numpy is imported: measured ~10% slower tokenization at 2 workers on 2 cores.
SINGLE_THREAD_ENV = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@contextlib.contextmanager
def _single_threaded_blas_for_children() -> Iterator[None]:
    """SINGLE_THREAD_ENV in os.environ while the pool lives, for the worker processes it spawns (on the first
    submits). A pool initializer would be too late: a spawned worker imports numpy, through this module, when
    it unpickles the initializer. Values already set are kept, and what was added is removed afterwards, so
    the caller's later subprocesses see the environment they would have seen."""
    added = {name: value for name, value in SINGLE_THREAD_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name, value in added.items():
            if os.environ.get(name) == value:
                del os.environ[name]


def _init_worker(
    tokenizer_json: str, cleaning: CleaningConfig, threads: int = 1, shard: tuple[int, int] | None = None
) -> None:
    # Each worker process tokenizes on one thread; parallelism comes from the processes.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if threads == 1 else "true"
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    signer = Signer(cleaning.near_dedup) if cleaning.near_dedup is not None else None
    _worker.update(tokenizer=tokenizer, eot=eot_id(tokenizer), cleaning=cleaning, signer=signer, shard=shard)


@dataclasses.dataclass
class _BatchResult:
    reasons: list[str | None]  # per input document: why it was dropped (or OTHER_SHARD), or None when kept
    hashes: list[bytes]  # per kept document
    lengths: np.ndarray  # per kept document, tokens including the final end-of-text
    tokens: np.ndarray  # kept documents' tokens, concatenated
    near_keys: np.ndarray | None = None  # per kept document, its near-dedup band keys (with --near-dedup)


def _clean_and_tokenize(texts: list[str]) -> _BatchResult:
    cleaning, tokenizer, eot, shard = _worker["cleaning"], _worker["tokenizer"], _worker["eot"], _worker["shard"]
    reasons, kept, hashes = [], [], []
    for text in texts:
        cleaned = clean(text, cleaning)
        digest = document_hash(cleaned)
        # another shard's document is skipped before its checks and tokenization, the costly part
        reason = OTHER_SHARD if shard is not None and shard_of(digest, shard[1]) != shard[0] else None
        reason = reason or drop_reason(cleaned, cleaning)
        reasons.append(reason)
        if reason is None:
            kept.append(cleaned)
            hashes.append(digest)
    ids = encode_as_text(tokenizer, kept)  # "<|endoftext|>" written in a document is text, not a separator
    lengths = np.fromiter((len(doc) + 1 for doc in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=np.uint32)
    ends = np.cumsum(lengths)
    tokens[ends - 1] = eot
    for doc, end in zip(ids, ends):
        tokens[end - 1 - len(doc) : end - 1] = doc
    near_keys = _worker["signer"].band_keys(kept) if _worker["signer"] is not None else None
    return _BatchResult(reasons, hashes, lengths, tokens, near_keys)


@dataclasses.dataclass
class _Batch:
    texts: list[str]
    first: int  # 1-based numbers of its first and last document among all inputs
    last: int
    files: tuple[str, str]  # the input files of its first and last document


def _batches(reader: CorpusReader) -> Iterator[_Batch]:
    def current_file() -> str:  # the file of the document just read
        return str(reader.files[reader.stats.files - 1][0])

    batch, chars, first, first_file = [], 0, 0, ""
    for text in reader:
        if not batch:
            first, first_file = reader.stats.documents, current_file()
        batch.append(text)
        chars += len(text)
        if len(batch) >= BATCH_DOCUMENTS or chars >= BATCH_CHARACTERS:
            yield _Batch(batch, first, reader.stats.documents, (first_file, current_file()))
            batch, chars = [], 0
    if batch:
        yield _Batch(batch, first, reader.stats.documents, (first_file, current_file()))


def _killed_worker_error(processes: dict, in_flight: list[_Batch], workers: int) -> UserError:
    """One line for a worker that died (the OOM killer's SIGKILL, most often): which process, which documents were
    being tokenized, and the fix. The pool then stops the other workers (SIGTERM), so the first death is the one
    that is not SIGTERM. `processes`: the pool's workers as seen while it ran (a broken pool forgets them)."""
    ended = [
        (pid, process.exitcode)
        for pid, process in processes.items()
        if process.exitcode not in (None, 0, -signal.SIGTERM)
    ]  # SIGTERM: the pool stopping the others
    if ended and ended[0][1] < 0:
        who = f"worker process {ended[0][0]} was killed by {signal.Signals(-ended[0][1]).name}"
    elif ended:
        who = f"worker process {ended[0][0]} exited with code {ended[0][1]}"
    else:
        who = "a worker process died"
    files = (
        in_flight[0].files[0]
        if in_flight[0].files[0] == in_flight[-1].files[1]
        else (f"{in_flight[0].files[0]} to {in_flight[-1].files[1]}")
    )
    return UserError(
        f"prepare: {who} while tokenizing documents {in_flight[0].first:,}-{in_flight[-1].last:,} "
        f"({files}), most likely out of memory; --output was left as it was: run again with fewer "
        f"--workers (this run had {workers}) or with more memory"
    )


def _process(
    batches: Iterator[_Batch],
    workers: int,
    tokenizer_json: str,
    cleaning: CleaningConfig,
    shard: tuple[int, int] | None = None,
) -> Iterator[tuple[int, _BatchResult]]:
    """Results in input order, with at most 2 x workers batches in flight (bounded memory). `shard` (index, count):
    only that shard's documents are kept (`dsllm.data.shards.shard_of`)."""
    if workers == 1:
        _init_worker(tokenizer_json, cleaning, shard=shard)
        for batch in batches:
            yield len(batch.texts), _clean_and_tokenize(batch.texts)
        return
    context = multiprocessing.get_context("spawn")  # no forked copies of the reader's state or threads
    with (
        _single_threaded_blas_for_children(),
        ProcessPoolExecutor(
            workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer_json, cleaning, 1, shard)
        ) as pool,
    ):
        pending: collections.deque = collections.deque()
        processes: dict = {}

        def oldest_result() -> tuple[int, _BatchResult]:
            try:
                result = pending[0][1].result()
            except BrokenProcessPool:
                raise _killed_worker_error(processes, [batch for batch, _ in pending], workers) from None
            return len(pending.popleft()[0].texts), result

        for batch in batches:
            try:
                pending.append((batch, pool.submit(_clean_and_tokenize, batch.texts)))
            except BrokenProcessPool:
                raise _killed_worker_error(processes, [b for b, _ in pending] + [batch], workers) from None
            processes.update(getattr(pool, "_processes", None) or {})  # private, so a missing one only costs the pid
            if len(pending) >= 2 * workers:
                yield oldest_result()
        while pending:
            yield oldest_result()


# -- main side: dedup, split, write ------------------------------------------------------------------
