"""Deep check of a prepared dataset: header, sizes, offsets, every token id, content and tokenizer hashes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dsllm.data.format import TokenFile, TokenFileError, content_hash, new_content_hasher
from dsllm.data.prepare import META_FILE
from dsllm.data.shards import MANIFEST_FILE, is_sharded
from dsllm.errors import ArgumentParser, UserError
from dsllm.tokenizer import TOKENIZER_FILE, eot_id, load_tokenizer, tokenizer_hash

_CHUNK_TOKENS = 1 << 24


def _check_offsets(tf: TokenFile, eot: int) -> None:
    offsets = np.asarray(tf.offsets)
    where = tf.idx_path
    if offsets[0] != 0 or offsets[-1] != tf.num_tokens:
        raise TokenFileError(
            f"{where}: offsets run from {offsets[0]} to {offsets[-1]}, expected 0 to {tf.num_tokens}; "
            "the index is damaged, re-create the dataset"
        )
    lengths = np.diff(offsets)
    if tf.num_documents and lengths.min() < 1:
        bad = int(np.argmax(lengths < 1))
        raise TokenFileError(
            f"{where}: document {bad} has length {lengths[bad]}; the index is damaged, re-create the dataset"
        )
    if tf.num_documents:
        last_tokens = np.asarray(tf.tokens[offsets[1:] - 1])
        if (last_tokens != eot).any():
            bad = int(np.argmax(last_tokens != eot))
            raise TokenFileError(
                f"{tf.bin_path}: document {bad} does not end with the end-of-text id {eot}; "
                ".bin and .idx do not belong together, re-create the dataset"
            )


def _check_tokens(tf: TokenFile) -> None:
    """Every id below the vocabulary size, and the bytes hash to the header's content hash."""
    tokens, token_hasher = tf.tokens, new_content_hasher()
    for start in range(0, tf.num_tokens, _CHUNK_TOKENS):
        chunk = np.asarray(tokens[start : start + _CHUNK_TOKENS])
        if chunk.max() >= tf.vocab_size:
            pos = start + int(np.argmax(chunk >= tf.vocab_size))
            raise TokenFileError(
                f"{tf.bin_path}: token id {tokens[pos]} at position {pos} is >= the vocabulary size "
                f"{tf.vocab_size}; the file is damaged or was made with another tokenizer, "
                "re-create the dataset"
            )
        token_hasher.update(chunk.tobytes())
    offset_hasher = new_content_hasher()
    offset_hasher.update(np.asarray(tf.offsets).tobytes())
    if content_hash(token_hasher, offset_hasher) != tf.header.content_hash:
        raise TokenFileError(
            f"{tf.bin_path}: contents do not match the content hash in {tf.idx_path.name} "
            "(changed or damaged after it was written); re-create the dataset"
        )


def validate_dataset(directory: str | Path) -> dict:
    """Check a dataset folder written by `prepare`; returns a summary per split or raises UserError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such dataset folder; create it with data_pipeline/prepare.py")
    if is_sharded(directory):  # its shards are the datasets written by prepare; the merge checked how they fit
        raise UserError(
            f"{directory}: a sharded dataset ({MANIFEST_FILE}); validate each of its shard folders "
            f"(data_pipeline/validate.py {directory}/shard-I-of-K)"
        )
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise UserError(
            f"{meta_path}: missing, so the dataset is incomplete (an interrupted prepare?); "
            "re-run data_pipeline/prepare.py"
        )
    try:
        meta = json.loads(meta_path.read_text())
        splits = meta["splits"]
    except (ValueError, KeyError) as err:
        raise UserError(
            f"{meta_path}: not a dsllm dataset description ({err}); re-run data_pipeline/prepare.py"
        ) from None
    tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
    tok_hash, vocab_size, eot = (
        tokenizer_hash(tokenizer),
        tokenizer.get_vocab_size(with_added_tokens=True),
        eot_id(tokenizer),
    )
    summary = {"directory": str(directory), "tokenizer_hash": tok_hash.hex(), "vocab_size": vocab_size, "splits": {}}
    for name, expected in splits.items():
        tf = TokenFile(directory / name)
        if tf.header.tokenizer_hash != tok_hash:
            raise TokenFileError(
                f"{tf.idx_path}: made with a different tokenizer than {directory / TOKENIZER_FILE} "
                "(hash mismatch); put the matching tokenizer.json back or re-create the dataset"
            )
        if tf.vocab_size != vocab_size:
            raise TokenFileError(
                f"{tf.idx_path}: header vocabulary size {tf.vocab_size} differs from the tokenizer's "
                f"{vocab_size}; re-create the dataset"
            )
        if tf.fingerprint != expected.get("fingerprint"):
            raise TokenFileError(
                f"{tf.idx_path}: does not match {META_FILE} (fingerprint {tf.fingerprint}, "
                f"expected {expected.get('fingerprint')}); files from different runs, re-create the dataset"
            )
        _check_offsets(tf, eot)
        _check_tokens(tf)
        summary["splits"][name] = {
            "documents": tf.num_documents,
            "tokens": tf.num_tokens,
            "mean_document_tokens": round(tf.num_tokens / max(tf.num_documents, 1), 1),
            "dtype": tf.header.dtype.name,
            "fingerprint": tf.fingerprint,
        }
    return summary


def format_summary(summary: dict) -> str:
    lines = [
        f"dataset {summary['directory']}: OK (vocab {summary['vocab_size']:,}, "
        f"tokenizer {summary['tokenizer_hash'][:16]})"
    ]
    for name, s in summary["splits"].items():
        lines.append(
            f"  {name:<6} {s['documents']:>10,} documents {s['tokens']:>14,} tokens  "
            f"mean {s['mean_document_tokens']:,.1f} tokens/document  {s['dtype']}  fingerprint {s['fingerprint']}"
        )
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm validate", description="Check a prepared token dataset end to end.")
    parser.add_argument("directory", metavar="DIR", help="dataset folder written by data_pipeline/prepare.py")
    return parser


def main(argv=None) -> int:
    """`python data_pipeline/validate.py DIR`: exit 0 and a summary when sound, exit 2 naming the fault."""
    args = build_parser().parse_args(argv)
    print(format_summary(validate_dataset(args.directory)))
    return 0
