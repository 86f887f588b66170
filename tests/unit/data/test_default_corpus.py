"""The embedded default corpus: the running Python's own standard library, built once and cached."""

import json
import sysconfig
from pathlib import Path

from conftest import run_script

from dsllm.data.default_corpus import build_default_dataset, stdlib_sources
from dsllm.data.validate import validate_dataset
from dsllm.tokenizer import load_tokenizer


def test_sources_come_from_this_python_and_skip_tests():
    files = stdlib_sources(max_bytes=2_000_000)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert files and all(f.is_relative_to(stdlib) and f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.relative_to(stdlib).parts) for f in files)
    assert sum(f.stat().st_size for f in files) <= 2_000_000


def test_build_once_then_reuse(tmp_path):
    logs = []
    dataset = build_default_dataset(tmp_path, vocab_size=600, max_bytes=400_000, log=logs.append)
    summary = validate_dataset(dataset)
    assert summary["splits"]["train"]["tokens"] > 50_000 and summary["splits"]["val"]["documents"] >= 1
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["cleaning"]["strip_html"] is False  # code keeps its `<` and `&`
    tok = load_tokenizer(dataset)
    source = stdlib_sources(max_bytes=400_000)[0].read_text()
    assert tok.decode(tok.encode(source).ids) == source
    before = (dataset / "train.bin").stat().st_mtime_ns
    logs.clear()
    assert build_default_dataset(tmp_path, vocab_size=600, max_bytes=400_000, log=logs.append) == dataset
    assert logs == [f"default corpus: reusing {dataset}"]
    assert (dataset / "train.bin").stat().st_mtime_ns == before


def test_command_builds_and_validates(tmp_path):
    proc = run_script(
        "data_pipeline/default_corpus.py",
        "--cache-dir",
        tmp_path,
        "--vocab-size",
        500,
        "--max-bytes",
        200_000,
        check_rc=0,
    )
    assert "standard-library files" in proc.stdout and ": OK (vocab 500" in proc.stdout
