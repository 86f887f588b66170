"""Byte-level BPE tokenizer: training (streaming), loading, and the hash stamped into datasets.

The library only: the command that reads a corpus and trains one is `dsllm/data/train_tokenizer.py`."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dsllm.errors import UserError

EOT_TOKEN = "<|endoftext|>"
# The token that separates documents (one before each), the first of these a tokenizer has: dsllm's own tokenizers
# and GPT-2's and Qwen's <|endoftext|>; an imported Llama 3's <|begin_of_text|>, Llama 1/2's and Mistral's <s> (the
# token those models saw at the start of every document), then end-of-text tokens for the rest.
DOCUMENT_TOKENS = (EOT_TOKEN, "<|begin_of_text|>", "<s>", "<|end_of_text|>", "</s>")
MIN_VOCAB_SIZE = 257  # the 256 byte symbols and <|endoftext|>
# BpeTrainer allocates ~66 bytes per vocabulary entry up front (2**32 asks for 283 GB and aborts the process);
# 2**24 is 64 x the largest vocabularies in use and still fits the token format's uint32 ids.
MAX_VOCAB_SIZE = 2**24
MAX_MIN_FREQUENCY = 2**63 - 1  # the trainer's counts are 64-bit
TOKENIZER_FILE = "tokenizer.json"
# BPE training costs (merges x word length) per word, so one 1 MB run without whitespace (a minified or base64 blob)
# never finishes; pieces longer than any token worth learning (128 bytes) are cut into 128-byte chunks.
MAX_PIECE_BYTES = 128


def new_byte_level_bpe() -> Tokenizer:
    """GPT-2's byte-level pre-tokenizer, then its pieces cut to MAX_PIECE_BYTES. The cut comes after the byte mapping,
    where every character is one byte and none is a newline for `.` to miss; a UTF-8 character cut in two still
    round-trips, because the decoder joins the bytes of all tokens before decoding them."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False),
            pre_tokenizers.Split(Regex(f".{{1,{MAX_PIECE_BYTES}}}"), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = True,
    require_full_vocab: bool = True,
) -> Tokenizer:
    """Train byte-level BPE on a stream of texts. The vocabulary includes the 256 byte symbols and
    `<|endoftext|>` (id 0); a corpus too small to learn `vocab_size` tokens is a UserError."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise UserError(
            f"--vocab-size {vocab_size} is outside {MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE:,}: byte-level BPE "
            f"needs 256 byte symbols plus {EOT_TOKEN}, and the trainer allocates memory for the whole "
            "vocabulary up front (32000 and 50257 are common)"
        )
    if not 1 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise UserError(
            f"--min-frequency {min_frequency} is outside 1..{MAX_MIN_FREQUENCY:,}: it is how often a pair "
            "must occur to be merged (the default is 2)"
        )
    tokenizer = new_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if require_full_vocab:
        check_full_vocab(tokenizer, vocab_size, min_frequency)
    return tokenizer


def check_full_vocab(tokenizer: Tokenizer, vocab_size: int, min_frequency: int) -> None:
    learned = tokenizer.get_vocab_size(with_added_tokens=True)
    if learned < vocab_size:
        raise UserError(
            f"the corpus supports only {learned:,} tokens (at min frequency {min_frequency}), fewer than "
            f"--vocab-size {vocab_size:,}; use --vocab-size {learned} or less, or train on more text"
        )


def encode_as_text(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, a special token written in it (a literal `<|endoftext|>`) encoded as the text it is:
    document boundaries come from the caller, by id, never from user text. prepare and finetune both encode so."""
    matching = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        if len(texts) == 1:  # no thread pool for one text (a later fork would warn about it on stderr)
            return [tokenizer.encode(texts[0], add_special_tokens=False).ids]
        return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        tokenizer.encode_special_tokens = matching


def tokenizer_hash(tokenizer: Tokenizer) -> bytes:
    """sha256 of the tokenizer's canonical JSON: equal for equal tokenizers, whatever the file's layout."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).digest()


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no tokenizer file; train one with tokenizer/train_tokenizer.py or pass its path")
    return file


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load `tokenizer.json` (or a folder holding it); it must have a token to separate documents (`document_token`:
    `<|endoftext|>` in dsllm's own tokenizers)."""
    file = resolve_tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for bad JSON
        raise UserError(
            f"{file}: not a tokenizers JSON file ({str(err).splitlines()[0]}); "
            "train one with tokenizer/train_tokenizer.py"
        ) from None
    if document_token(tokenizer) is None:
        raise UserError(
            f"{file}: the tokenizer has none of {', '.join(DOCUMENT_TOKENS)}, one of which separates documents; "
            "train one with tokenizer/train_tokenizer.py"
        )
    return tokenizer


def document_token(tokenizer: Tokenizer) -> str | None:
    """The token put before every document (`DOCUMENT_TOKENS`' first that the tokenizer has), None if none."""
    return next((token for token in DOCUMENT_TOKENS if tokenizer.token_to_id(token) is not None), None)


def eot_id(tokenizer: Tokenizer) -> int:
    """The id of the tokenizer's `document_token`: before every document in training, the start of every prompt."""
    return tokenizer.token_to_id(document_token(tokenizer))


def save_tokenizer(tokenizer: Tokenizer, output_dir: str | os.PathLike) -> Path:
    """Write `output_dir/tokenizer.json` atomically (a temporary name, then a rename)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / TOKENIZER_FILE
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".json.partial", dir=output_dir)
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
