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


# -- each failure's cause as soon as it happens ---------------------------------------------------------------
# `pytest -q` shows tracebacks only in the end summary: a run cut short (CI time limit, Ctrl-C, a killed worker)
# showed "F" and nothing else. Print a short traceback right after the "F"; the end summary stays as it was.
EARLY_CAUSE_LINES = 120


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and item.config.getoption("tbstyle", "auto") != "no":
        try:  # Node.repr_failure takes a style (Function's override does not)
            report.early_cause = str(pytest.Item.repr_failure(item, call.excinfo, style="short"))
        except Exception:  # the end summary still has the whole story
            report.early_cause = str(report.longrepr)
    return report


@pytest.hookimpl(trylast=True)  # after the terminal reporter has written the "F"
def pytest_runtest_logreport(report):
    cause = getattr(report, "early_cause", None)
    reporter = _config.pluginmanager.get_plugin("terminalreporter") if _config is not None else None
    if cause is None or reporter is None:
        return
    phase = "" if report.when == "call" else f" (at {report.when})"
    if getattr(reporter._tw, "width_of_current_line", 1):  # after the progress characters of -q
        reporter.write("\n")
    reporter.write_line(f"{'FAILED' if report.when == 'call' else 'ERROR'} {report.nodeid}{phase}", red=True, bold=True)
    lines = cause.rstrip().splitlines()
    if len(lines) > EARLY_CAUSE_LINES:  # e.g. a subprocess's whole output in an assertion message: keep its end
        lines = [
            *lines[:20],
            f"... ({len(lines) - EARLY_CAUSE_LINES} lines; all in the summary) ...",
            *lines[20 - EARLY_CAUSE_LINES :],
        ]
    for line in lines:
        reporter.write_line(line)
    reporter.flush()  # stdout to a pipe is block-buffered: a killed run would lose it


_config = None


def pytest_configure(config):
    global _config
    _config = config


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


def peak_rss_kib(module: str, *args, env: dict | None = None) -> tuple[int, int, str]:
    """Run `MODULE.main(ARGS)` in a process of its own; (peak RSS of that process, of its largest child, in KiB,
    and its stdout). A fresh process per measurement, as a peak only ever grows. The process's own peak is
    VmHWM, its memory map's high-water mark: ru_maxrss would carry over this (pytest's, far larger) process's
    peak through exec and hide any growth below it. A child's (spawned worker's) ru_maxrss likewise starts from
    the measured process's RSS when it was started."""
    driver = (
        f"import resource, sys; from {module} import main; main(sys.argv[1:]); "
        "hwm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM:')); "
        "print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", driver, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    main_kib, child_kib = map(int, proc.stdout.strip().splitlines()[-1].split())
    return main_kib, child_kib, proc.stdout


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """`datasets` without the network and with a cache of the test's own, here and in the processes a test
    starts: `hf:` inputs in tests are local folders."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-home" / "datasets")


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


def prepare_documents(texts: list[str], tokenizer: Path, out: Path) -> Path:
    """A prepared dataset (10% val) of `texts` in `out`."""
    from dsllm.data.prepare import PrepareConfig, prepare

    corpus = write_jsonl(out.with_name(out.name + ".jsonl"), texts)
    prepare(
        PrepareConfig(
            inputs=[str(corpus)], tokenizer=str(tokenizer), output=str(out), val_fraction=0.1, workers=1, progress=False
        )
    )
    return out


@pytest.fixture(scope="session")
def mixture_dirs(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """The sources of a weighted mixture: three small prepared datasets of different documents (and sizes), one
    tokenizer (the test dataset's)."""
    root = tmp_path_factory.mktemp("mixture")
    sizes = {"web": 160, "code": 120, "books": 50}
    return {
        name: prepare_documents(make_documents(count, seed=seed), tokenizer_dir, root / name)
        for seed, (name, count) in enumerate(sizes.items(), start=1)
    }


@pytest.fixture(scope="session")
def shared_run(dataset_dir, tmp_path_factory):
    """`shared_run(*ARGS, ranks=, ds=)`: the folder of a pretraining run on the test dataset (runs.pretrain's options),
    made once per session for every test, in any file, that asks for the very same options: a reference that tests
    read but never modify (copy it first)."""
    from runs import pretrain

    made = {}

    def run(*args, ranks=1, ds="zero2.json") -> Path:
        key = (tuple(map(str, args)), ranks, ds)
        if key not in made:
            out = tmp_path_factory.mktemp("shared") / "run"
            pretrain(dataset_dir, out, *args, ranks=ranks, ds=ds)
            made[key] = out
        return made[key]

    return run


@pytest.fixture(scope="session")
def single(dataset_dir, tmp_path_factory) -> dict[str, Path]:
    """The single-rank runs the parallel layouts (tensor, 3D, sequence) must reproduce: one rank, ZeRO-1, one run of
    runs.LAYOUT_RUN per model of runs.LAYOUT_MODELS, made once per session."""
    from runs import LAYOUT_MODELS, LAYOUT_RUN, pretrain

    runs = {}
    for name, model in LAYOUT_MODELS.items():
        out = tmp_path_factory.mktemp("single") / "run"
        pretrain(dataset_dir, out, *LAYOUT_RUN, *model, ds="zero1.json")
        runs[name] = out
    return runs
