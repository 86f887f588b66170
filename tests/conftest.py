"""Shared fixtures: a small synthetic corpus, a tokenizer trained on it, and a way to run the commands."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the model reads tokens from memory mapped files while the optimizer steps through shards of "
    "data and every rank keeps its own slice of the state until the checkpoint lands on disk"
).split()


def make_documents(count: int, seed: int = 0, min_words: int = 12, max_words: int = 80) -> list[str]:
    rng = random.Random(seed)
    return [
        f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(count)
    ]


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def run_script(
    script: str, *args: str, cwd: Path | None = None, check_rc: int | None = None
) -> subprocess.CompletedProcess:
    """Run one of the project's commands the way a user does: `python SCRIPT ARGS`."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    if check_rc is not None:
        assert proc.returncode == check_rc, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2 with exactly one line on stderr that contains every fragment."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    return make_documents(400)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_texts) -> Path:
    from dsllm.tokenizer import save_tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(corpus_texts, vocab_size=300, show_progress=False), out)
    return out


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, corpus_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", corpus_texts)


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory, corpus_jsonl, tokenizer_dir) -> Path:
    """A prepared dataset that tests read but never modify (copy it first to damage it)."""
    from dsllm.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("dataset") / "data"
    prepare(
        PrepareConfig(
            inputs=[str(corpus_jsonl)],
            tokenizer=str(tokenizer_dir),
            output=str(out),
            val_fraction=0.1,
            workers=1,
            progress=False,
        )
    )
    return out
