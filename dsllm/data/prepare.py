"""The data stage: read -> clean -> deduplicate -> tokenize in parallel -> write train/val token files.

The main process reads, deduplicates, splits and writes; worker processes clean and tokenize batches.
At most `2 x workers` batches are in flight, so memory stays bounded whatever the corpus size (the
dedup set grows by ~110 bytes per unique document, the near-dedup index by ~660 bytes per kept one). Output is
staged in `OUT/.partial-<pid>/` and moved into place only when complete, `meta.json` last: an interrupted run
leaves no valid dataset.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dsllm import __version__
from dsllm.data.cleaning import (
    NEAR_DUPLICATE,
    CleaningConfig,
    CleaningReport,
    Deduplicator,
    add_cleaning_arguments,
    cleaning_config_from_args,
)
from dsllm.data.encode_workers import _batches, _BatchResult, _process
from dsllm.data.format import FORMAT_VERSION, IndexHeader, TokenFileWriter, paths_for
from dsllm.data.near_dedup import NearDeduplicator
from dsllm.data.near_dedup import describe as describe_near_dedup
from dsllm.data.shards import MANIFEST_FILE, OTHER_SHARD, check_shard_arguments, shard_dir
from dsllm.data.sources import CorpusReader, add_input_arguments, describe_input, local_input_paths, skipped_summary
from dsllm.errors import ArgumentParser, UserError
from dsllm.paths import check_output_apart
from dsllm.tokenizer import (
    TOKENIZER_FILE,
    eot_id,
    load_tokenizer,
    resolve_tokenizer_file,
    tokenizer_hash,
)

SPLITS = ("train", "val")
META_FILE = "meta.json"
DATASET_FILES = (META_FILE, "train.bin", "train.idx", "val.bin", "val.idx", MANIFEST_FILE)  # (a merged one's)


@dataclasses.dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    output: str
    val_fraction: float = 0.01
    seed: int = 1234
    workers: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)
    text_key: str = "text"
    split_lines: bool = False
    cleaning: CleaningConfig = dataclasses.field(default_factory=CleaningConfig)
    overwrite: bool = False
    progress: bool | None = None  # None: a progress bar only on a terminal
    num_shards: int = 1  # > 1: only shard `shard_index`'s documents, into OUTPUT/shard-I-of-K (dsllm.data.shards)
    shard_index: int | None = None

    @property
    def shard(self) -> tuple[int, int] | None:
        return None if self.shard_index is None else (self.shard_index, self.num_shards)

    def check(self) -> None:
        check_shard_arguments(self.num_shards, self.shard_index)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction {self.val_fraction} is outside [0, 1); use e.g. 0.01 (0 for no val split)")
        if self.workers < 1:
            raise UserError(f"--workers {self.workers}: give 1 or more")


class _SplitWriter:
    """Sends each kept document to train or val by a hash of (seed, document): deterministic, independent
    of order and worker count, and exact duplicates always land in the same split. The latest document
    is held back so that, at the end, a split that would be empty gets it."""

    def __init__(self, stage: Path, vocab_size: int, tok_hash: bytes, val_fraction: float, seed: int):
        self.val_fraction = val_fraction
        self.seed = seed.to_bytes(8, "little", signed=True)
        names = SPLITS if val_fraction > 0 else SPLITS[:1]
        self.writers = {name: TokenFileWriter(stage / name, vocab_size, tok_hash) for name in names}
        self.held: tuple[str, np.ndarray] | None = None

    def _split(self, digest: bytes) -> str:
        if self.val_fraction == 0:
            return "train"
        draw = int.from_bytes(hashlib.blake2b(self.seed + digest, digest_size=8).digest(), "little") / 2**64
        return "val" if draw < self.val_fraction else "train"

    def add(self, digests: list[bytes], lengths: np.ndarray, tokens: np.ndarray) -> None:
        if not digests:
            return
        split_of = np.array([self._split(d) for d in digests])
        if self.held is not None:
            self._write(*self.held)
        last = len(digests) - 1
        self.held = (str(split_of[-1]), tokens[tokens.size - lengths[last] :].copy())
        doc_of_token = np.repeat(np.arange(len(digests)), lengths)
        for name, writer in self.writers.items():
            chosen = split_of == name
            chosen[last] = False
            if chosen.any():
                writer.add_documents(tokens[chosen[doc_of_token]], lengths[chosen])

    def _write(self, name: str, doc_tokens: np.ndarray) -> None:
        self.writers[name].add_documents(doc_tokens, np.array([doc_tokens.size]))

    def close(self) -> dict[str, IndexHeader]:
        if self.held is not None:
            name = self.held[0]
            counts = {n: w.document_count for n, w in self.writers.items()}
            if "val" in counts and counts["val"] == 0 and counts["train"] > 0:
                name = "val"
            elif counts["train"] == 0:
                name = "train"
            self._write(name, self.held[1])
        return {name: writer.close() for name, writer in self.writers.items()}

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _remove_stale_stages(output: Path) -> None:
    """Staging folders of runs that were killed (their process is gone) are removed."""
    for stage in output.glob(".partial-*"):
        try:
            os.kill(int(stage.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(stage, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _existing_dataset(output: Path) -> list[str]:
    return [name for name in DATASET_FILES if (output / name).exists()]


def _commit(stage: Path, output: Path, files: list[str]) -> None:
    """Move finished files into place; the old meta.json goes first and the new one comes last, so
    there is no moment at which a mix of old and new files looks like a complete dataset."""
    (output / META_FILE).unlink(missing_ok=True)
    for name in DATASET_FILES:
        if name != META_FILE and name not in files:
            (output / name).unlink(missing_ok=True)  # e.g. the old val split when the new run has none
    for name in files + [META_FILE]:
        os.replace(stage / name, output / name)


def prepare(config: PrepareConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the data stage; returns the metadata written to `meta.json`. `log` gets the line on the files that
    input folders held but that are not inputs (skipped), before any work starts."""
    config.check()
    started = time.perf_counter()
    root = Path(config.output)
    output = root if config.shard is None else shard_dir(root, *config.shard)
    created_root = not root.exists()
    tokenizer_file = resolve_tokenizer_file(config.tokenizer)
    check_output_apart(
        output,
        "--output",
        [("--input", p) for p in local_input_paths(config.inputs)] + [("--tokenizer", tokenizer_file)],
    )
    existing = _existing_dataset(output) if output.is_dir() else []
    if existing and not config.overwrite:
        raise UserError(
            f"{output}: already holds a dataset ({', '.join(existing)}); pass --overwrite to replace it "
            "or choose another --output"
        )
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another --output")
    reader = CorpusReader(config.inputs, text_key=config.text_key, split_lines=config.split_lines)
    skipped = skipped_summary(reader.stats.skipped_files)
    if skipped and log is not None:
        log(skipped)
    tokenizer = load_tokenizer(tokenizer_file)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    tok_hash = tokenizer_hash(tokenizer)

    created_output = not output.exists()
    if not created_output:
        _remove_stale_stages(output)
    stage = output / f".partial-{os.getpid()}"
    stage.mkdir(parents=True, exist_ok=False)
    splits = None
    try:
        splits = _SplitWriter(stage, vocab_size, tok_hash, config.val_fraction, config.seed)
        report = CleaningReport.for_config(config.cleaning)
        dedup = Deduplicator(config.cleaning.dedup)
        near = NearDeduplicator() if config.cleaning.near_dedup is not None else None
        tokens_out = other_shards = 0
        with tqdm(desc="prepare", unit="doc", disable=None if config.progress is None else not config.progress) as bar:
            documents = _batches(reader)
            for size, result in _process(documents, config.workers, tokenizer.to_str(), config.cleaning, config.shard):
                report.read += size
                for reason in result.reasons:
                    if reason == OTHER_SHARD:
                        other_shards += 1
                    elif reason is not None:
                        report.dropped[reason] += 1
                keep = [not dedup.is_duplicate(d) for d in result.hashes]
                report.dropped["duplicate"] += keep.count(False)
                if near is not None:  # after exact dedup, in input order: the same result with any --workers
                    for i, kept in enumerate(keep):
                        if kept and near.is_duplicate(result.near_keys[i]):
                            keep[i] = False
                            report.dropped[NEAR_DUPLICATE] += 1
                if not all(keep):
                    keep_tokens = np.repeat(np.array(keep, dtype=bool), result.lengths)
                    result = _BatchResult(
                        [],
                        [d for d, k in zip(result.hashes, keep) if k],
                        result.lengths[np.array(keep, dtype=bool)],
                        result.tokens[keep_tokens],
                    )
                report.kept += len(result.hashes)
                tokens_out += int(result.lengths.sum())
                splits.add(result.hashes, result.lengths, result.tokens)
                bar.update(size)
                bar.set_postfix_str(
                    f"{reader.stats.bytes_in / 1e6 / max(bar.format_dict['elapsed'], 1e-9):.1f} MB/s", refresh=False
                )
        if config.shard is not None and report.read > 0 and report.read == other_shards:
            raise UserError(
                f"shard {config.shard_index} of {config.num_shards} got none of the {report.read} documents read; "
                "use fewer --num-shards for this corpus"
            )
        report.check_not_empty(config.inputs)
        headers = splits.close()
        if "val" in headers and headers["val"].document_count == 0:
            raise UserError(
                f"only {report.kept} document is left after cleaning, too few for a validation split; "
                "pass --val-fraction 0, add documents, or use --split-lines for a one-document text file"
            )
        shutil.copyfile(tokenizer_file, stage / TOKENIZER_FILE)
        seconds = time.perf_counter() - started
        meta = _metadata(config, reader, report, headers, vocab_size, tok_hash, eot_id(tokenizer), tokens_out, seconds)
        if config.shard is not None:  # the merge checks these (dsllm.data.shards.merge_shards)
            meta["shard"] = {"index": config.shard_index, "count": config.num_shards}
            meta["report"]["documents_of_other_shards"] = other_shards
        (stage / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        files = [p.name for name in headers for p in paths_for(stage / name)] + [TOKENIZER_FILE]
        _commit(stage, output, files)
        return meta
    except BaseException:
        if splits is not None:
            splits.abort()
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in (output, root) if created_root else (output,) if created_output else ():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def _metadata(config, reader, report, headers, vocab_size, tok_hash, eot, tokens_out, seconds) -> dict:
    stats = reader.stats
    return {
        "format_version": FORMAT_VERSION,
        "dsllm_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [describe_input(p) for p in config.inputs],
        "files_read": stats.files,
        "files_skipped": stats.skipped_files,
        "text_key": config.text_key,
        "split_lines": config.split_lines,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "workers": config.workers,
        "cleaning": config.cleaning.describe(),
        "near_dedup": describe_near_dedup(config.cleaning.near_dedup),
        "tokenizer": {"file": TOKENIZER_FILE, "hash": tok_hash.hex(), "vocab_size": vocab_size, "eot_id": eot},
        "splits": {
            name: {
                "documents": h.document_count,
                "tokens": h.token_count,
                "dtype": h.dtype.name,
                "fingerprint": h.fingerprint,
            }
            for name, h in headers.items()
        },
        "report": {
            **report.as_dict(),
            "bytes_in": stats.bytes_in,
            "replaced_bytes": stats.replaced_bytes,
            "documents_with_replacements": stats.documents_with_replacements,
            "tokens_out": tokens_out,
            "seconds": round(seconds, 3),
            "mb_per_second": round(stats.bytes_in / 1e6 / seconds, 3),
            "tokens_per_second": round(tokens_out / seconds, 1),
        },
    }


def format_report(meta: dict) -> str:
    """The end-of-run report a person reads."""
    r = meta["report"]
    dropped = ", ".join(f"{reason.replace('_', ' ')} {n:,}" for reason, n in r["dropped"].items())
    lines = [
        f"documents  read {r['documents_read']:,} | dropped: {dropped} | kept {r['documents_kept']:,}",
        f"bytes in   {r['bytes_in']:,} ({r['replaced_bytes']:,} invalid UTF-8 bytes replaced in "
        f"{r['documents_with_replacements']:,} documents)",
        f"tokens out {r['tokens_out']:,} (vocab {meta['tokenizer']['vocab_size']:,})",
    ]
    near = meta.get("near_dedup")
    if near is not None:
        lines.append(
            f"near-dedup {r['dropped'][NEAR_DUPLICATE]:,} near duplicates removed (Jaccard {near['threshold']} over "
            f"word {near['shingle_words']}-grams, {near['num_perm']} permutations in {near['bands']} bands of "
            f"{near['rows']})"
        )
    for name, split in meta["splits"].items():
        lines.append(f"{name:<10} {split['documents']:,} documents, {split['tokens']:,} tokens ({split['dtype']})")
    lines.append(
        f"speed      {r['mb_per_second']:.2f} MB/s, {r['tokens_per_second']:,.0f} tokens/s "
        f"in {r['seconds']:.1f} s with {meta['workers']} workers"
    )
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm prepare", description="Clean and tokenize a corpus into train/val token files.")
    add_input_arguments(parser)
    parser.add_argument(
        "--tokenizer", required=True, metavar="DIR_OR_FILE", help="tokenizer.json, or the folder that holds it"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="dataset folder to write")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=PrepareConfig.val_fraction,
        metavar="F",
        help="share of documents for the validation split, in [0, 1); 0 writes no val split",
    )
    parser.add_argument(
        "--seed", type=int, default=PrepareConfig.seed, help="seed of the train/val split (same seed, same split)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes that clean and tokenize (default: one per core)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    parser.add_argument(
        "--num-shards",
        type=int,
        default=1,
        metavar="K",
        help="prepare one of K shards (K machines in parallel; then data_pipeline/merge_shards.py --output DIR)",
    )
    parser.add_argument(
        "--shard-index",
        type=int,
        default=None,
        metavar="I",
        help="the shard this process prepares, 0..K-1: the documents whose hash falls to it, into DIR/shard-I-of-K",
    )
    add_cleaning_arguments(parser)
    return parser


def main(argv=None) -> int:
    """`python data_pipeline/prepare.py --input PATH [PATH ...] --tokenizer DIR_OR_FILE --output DIR`."""
    args = build_parser().parse_args(argv)
    meta = prepare(
        PrepareConfig(
            inputs=args.input,
            tokenizer=args.tokenizer,
            output=args.output,
            val_fraction=args.val_fraction,
            seed=args.seed,
            workers=args.workers if args.workers is not None else os.cpu_count() or 1,
            text_key=args.text_key,
            split_lines=args.split_lines,
            cleaning=cleaning_config_from_args(args),
            overwrite=args.overwrite,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
        ),
        log=lambda line: print(line, flush=True),
    )
    print(format_report(meta))
    print(
        f"wrote {shard_dir(args.output, args.shard_index, args.num_shards) if 'shard' in meta else args.output}: "
        + ", ".join(f"{name}.bin/.idx" for name in meta["splits"])
        + ", tokenizer.json, meta.json"
    )
    return 0
