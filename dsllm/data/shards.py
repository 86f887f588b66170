"""Sharded datasets: one corpus prepared by K processes at once (K machines: launch/prepare_shards.sbatch, a Slurm
array job), each writing its shard, then merged into one dataset that the trainer reads lazily. One module owns
the shard: its assignment, its folder name, the merge's checks, the manifest and the reading.

- Assignment: a document belongs to shard `shard_of(digest, K)`, the hash of its cleaned text (the hash exact dedup
  and the train/val split already use) modulo K. Identical documents hash alike and land in one shard, so dedup
  inside each shard removes every exact duplicate of the corpus; the train/val split is the hash's, as without
  shards. Near-dedup (MinHash) compares the documents of one shard only. Every shard process reads and cleans the
  whole input (the hash is of the cleaned text) and tokenizes only its own documents, the costly part.
- Layout: `OUT/shard-<i>-of-<K>/` is a complete dataset folder (prepare's usual output). `merge_shards(OUT)` checks
  every shard 0..K-1 (complete, one tokenizer, one set of inputs and settings, counts that match the token files)
  and writes `OUT/manifest.json` (each shard's splits: documents, tokens, fingerprint; the totals), then
  `OUT/tokenizer.json` and `OUT/meta.json` last, which make OUT a dataset. A refusal writes nothing.
- Reading: `ShardedTokenFile` is one split of all shards as one token file: shard 0's tokens, then shard 1's, ...
  (each shard in input order, so the documents are those one process writes, in another order). At most
  `MAX_OPEN_SHARDS` shards' memory maps are open at a time (least recently used closed first).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
from bisect import bisect_right
from pathlib import Path

import numpy as np

from dsllm.data.format import (
    FORMAT_VERSION,
    HeaderFacts,
    IndexHeader,
    TokenFile,
    TokenFileError,
    check_sizes,
    paths_for,
    read_header,
)
from dsllm.errors import ArgumentParser, UserError

MANIFEST_FILE = "manifest.json"
MAX_OPEN_SHARDS = 64  # shards with open memory maps per reader (each map holds one file handle)
OTHER_SHARD = "other_shard"  # a worker's "reason" for a document of another shard: not read into this one
SHARD_DIR = re.compile(r"shard-(\d+)-of-(\d+)")
# what every shard of one dataset must share (meta.json keys): the same command but --shard-index
SHARED_SETTINGS = ("tokenizer", "inputs", "text_key", "split_lines", "val_fraction", "seed", "cleaning", "near_dedup")


def shard_of(digest: bytes, num_shards: int) -> int:
    """The shard of a document, from its 8-byte cleaned-text hash: the same on every machine and any worker count."""
    return int.from_bytes(digest, "little") % num_shards


def shard_dir(output: str | os.PathLike, index: int, count: int) -> Path:
    return Path(output) / f"shard-{index}-of-{count}"


def check_shard_arguments(num_shards: int, shard_index: int | None) -> None:
    if num_shards < 1:
        raise UserError(f"--num-shards {num_shards}: give 1 or more")
    if shard_index is None:
        if num_shards > 1:
            raise UserError(
                f"--num-shards {num_shards} needs --shard-index I (0..{num_shards - 1}): the shard this process writes"
            )
        return
    if not 0 <= shard_index < num_shards:
        raise UserError(
            f"--shard-index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards}); shards are "
            "numbered from 0"
        )


def combined_header(headers: list[IndexHeader]) -> IndexHeader:
    """The header of one split of all shards read as one file: the summed counts, and a content hash over the
    shards' headers (each names its shard's exact contents), so the `fingerprint` changes when any shard's does."""
    first = headers[0]
    digest = hashlib.blake2b(b"".join(h.pack() for h in headers), digest_size=32).digest()
    documents = sum(h.document_count for h in headers)
    tokens = sum(h.token_count for h in headers)
    return IndexHeader(first.version, first.dtype, first.vocab_size, documents, tokens, first.tokenizer_hash, digest)


def _read_json(path: Path, fix: str) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not readable JSON ({err}); {fix}") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: not a JSON object; {fix}")
    return content


def read_manifest(folder: Path) -> dict:
    """The manifest of a sharded dataset, refused in one line when it is not one merge_shards.py wrote (a hand-edited
    or truncated file): every shard an object with its folder and each split's fingerprint."""
    path, fix = folder / MANIFEST_FILE, "merge the shards again (data_pipeline/merge_shards.py)"
    manifest = _read_json(path, fix)
    shards, splits = manifest.get("shards"), manifest.get("splits")
    well_formed = isinstance(shards, list) and shards and isinstance(splits, dict)
    for shard in shards if well_formed else ():
        well_formed = (
            isinstance(shard, dict)
            and isinstance(shard.get("dir"), str)
            and isinstance(shard.get("splits"), dict)
            and all(isinstance((shard["splits"].get(name) or {}).get("fingerprint"), str) for name in splits)
        )
        if not well_formed:
            break
    if not well_formed:
        raise UserError(f"{path}: not a manifest of shards (a shard's folder or fingerprints missing); {fix}")
    return manifest


def is_sharded(folder: Path) -> bool:
    return (Path(folder) / MANIFEST_FILE).is_file()


def has_split(folder: Path, split: str) -> bool:
    """Whether a dataset folder, sharded or not, has the split (val is absent after --val-fraction 0)."""
    folder = Path(folder)
    if is_sharded(folder):
        return split in read_manifest(folder).get("splits", {})
    return (folder / f"{split}.idx").exists()


def open_token_file(folder: str | os.PathLike, split: str) -> TokenFile | ShardedTokenFile:
    """A dataset folder's split, sharded (manifest.json) or not: how the trainer, mixtures and evaluate open one."""
    folder = Path(folder)
    return ShardedTokenFile(folder, split) if is_sharded(folder) else TokenFile(folder / split)


class _Tokens:
    """`ShardedTokenFile.tokens`: slices (copies) across shard boundaries, as TokenFile.tokens slices its map."""

    def __init__(self, file: ShardedTokenFile):
        self.file = file
        self.dtype = file.header.dtype

    def __len__(self) -> int:
        return self.file.num_tokens

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise IndexError("sharded tokens are read in contiguous slices only")
            return self.file.read(start, stop)
        index = range(len(self))[key]  # an int, negative allowed; IndexError past the end
        return self.file.read(index, index + 1)[0]


class ShardedTokenFile(HeaderFacts):
    """One split of a sharded dataset (a folder with manifest.json) as one token file, with TokenFile's interface as
    windows, validation and evaluation use it (`tokens[a:b]`, a slice over two shards being their two pieces
    joined; `num_tokens`, `num_documents`, `document(i)`, `header`, `fingerprint`, `vocab_size`, `max_token_id()`).
    Opening reads only headers (each checked against the manifest: a shard replaced after the merge is refused).
    A shard's memory maps open on first use, at most `max_open` shards at a time, so a dataset of thousands of
    shards holds a bounded number of file handles; like TokenFile, a forked or unpickled copy (a DataLoader worker)
    opens its own."""

    def __init__(self, folder: str | os.PathLike, split: str, max_open: int = MAX_OPEN_SHARDS):
        self.folder, self.split, self.max_open = Path(folder), split, max_open
        manifest = read_manifest(self.folder)
        if split not in manifest.get("splits", {}):
            raise TokenFileError(f"{self.folder / MANIFEST_FILE}: no {split} split in this sharded dataset")
        self.prefixes = [self.folder / shard["dir"] / split for shard in manifest["shards"]]
        headers = []
        for prefix, shard in zip(self.prefixes, manifest["shards"]):
            header = read_header(paths_for(prefix)[1])
            check_sizes(prefix, header)
            if header.fingerprint != shard["splits"][split]["fingerprint"]:
                raise TokenFileError(
                    f"{paths_for(prefix)[1]}: contents (fingerprint {header.fingerprint}) are not those "
                    f"{MANIFEST_FILE} recorded ({shard['splits'][split]['fingerprint']}): the shard changed after the "
                    "merge; merge the shards again (data_pipeline/merge_shards.py)"
                )
            headers.append(header)
        self.header = combined_header(headers)
        self.token_starts = np.cumsum([0] + [h.token_count for h in headers]).tolist()
        self.document_starts = np.cumsum([0] + [h.document_count for h in headers]).tolist()
        self.prefix = self.folder / split
        self.bin_path = self.folder / MANIFEST_FILE  # what messages name: the split's one entry point
        self._files: collections.OrderedDict[int, TokenFile] = collections.OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_files"] = collections.OrderedDict()  # memory maps are per process
        return state

    def shard(self, s: int) -> TokenFile:
        """Shard s's token file, opened if need be; the least recently used is closed past `max_open`."""
        if self._pid != os.getpid():  # a forked worker: the parent's maps stay the parent's
            self._files, self._pid = collections.OrderedDict(), os.getpid()
        file = self._files.pop(s, None) or TokenFile(self.prefixes[s])
        self._files[s] = file
        while len(self._files) > self.max_open:
            self._files.popitem(last=False)  # its maps close with it (slices handed out are copies)
        return file

    @property
    def open_shards(self) -> list[int]:
        return list(self._files)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, a copy, joined from the shards they lie in."""
        pieces = []
        s = bisect_right(self.token_starts, start) - 1
        while start < stop:
            end = min(stop, self.token_starts[s + 1])
            if end > start:
                base = self.token_starts[s]
                pieces.append(np.array(self.shard(s).tokens[start - base : end - base]))
            start, s = max(start, end), s + 1
        if not pieces:
            return np.zeros(0, dtype=self.header.dtype)
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    @property
    def tokens(self) -> _Tokens:
        return _Tokens(self)

    def document(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_documents:
            raise IndexError(f"document {i} outside 0..{self.num_documents - 1}")
        s = bisect_right(self.document_starts, i) - 1
        return np.array(self.shard(s).document(i - self.document_starts[s]))

    def max_token_id(self) -> int:
        """The largest id over the shards (each remembered in its own shard folder), one shard open at a time."""
        return max(TokenFile(prefix).max_token_id() for prefix in self.prefixes)


# -- the merge -----------------------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_count(output: Path) -> int:
    found = {(int(m[1]), int(m[2])) for p in output.iterdir() if (m := SHARD_DIR.fullmatch(p.name)) and p.is_dir()}
    if not found:
        raise UserError(
            f"{output}: holds no shard folders (shard-I-of-K); prepare them first with data_pipeline/prepare.py "
            f"--num-shards K --shard-index I --output {output}"
        )
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise UserError(
            f"{output}: holds shards of different --num-shards ({', '.join(map(str, counts))}); remove the "
            "shard-I-of-K folders of the wrong count and merge again"
        )
    return counts[0]


def _check_shard(output: Path, meta: dict, first: dict, index: int, count: int) -> dict[str, IndexHeader]:
    """A shard's headers, checked: prepared by the same command as shard 0, and its token files as its meta says."""
    folder = shard_dir(output, index, count)
    if meta.get("shard") != {"index": index, "count": count}:
        raise UserError(
            f"{folder}: its meta.json says shard {meta.get('shard')}, not {index} of {count}; re-prepare it"
        )
    if meta["tokenizer"]["hash"] != first["tokenizer"]["hash"]:
        raise UserError(
            f"{output}: shard {index} was made with another tokenizer (hash {meta['tokenizer']['hash'][:16]}) than "
            f"shard 0 ({first['tokenizer']['hash'][:16]}); prepare every shard with one --tokenizer"
        )
    for key in SHARED_SETTINGS:
        if meta.get(key) != first.get(key):
            raise UserError(
                f"{output}: shard {index} was prepared with another {key} ({meta.get(key)}) than shard 0 "
                f"({first.get(key)}); prepare every shard with the same command but --shard-index"
            )
    read, read_first = meta["report"]["documents_read"], first["report"]["documents_read"]
    if read != read_first:  # every shard reads the whole input: another count means the input changed meanwhile
        raise UserError(
            f"{output}: shard {index} read {read:,} documents, shard 0 {read_first:,}: the input changed between "
            "them; prepare every shard from the same input"
        )
    if set(meta["splits"]) != set(first["splits"]):
        raise UserError(
            f"{output}: shard {index} has the splits {sorted(meta['splits'])}, shard 0 {sorted(first['splits'])}; "
            "a shard too small for a val split: use fewer --num-shards"
        )
    headers = {}
    for split, recorded in meta["splits"].items():
        header = read_header(paths_for(folder / split)[1])
        check_sizes(folder / split, header)
        found = {"documents": header.document_count, "tokens": header.token_count, "fingerprint": header.fingerprint}
        if any(recorded.get(key) != value for key, value in found.items()):
            raise UserError(
                f"{folder / split}.idx: {found} does not match its meta.json ({recorded}); re-prepare shard {index}"
            )
        headers[split] = header
    return headers


def merge_shards(output: str | os.PathLike) -> dict:
    """Check every shard of OUT and write OUT/manifest.json, tokenizer.json and meta.json (last); returns the
    manifest. Any refusal (a missing or incomplete shard, another tokenizer, other inputs or settings, token files
    that do not match their shard's meta.json) is one line and writes nothing."""
    from dsllm.data.prepare import META_FILE  # prepare imports this module
    from dsllm.tokenizer import TOKENIZER_FILE, load_tokenizer, tokenizer_hash

    output = Path(output)
    if not output.is_dir():
        raise UserError(
            f"{output}: no such folder; prepare its shards first (data_pipeline/prepare.py --num-shards K "
            f"--shard-index I --output {output})"
        )
    if (output / "train.idx").exists() and not is_sharded(output):
        raise UserError(
            f"{output}: holds a dataset prepared in one process (train.idx); prepare the shards into a folder of "
            "their own"
        )
    count = _shard_count(output)
    metas = []
    for index in range(count):
        meta_path = shard_dir(output, index, count) / META_FILE
        if not meta_path.is_file():
            raise UserError(
                f"{output}: shard {index} of {count} ({meta_path.parent.name}) is missing or incomplete (no "
                f"{META_FILE}); run data_pipeline/prepare.py --num-shards {count} --shard-index {index} "
                f"--output {output}, then merge again"
            )
        metas.append(_read_json(meta_path, f"re-prepare shard {index}"))
    headers = [_check_shard(output, meta, metas[0], i, count) for i, meta in enumerate(metas)]
    tokenizer_file = shard_dir(output, 0, count) / TOKENIZER_FILE
    if tokenizer_hash(load_tokenizer(tokenizer_file)).hex() != metas[0]["tokenizer"]["hash"]:
        raise UserError(f"{tokenizer_file}: not the tokenizer its shard was made with; re-prepare shard 0")
    totals = {split: combined_header([h[split] for h in headers]) for split in metas[0]["splits"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_shards": count,
        "tokenizer": metas[0]["tokenizer"],
        "splits": {
            split: {"documents": h.document_count, "tokens": h.token_count, "fingerprint": h.fingerprint}
            for split, h in totals.items()
        },
        "shards": [
            {"dir": shard_dir("", i, count).name, "splits": meta["splits"], "report": meta["report"]}
            for i, meta in enumerate(metas)
        ],
    }
    meta = {key: metas[0][key] for key in ("format_version", "dsllm_version", *SHARED_SETTINGS) if key in metas[0]}
    meta["sharded"] = {"num_shards": count, "manifest": MANIFEST_FILE}
    meta["splits"] = {
        split: {**manifest["splits"][split], "dtype": h.dtype.name} for split, h in totals.items()
    }  # the shape of a plain dataset's meta.json splits
    (output / META_FILE).unlink(missing_ok=True)  # no moment at which old and new files look like one dataset
    shutil.copyfile(tokenizer_file, output / (TOKENIZER_FILE + ".tmp"))
    os.replace(output / (TOKENIZER_FILE + ".tmp"), output / TOKENIZER_FILE)
    _write_atomic(output / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    _write_atomic(output / META_FILE, json.dumps(meta, indent=2) + "\n")
    return manifest


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="dsllm merge-shards",
        description="Check the shards that `prepare --num-shards K --shard-index I --output DIR` wrote into DIR and "
        "write DIR/manifest.json, tokenizer.json and meta.json: DIR is then one dataset.",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="the --output the shards were prepared into")
    return parser


def main(argv=None) -> int:
    """`python data_pipeline/merge_shards.py --output DIR`."""
    args = build_parser().parse_args(argv)
    manifest = merge_shards(args.output)
    for split, counts in manifest["splits"].items():
        print(f"{split:<6} {counts['documents']:,} documents, {counts['tokens']:,} tokens ({counts['fingerprint']})")
    print(f"merged {manifest['num_shards']} shards into {args.output}: {MANIFEST_FILE}, tokenizer.json, meta.json")
    return 0
