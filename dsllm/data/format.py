"""The token dataset format, defined once: `NAME.bin` (token ids) + `NAME.idx` (header + offsets).

`.idx` layout (little-endian):
    magic            8 bytes   b"DSLLMTOK"
    version          uint32    FORMAT_VERSION
    dtype code       uint32    1 = uint16, 2 = uint32 (the dtype of `.bin`)
    vocab size       uint64
    document count   uint64
    token count      uint64
    tokenizer hash   32 bytes  sha256 of the tokenizer's canonical JSON
    content hash     32 bytes  blake2b over the token bytes, then the offsets bytes
    offsets          int64 x (document count + 1): document i is tokens[offsets[i]:offsets[i+1]]
`.bin` is the concatenated token ids, nothing else. Every document ends with the end-of-text id.
The writer (`TokenFileWriter`) and the reader (`TokenFile`) both use only what is defined here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from dsllm.errors import UserError

MAGIC = b"DSLLMTOK"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ32s32s")
HEADER_SIZE = _HEADER.size
OFFSET_DTYPE = np.dtype("<i8")
DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
MAX_VOCAB_SIZE = 2**32
_MAX_ID_CHUNK = 1 << 24  # tokens per numpy max: 32-64 MiB of the memory map at a time


class TokenFileError(UserError):
    """A token dataset file is missing, damaged or does not match its partner."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    if not 0 < vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"vocabulary size {vocab_size} is outside 1..{MAX_VOCAB_SIZE:,}: "
            "the token format stores ids as uint32 at most"
        )
    return DTYPE_CODES[1] if vocab_size <= 2**16 else DTYPE_CODES[2]


def _dtype_code(dtype: np.dtype) -> int:
    return next(code for code, dt in DTYPE_CODES.items() if dt == dtype)


def new_content_hasher() -> hashlib._Hash:
    """One hasher for the token bytes and one for the offset bytes make the content hash (see below)."""
    return hashlib.blake2b(digest_size=32)


def content_hash(token_hasher, offset_hasher) -> bytes:
    return hashlib.blake2b(token_hasher.digest() + offset_hasher.digest(), digest_size=32).digest()


def paths_for(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """`(NAME.bin, NAME.idx)` for a dataset prefix such as `data/train`."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


@dataclasses.dataclass(frozen=True)
class IndexHeader:
    version: int
    dtype: np.dtype
    vocab_size: int
    document_count: int
    token_count: int
    tokenizer_hash: bytes
    content_hash: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            _dtype_code(self.dtype),
            self.vocab_size,
            self.document_count,
            self.token_count,
            self.tokenizer_hash,
            self.content_hash,
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the dataset's exact contents (tokens, documents, tokenizer): 32 hex digits."""
        return hashlib.blake2b(self.pack(), digest_size=16).hexdigest()

    @property
    def idx_size(self) -> int:
        return HEADER_SIZE + OFFSET_DTYPE.itemsize * (self.document_count + 1)

    @property
    def bin_size(self) -> int:
        return self.dtype.itemsize * self.token_count


def read_header(idx_path: str | os.PathLike) -> IndexHeader:
    """Parse and sanity-check the `.idx` header; a damaged or foreign file raises TokenFileError."""
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise TokenFileError(f"{idx_path}: no such index file; run data_pipeline/prepare.py to create the dataset")
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise TokenFileError(
            f"{idx_path}: wrong magic, not a dsllm token index; re-create it with data_pipeline/prepare.py"
        )
    magic, version, code, vocab, docs, tokens, tok_hash, content_hash = _HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise TokenFileError(
            f"{idx_path}: format version {version}, this dsllm reads version {FORMAT_VERSION}; "
            "re-create the dataset with this version's data_pipeline/prepare.py"
        )
    if code not in DTYPE_CODES:
        raise TokenFileError(f"{idx_path}: unknown dtype code {code} in header (file damaged); re-create the dataset")
    return IndexHeader(version, DTYPE_CODES[code], vocab, docs, tokens, tok_hash, content_hash)


def check_sizes(prefix: str | os.PathLike, header: IndexHeader) -> None:
    """The cheap consistency checks: both files exist and have exactly the sizes the header implies."""
    bin_path, idx_path = paths_for(prefix)
    if idx_path.stat().st_size != header.idx_size:
        raise TokenFileError(
            f"{idx_path}: {idx_path.stat().st_size} bytes, but the header's {header.document_count} documents "
            f"need {header.idx_size}; the file is truncated or damaged, re-create the dataset"
        )
    if not bin_path.is_file():
        raise TokenFileError(f"{bin_path}: missing (its index {idx_path.name} exists); re-create the dataset")
    if bin_path.stat().st_size != header.bin_size:
        raise TokenFileError(
            f"{bin_path}: {bin_path.stat().st_size} bytes, but {idx_path.name} says {header.token_count} "
            f"{header.dtype.name} tokens ({header.bin_size} bytes): truncated, or .bin and .idx come from "
            "different datasets; re-create the dataset"
        )


class HeaderFacts:
    """What a split's index header says of it (`header`): a single file's, or a sharded split's combined one."""

    header: IndexHeader

    @property
    def num_tokens(self) -> int:
        return self.header.token_count

    @property
    def num_documents(self) -> int:
        return self.header.document_count

    @property
    def vocab_size(self) -> int:
        return self.header.vocab_size

    @property
    def fingerprint(self) -> str:
        return self.header.fingerprint


class TokenFile(HeaderFacts):
    """Read-only view of one `.bin`/`.idx` pair. The memory maps open on first use and re-open in a
    forked child (a DataLoader worker), so an instance can be handed to loader workers."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = paths_for(self.prefix)
        self.header = read_header(self.idx_path)
        check_sizes(self.prefix, self.header)
        self._maps: tuple[int, np.ndarray, np.ndarray] | None = None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._maps[0] != os.getpid():
            h = self.header
            tokens = np.memmap(self.bin_path, dtype=h.dtype, mode="r") if h.token_count else np.zeros(0, dtype=h.dtype)
            offsets = np.memmap(
                self.idx_path, dtype=OFFSET_DTYPE, mode="r", offset=HEADER_SIZE, shape=(h.document_count + 1,)
            )
            self._maps = (os.getpid(), tokens, offsets)
        return self._maps[1], self._maps[2]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = None  # memory maps are per process
        return state

    @property
    def tokens(self) -> np.ndarray:
        """All token ids as a read-only memory map (no copy)."""
        return self._open()[0]

    @property
    def offsets(self) -> np.ndarray:
        return self._open()[1]

    def document(self, i: int) -> np.ndarray:
        offsets = self.offsets
        return self.tokens[offsets[i] : offsets[i + 1]]

    @property
    def _max_id_cache(self) -> Path:
        return self.prefix.with_name(self.prefix.name + ".max_token_id.json")

    def max_token_id(self) -> int:
        """The largest token id in `.bin` (-1 when empty): one chunked pass over the memory map, remembered
        next to the dataset under its fingerprint (when the folder is writable), so later runs read a number."""
        cache = self._max_id_cache
        try:
            cached = json.loads(cache.read_text())
            if cached.get("fingerprint") == self.fingerprint and isinstance(cached.get("max_token_id"), int):
                return cached["max_token_id"]
        except (OSError, ValueError, AttributeError):
            pass  # no cache, or a stale or damaged one: compute it
        tokens, largest = self.tokens, -1
        for start in range(0, self.num_tokens, _MAX_ID_CHUNK):
            largest = max(largest, int(tokens[start : start + _MAX_ID_CHUNK].max()))
        try:  # written whole under a temporary name, so a reader never sees half a file
            fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=cache.name, suffix=".tmp")
        except OSError:
            return largest  # a read-only dataset folder: no cache, the pass is repeated next time
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"fingerprint": self.fingerprint, "max_token_id": largest}, f)
            os.replace(tmp, cache)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
        return largest


class TokenFileWriter:
    """Streams documents into `prefix.bin` / `prefix.idx` with bounded memory. The caller writes under
    temporary names and moves the files into place only after `close()` (see dsllm.data.prepare)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int, tokenizer_hash: bytes):
        self.bin_path, self.idx_path = paths_for(prefix)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.tokenizer_hash = tokenizer_hash
        self._bin = open(self.bin_path, "wb")
        self._idx = open(self.idx_path, "wb")
        self._idx.write(b"\0" * HEADER_SIZE)  # the real header goes here once the counts are known
        self._token_hash = new_content_hasher()
        self._offset_hash = new_content_hasher()
        self.document_count = 0
        self.token_count = 0
        self._write_offsets(np.zeros(1, dtype=OFFSET_DTYPE))

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.astype(OFFSET_DTYPE, copy=False).tobytes()
        self._idx.write(data)
        self._offset_hash.update(data)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as their concatenated ids and their lengths (each ends with end-of-text)."""
        if len(lengths) == 0:
            return
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._token_hash.update(data)
        ends = self.token_count + np.cumsum(lengths, dtype=np.int64)
        self._write_offsets(ends)
        self.document_count += len(lengths)
        self.token_count = int(ends[-1])

    def close(self) -> IndexHeader:
        header = IndexHeader(
            FORMAT_VERSION,
            self.dtype,
            self.vocab_size,
            self.document_count,
            self.token_count,
            self.tokenizer_hash,
            content_hash(self._token_hash, self._offset_hash),
        )
        self._idx.seek(0)
        self._idx.write(header.pack())
        for f in (self._bin, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return header

    def abort(self) -> None:
        for f in (self._bin, self._idx):
            f.close()
        for p in (self.bin_path, self.idx_path):
            p.unlink(missing_ok=True)
