"""The embedded default corpus: the Python standard library's own `.py` sources (found through
`sysconfig`, present in every Python install), made into a tokenizer and a train/val dataset once and
cached. Nothing is downloaded; nothing outside the running Python is read."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from dsllm.data.cleaning import CleaningConfig
from dsllm.data.prepare import META_FILE, PrepareConfig, prepare
from dsllm.errors import ArgumentParser, UserError
from dsllm.tokenizer import TOKENIZER_FILE, save_tokenizer, train_tokenizer

RECIPE_VERSION = 2  # 2: the tokenizer cuts whitespace-free runs into 128-byte pieces
DEFAULT_VOCAB_SIZE = 8192
VAL_FRACTION = 0.05
# Tests and GUI/demo packages are left out: they are repetitive and not representative code.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "turtledemo", "__pycache__"}
# Code keeps its markup-looking text: no HTML stripping; whitespace normalisation keeps indentation.
CODE_CLEANING = CleaningConfig(strip_html=False)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DSLLM_CACHE_DIR") or Path.home() / ".cache" / "dsllm")


def stdlib_sources(max_bytes: int | None = None) -> list[Path]:
    """The standard library's `.py` files in a fixed order, up to `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if _SKIP_PARTS.intersection(path.relative_to(root).parts):
            continue
        size = path.stat().st_size
        if max_bytes is not None and total + size > max_bytes:
            break
        files.append(path)
        total += size
    if not files:
        raise UserError(
            f"{root}: no standard-library sources found; this Python install ships without them, "
            "pass --data with a prepared dataset instead"
        )
    return files


def _write_corpus(files: list[Path], target: Path) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        for path in files:
            text = path.read_bytes().decode("utf-8", errors="replace")
            out.write(json.dumps({"text": text, "path": str(path.relative_to(root))}) + "\n")
    os.replace(partial, target)


@contextlib.contextmanager
def _lock(path: Path):
    """One builder at a time (e.g. several ranks starting together); the others wait, then reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_default_dataset(
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_bytes: int | None = None,
    workers: int | None = None,
    log=print,
) -> Path:
    """Build (or reuse) the default dataset; returns its folder. Cached by Python version and recipe."""
    files = stdlib_sources(max_bytes)
    listing = "\n".join(f"{p}:{p.stat().st_size}" for p in files)
    key = hashlib.sha256(f"{RECIPE_VERSION}|{sys.version}|{vocab_size}|{listing}".encode()).hexdigest()[:12]
    base = Path(cache_dir) if cache_dir else default_cache_dir()
    home = base / f"default-corpus-py{sys.version_info.major}{sys.version_info.minor}-{key}"
    dataset = home / "data"
    with _lock(base / f".{home.name}.lock"):
        if (dataset / META_FILE).is_file():
            log(f"default corpus: reusing {dataset}")
            return dataset
        home.mkdir(parents=True, exist_ok=True)
        corpus = home / "corpus.jsonl"
        if not corpus.is_file():
            log(f"default corpus: {len(files)} standard-library files from {sysconfig.get_paths()['stdlib']}")
            _write_corpus(files, corpus)
        tokenizer_dir = home / "tokenizer"
        if not (tokenizer_dir / TOKENIZER_FILE).is_file():
            log(f"default corpus: training a {vocab_size:,}-token byte-level BPE tokenizer")
            from dsllm.data.cleaning import clean
            from dsllm.data.sources import CorpusReader

            texts = (clean(t, CODE_CLEANING) for t in CorpusReader([corpus]))
            save_tokenizer(train_tokenizer(texts, vocab_size, show_progress=False), tokenizer_dir)
        log("default corpus: tokenizing into train/val token files")
        prepare(
            PrepareConfig(
                inputs=[str(corpus)],
                tokenizer=str(tokenizer_dir),
                output=str(dataset),
                val_fraction=VAL_FRACTION,
                workers=workers or os.cpu_count() or 1,
                cleaning=CODE_CLEANING,
                overwrite=True,
            )
        )
    return dataset


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="dsllm default-corpus", description=__doc__)
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where to build and cache it (default: $DSLLM_CACHE_DIR, else ~/.cache/dsllm)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N", help="tokens of the tokenizer trained on it"
    )
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        metavar="N",
        help="use only the first N bytes of standard-library sources, in sorted order (default: all of them)",
    )
    return parser


def main(argv=None) -> int:
    """`python data_pipeline/default_corpus.py`: build the default dataset and print where it is."""
    from dsllm.data.validate import format_summary, validate_dataset

    args = build_parser().parse_args(argv)
    dataset = build_default_dataset(args.cache_dir, args.vocab_size, args.max_bytes)
    print(format_summary(validate_dataset(dataset)))
    return 0
