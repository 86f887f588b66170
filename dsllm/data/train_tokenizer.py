"""`train-tokenizer`: read a corpus through the shared reader, clean and deduplicate it the way `prepare` does,
and train a byte-level BPE tokenizer on the stream (`dsllm.tokenizer` is the library it calls) or, with
`--sample-bytes N`, on a reproducible sample of about N bytes of it (`text_sample`), so that a corpus larger than
memory still trains a 32k/50k vocabulary in memory that does not grow with the corpus."""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsllm.data.cleaning import (
    NEAR_DUPLICATE,
    CleaningConfig,
    CleaningReport,
    Deduplicator,
    add_cleaning_arguments,
    clean,
    cleaning_config_from_args,
    document_hash,
    drop_reason,
)
from dsllm.data.near_dedup import NearDeduplicator, Signer
from dsllm.data.sources import CorpusReader, add_input_arguments, skipped_summary
from dsllm.data.text_sample import TextSample
from dsllm.errors import ArgumentParser, UserError
from dsllm.tokenizer import TOKENIZER_FILE, check_full_vocab, save_tokenizer, tokenizer_hash, train_tokenizer


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm train-tokenizer", description="Train a byte-level BPE tokenizer (streaming).")
    add_input_arguments(parser)
    parser.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        metavar="N",
        help="tokens including the 256 bytes and <|endoftext|> (32000 and 50257 are common)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    parser.add_argument(
        "--min-frequency", type=int, default=2, metavar="N", help="merge only pairs seen at least N times"
    )
    parser.add_argument(
        "--sample-bytes",
        type=int,
        default=None,
        metavar="N",
        help="train on a reproducible sample of about N bytes of cleaned text, drawn uniformly across the inputs "
        "in one pass (memory grows with N, not the corpus); default: the whole corpus",
    )
    parser.add_argument(
        "--seed", type=int, default=1234, help="seed of the --sample-bytes sample (same seed, same sample)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/tokenizer.json")
    add_cleaning_arguments(parser)
    return parser


def _filtered(
    reader: CorpusReader, cleaning: CleaningConfig, report: CleaningReport, progress: bool | None
) -> Iterator[str]:
    """The reader's documents cleaned, the empty and too short ones dropped (and counted in `report`)."""
    from tqdm import tqdm

    for text in tqdm(reader, desc="reading", unit="doc", disable=None if progress is None else not progress):
        report.read += 1
        text = clean(text, cleaning)
        reason = drop_reason(text, cleaning)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        yield text


def _deduplicated(texts: Iterable[str], cleaning: CleaningConfig, report: CleaningReport) -> Iterator[str]:
    """Exact then near duplicates dropped, as `prepare` drops them; `report` counts them and the kept."""
    dedup = Deduplicator(cleaning.dedup)
    near = NearDeduplicator() if cleaning.near_dedup is not None else None
    signer = Signer(cleaning.near_dedup) if near is not None else None
    for text in texts:
        if dedup.is_duplicate(document_hash(text)):
            report.dropped["duplicate"] += 1
            continue
        if near is not None and near.is_duplicate(signer.band_keys([text])[0]):
            report.dropped[NEAR_DUPLICATE] += 1
            continue
        report.kept += 1
        yield text


def cleaned_documents(
    reader: CorpusReader, cleaning: CleaningConfig, report: CleaningReport, progress: bool | None = None
) -> Iterator[str]:
    """The reader's documents after cleaning, length filter, exact (and near) dedup; `report` counts what was
    dropped."""
    return _deduplicated(_filtered(reader, cleaning, report, progress), cleaning, report)


def sampled_documents(
    reader: CorpusReader,
    cleaning: CleaningConfig,
    report: CleaningReport,
    sample: TextSample,
    progress: bool | None = None,
) -> Iterator[str]:
    """The sample's documents after the same cleaning and dedup as `cleaned_documents`, in corpus order. The whole
    corpus is read into `sample` first; dedup then runs over the sample only (a document's copies share its rank,
    so they are in or out of the sample together), which keeps its memory to the sample's."""
    for text in _filtered(reader, cleaning, report, progress):
        sample.offer(text)
    report.dropped["duplicate"] += sample.duplicates
    return _deduplicated(sample.documents(), dataclasses.replace(cleaning, dedup=False), report)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far: VmHWM, the high-water mark of its own memory map, where Linux
    has it. ru_maxrss (the fallback) carries over the parent's peak through exec, so a run started by a large
    process (a notebook, a pipeline driver) would report that process's peak instead of its own."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv=None) -> int:
    """`python tokenizer/train_tokenizer.py --input PATH [PATH ...] --vocab-size N --output DIR`."""
    args = build_parser().parse_args(argv)
    target = Path(args.output) / TOKENIZER_FILE
    if target.exists() and not args.overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it or choose another --output")
    if args.sample_bytes is not None and args.sample_bytes < 1:
        raise UserError(
            f"--sample-bytes {args.sample_bytes}: give a positive number of bytes of text to train on "
            "(e.g. 2000000000 for 2 GB), or leave it out to train on the whole corpus"
        )
    cleaning = cleaning_config_from_args(args)
    reader = CorpusReader(args.input, text_key=args.text_key, split_lines=args.split_lines)
    skipped = skipped_summary(reader.stats.skipped_files)
    if skipped:
        print(skipped, flush=True)
    report = CleaningReport.for_config(cleaning)
    sample = None
    if args.sample_bytes is None:
        texts = cleaned_documents(reader, cleaning, report)
    else:
        sample = TextSample(args.sample_bytes, args.seed, dedup=cleaning.dedup)
        texts = sampled_documents(reader, cleaning, report, sample)
        if not sample.count and sample.too_large:
            raise UserError(
                f"--sample-bytes {args.sample_bytes:,} is smaller than every document left after cleaning, so the "
                "sample would be empty; give a larger --sample-bytes"
            )
    tokenizer = train_tokenizer(texts, args.vocab_size, args.min_frequency, require_full_vocab=False)
    report.check_not_empty(args.input)
    check_full_vocab(tokenizer, args.vocab_size, args.min_frequency)
    path = save_tokenizer(tokenizer, args.output)
    if sample is not None:
        print(
            f"sample: {sample.bytes:,} bytes in {sample.count:,} documents of {sample.offered:,} cleaned ones "
            f"(--sample-bytes {args.sample_bytes:,}, --seed {args.seed}); trained on {report.kept:,}"
        )
    files = "file" if reader.stats.files == 1 else "files"
    print(
        f"read {report.read:,} documents from {reader.stats.files:,} {files} ({reader.stats.bytes_in:,} bytes; "
        f"dropped {report.dropped_summary()}); trained {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens "
        f"-> {path} (hash {tokenizer_hash(tokenizer).hex()[:16]}); peak memory {peak_rss_mib():,.0f} MiB"
    )
    return 0
