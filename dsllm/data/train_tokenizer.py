"""`train-tokenizer`: read a corpus through the shared reader, clean and deduplicate it the way `prepare` does,
and train a byte-level BPE tokenizer on the stream (`dsllm.tokenizer` is the library it calls)."""

from __future__ import annotations

from collections.abc import Iterator
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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DIR/tokenizer.json")
    add_cleaning_arguments(parser)
    return parser


def cleaned_documents(
    reader: CorpusReader, cleaning: CleaningConfig, report: CleaningReport, progress: bool | None = None
) -> Iterator[str]:
    """The reader's documents after cleaning, length filter, exact (and near) dedup, as `prepare` drops them;
    `report` counts what was dropped."""
    from tqdm import tqdm

    dedup = Deduplicator(cleaning.dedup)
    near = NearDeduplicator() if cleaning.near_dedup is not None else None
    signer = Signer(cleaning.near_dedup) if near is not None else None
    for text in tqdm(reader, desc="reading", unit="doc", disable=None if progress is None else not progress):
        report.read += 1
        text = clean(text, cleaning)
        reason = drop_reason(text, cleaning)
        if reason is None and dedup.is_duplicate(document_hash(text)):
            reason = "duplicate"
        if reason is None and near is not None and near.is_duplicate(signer.band_keys([text])[0]):
            reason = NEAR_DUPLICATE
        if reason is not None:
            report.dropped[reason] += 1
            continue
        report.kept += 1
        yield text


def main(argv=None) -> int:
    """`python tokenizer/train_tokenizer.py --input PATH [PATH ...] --vocab-size N --output DIR`."""
    args = build_parser().parse_args(argv)
    target = Path(args.output) / TOKENIZER_FILE
    if target.exists() and not args.overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it or choose another --output")
    cleaning = cleaning_config_from_args(args)
    reader = CorpusReader(args.input, text_key=args.text_key, split_lines=args.split_lines)
    skipped = skipped_summary(reader.stats.skipped_files)
    if skipped:
        print(skipped, flush=True)
    report = CleaningReport.for_config(cleaning)
    texts = cleaned_documents(reader, cleaning, report)
    tokenizer = train_tokenizer(texts, args.vocab_size, args.min_frequency, require_full_vocab=False)
    report.check_not_empty(args.input)
    check_full_vocab(tokenizer, args.vocab_size, args.min_frequency)
    path = save_tokenizer(tokenizer, args.output)
    files = "file" if reader.stats.files == 1 else "files"
    print(
        f"read {report.read:,} documents from {reader.stats.files:,} {files} ({reader.stats.bytes_in:,} bytes; "
        f"dropped {report.dropped_summary()}); trained {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens "
        f"-> {path} (hash {tokenizer_hash(tokenizer).hex()[:16]})"
    )
    return 0
