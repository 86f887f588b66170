"""data_pipeline/prepare.py end to end: documents in -> token files -> the same cleaned text back."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assert_user_error, make_documents, peak_rss_kib, run_script, write_jsonl
from tokenizers import Tokenizer

from dsllm.data.cleaning import CleaningConfig, clean
from dsllm.data.format import TokenFile
from dsllm.data.prepare import PrepareConfig, prepare
from dsllm.data.validate import validate_dataset

SCRIPT = "data_pipeline/prepare.py"


def decoded_documents(directory, split):
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tf = TokenFile(directory / split)
    eot = tok.token_to_id("<|endoftext|>")
    docs = []
    for i in range(tf.num_documents):
        ids = tf.document(i).tolist()
        assert ids[-1] == eot and eot not in ids[:-1]
        docs.append(tok.decode(ids[:-1], skip_special_tokens=False))
    return docs


def run_prepare(tmp_path, inputs, tokenizer_dir, name="out", **kwargs):
    config = PrepareConfig(
        inputs=[str(p) for p in inputs],
        tokenizer=str(tokenizer_dir),
        output=str(tmp_path / name),
        progress=False,
        **{"workers": 1, **kwargs},
    )
    return prepare(config), tmp_path / name


def test_round_trip_equals_cleaned_text_with_report(tmp_path, tokenizer_dir):
    texts = make_documents(300, seed=3)
    raw = [f"<p>{t}</p>\r\n  " for t in texts]
    raw[10] = raw[11] = raw[12]  # two exact duplicates after cleaning
    raw[20] = "   \n\n "  # empty after cleaning
    raw[21] = "<b>tiny</b>"  # too short
    raw[22] = "contains the separator <|endoftext|> as plain text, which must stay text"
    write_jsonl(tmp_path / "c.jsonl", raw)
    meta, out = run_prepare(tmp_path, [tmp_path / "c.jsonl"], tokenizer_dir, workers=2, val_fraction=0.2)

    expected = [clean(t, CleaningConfig()) for t in raw]
    expected = [t for i, t in enumerate(expected) if i not in (10, 11, 20, 21)]
    train, val = decoded_documents(out, "train"), decoded_documents(out, "val")
    assert sorted(train + val) == sorted(expected)
    # each split keeps the input order
    assert train == [t for t in expected if t in set(train)] and val == [t for t in expected if t in set(val)]
    assert 0.1 < len(val) / len(expected) < 0.3

    report = meta["report"]
    assert report["documents_read"] == 300 and report["documents_kept"] == 296
    assert report["dropped"] == {"empty": 1, "too_short": 1, "duplicate": 2}
    assert report["bytes_in"] == (tmp_path / "c.jsonl").stat().st_size
    assert report["tokens_out"] == sum(s["tokens"] for s in meta["splits"].values())
    assert report["mb_per_second"] > 0 and report["tokens_per_second"] > 0
    on_disk = json.loads((out / "meta.json").read_text())
    assert on_disk == meta
    assert on_disk["inputs"] == [str(tmp_path / "c.jsonl")]
    assert on_disk["tokenizer"]["hash"] == validate_dataset(out)["tokenizer_hash"]
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "train.idx",
        "val.bin",
        "val.idx",
    ]


def test_worker_count_does_not_change_the_output(tmp_path, corpus_jsonl, tokenizer_dir):
    _, one = run_prepare(tmp_path, [corpus_jsonl], tokenizer_dir, name="one", workers=1, val_fraction=0.1)
    _, two = run_prepare(tmp_path, [corpus_jsonl], tokenizer_dir, name="two", workers=2, val_fraction=0.1)
    for name in ("train.bin", "train.idx", "val.bin", "val.idx"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_split_is_by_document_and_deterministic_by_seed(tmp_path, tokenizer_dir):
    texts = make_documents(200, seed=5)
    write_jsonl(tmp_path / "c.jsonl", texts + texts[:20])  # 20 duplicates, kept with --no-dedup
    cfg = dict(val_fraction=0.25, cleaning=CleaningConfig(dedup=False))
    _, a = run_prepare(tmp_path, [tmp_path / "c.jsonl"], tokenizer_dir, name="a", seed=1, **cfg)
    _, b = run_prepare(tmp_path, [tmp_path / "c.jsonl"], tokenizer_dir, name="b", seed=1, **cfg)
    _, c = run_prepare(tmp_path, [tmp_path / "c.jsonl"], tokenizer_dir, name="c", seed=2, **cfg)
    assert decoded_documents(a, "val") == decoded_documents(b, "val")
    assert decoded_documents(a, "val") != decoded_documents(c, "val")
    train, val = set(decoded_documents(a, "train")), set(decoded_documents(a, "val"))
    assert not train & val  # a duplicated document never lands in both splits


def test_tiny_corpus_still_gets_a_validation_document(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "c.jsonl", make_documents(3))
    meta, _ = run_prepare(tmp_path, [tmp_path / "c.jsonl"], tokenizer_dir, val_fraction=0.001)
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 2
    write_jsonl(tmp_path / "one.jsonl", make_documents(1))
    with pytest.raises(Exception, match="too few for a validation split; pass --val-fraction 0"):
        run_prepare(tmp_path, [tmp_path / "one.jsonl"], tokenizer_dir, name="one", val_fraction=0.1)
    assert not (tmp_path / "one").exists()
    meta, out = run_prepare(tmp_path, [tmp_path / "one.jsonl"], tokenizer_dir, name="one", val_fraction=0)
    assert list(meta["splits"]) == ["train"] and not (out / "val.bin").exists()


def test_cli_writes_a_dataset_that_validates(tmp_path, corpus_jsonl, tokenizer_dir):
    out = tmp_path / "ds"
    proc = run_script(
        SCRIPT,
        "--input",
        corpus_jsonl,
        "--tokenizer",
        tokenizer_dir / "tokenizer.json",
        "--output",
        out,
        "--workers",
        2,
        check_rc=0,
    )
    assert "documents  read 400" in proc.stdout and "tokens/s" in proc.stdout and "MB/s" in proc.stdout
    proc = run_script("data_pipeline/validate.py", out, check_rc=0)
    assert "OK" in proc.stdout and "train" in proc.stdout and "mean" in proc.stdout


def test_existing_dataset_is_refused_unless_overwrite(tmp_path, corpus_jsonl, tokenizer_dir):
    out = tmp_path / "ds"
    run_prepare(tmp_path, [corpus_jsonl], tokenizer_dir, name="ds")
    (out / "NOTES.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_script(SCRIPT, "--input", corpus_jsonl, "--tokenizer", tokenizer_dir, "--output", out)
    assert_user_error(proc, str(out), "already holds a dataset", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_jsonl(tmp_path / "other.jsonl", make_documents(50, seed=9))
    run_script(
        SCRIPT,
        "--input",
        tmp_path / "other.jsonl",
        "--tokenizer",
        tokenizer_dir,
        "--output",
        out,
        "--overwrite",
        "--val-fraction",
        0,
        check_rc=0,
    )
    assert json.loads((out / "meta.json").read_text())["report"]["documents_read"] == 50
    assert not (out / "val.bin").exists() and (out / "NOTES.txt").read_text() == "mine"
    validate_dataset(out)


def test_failure_midway_leaves_the_old_dataset_intact(tmp_path, tokenizer_dir):
    out = tmp_path / "ds"
    write_jsonl(tmp_path / "good.jsonl", make_documents(100))
    run_prepare(tmp_path, [tmp_path / "good.jsonl"], tokenizer_dir, name="ds")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, make_documents(3000, seed=2))
    with open(bad, "a") as f:
        f.write("{not json\n")
    proc = run_script(SCRIPT, "--input", bad, "--tokenizer", tokenizer_dir, "--output", out, "--overwrite")
    assert_user_error(proc, f"{bad}:3001: malformed JSON")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial folder either


def start_big_prepare(tmp_path, tokenizer_dir, workers: int, **popen) -> tuple:
    """prepare.py on an 80,000-document corpus (long enough to be caught mid-run); returns it and its --output."""
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for chunk in range(40):
            f.writelines(json.dumps({"text": t}) + "\n" for t in make_documents(2000, seed=chunk, max_words=150))
    out = tmp_path / "ds"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / SCRIPT),
            "--input",
            str(big),
            "--tokenizer",
            str(tokenizer_dir),
            "--output",
            str(out),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )
    return proc, out


def test_killed_run_never_leaves_a_valid_looking_dataset(tmp_path, tokenizer_dir):
    proc, out = start_big_prepare(tmp_path, tokenizer_dir, workers=1)
    deadline = time.time() + 60
    while not list(out.glob(".partial-*/train.bin")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be interrupted"
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    assert_user_error(run_script("data_pipeline/validate.py", out), "meta.json: missing", "incomplete")
    # the next run cleans up the killed run's staging folder and succeeds
    write_jsonl(tmp_path / "small.jsonl", make_documents(50))
    run_script(SCRIPT, "--input", tmp_path / "small.jsonl", "--tokenizer", tokenizer_dir, "--output", out, check_rc=0)
    assert not list(out.glob(".partial-*"))
    validate_dataset(out)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "all_filtered",
        "malformed",
        "missing_key",
        "unknown_ext",
        "bad_tokenizer",
        "bad_val_fraction",
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, tokenizer_dir, case):
    inputs, tokenizer, extra = tmp_path / "c.jsonl", tokenizer_dir, []
    if case == "missing":
        inputs, expect = tmp_path / "absent.jsonl", ["absent.jsonl: no such file or folder"]
    elif case == "empty":
        inputs.write_text("\n\n")
        expect = ["c.jsonl: the corpus is empty"]
    elif case == "all_filtered":
        write_jsonl(inputs, ["short", "<p>tiny</p>", " "])
        expect = ["all 3 documents were dropped", "1 empty, 2 too short", "--min-chars"]
    elif case == "malformed":
        inputs.write_text('{"text": "fine fine fine fine fine fine fine fine"}\n{"text": oops}\n')
        expect = ["c.jsonl:2: malformed JSON", "fix or remove that line"]
    elif case == "missing_key":
        write_jsonl(inputs, ["x" * 50], key="content")
        expect = ["c.jsonl:1: no 'text' field", "--text-key"]
    elif case == "unknown_ext":
        inputs = tmp_path / "c.csv"
        inputs.write_text("text\nhello\n")
        expect = ["c.csv: unknown input type"]
    elif case == "bad_tokenizer":
        write_jsonl(inputs, ["x" * 50])
        (tmp_path / "tok.json").write_text("{}")
        tokenizer, expect = tmp_path / "tok.json", ["tok.json: not a tokenizers JSON file"]
    else:
        write_jsonl(inputs, ["x" * 50])
        extra, expect = ["--val-fraction", 1.5], ["--val-fraction 1.5 is outside [0, 1)"]
    args = ["--input", inputs, "--output", tmp_path / "out", "--tokenizer", tokenizer, *extra]
    assert_user_error(run_script(SCRIPT, *args), *expect)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_is_counted_not_fatal(tmp_path, tokenizer_dir):
    (tmp_path / "c.jsonl").write_bytes(
        b'{"text": "caf\xe9 caf\xe9 and more words to pass the length filter"}\n'
        b'{"text": "a clean document that is long enough to be kept"}\n'
    )
    proc = run_script(
        SCRIPT,
        "--input",
        tmp_path / "c.jsonl",
        "--tokenizer",
        tokenizer_dir,
        "--output",
        tmp_path / "out",
        "--val-fraction",
        0,
        check_rc=0,
    )
    assert "2 invalid UTF-8 bytes replaced in 1 documents" in proc.stdout
    assert decoded_documents(tmp_path / "out", "train")[0].startswith("caf\ufffd caf\ufffd")


def _peak_rss_kib(tmp_path, corpus, tokenizer_dir, name):
    main_kib, worker_kib, _ = peak_rss_kib(
        "dsllm.data.prepare",
        "--input",
        corpus,
        "--tokenizer",
        tokenizer_dir,
        "--output",
        tmp_path / name,
        "--workers",
        2,
        "--no-dedup",  # the dedup set grows by design, ~110 bytes per unique document: 10 MB here
    )
    return main_kib, worker_kib


def test_memory_stays_bounded_as_the_corpus_grows(tmp_path, tokenizer_dir):
    def write_corpus(path, copies):  # streamed to disk: never held in a list here either
        with open(path, "w") as f:
            for copy in range(copies):
                f.writelines(json.dumps({"text": f"{copy} {t}"}) + "\n" for t in make_documents(4000, max_words=120))
        return path.stat().st_size

    small_bytes = write_corpus(tmp_path / "small.jsonl", 1)
    big_bytes = write_corpus(tmp_path / "big.jsonl", 24)
    small_main, small_workers = _peak_rss_kib(tmp_path, tmp_path / "small.jsonl", tokenizer_dir, "s")
    big_main, big_workers = _peak_rss_kib(tmp_path, tmp_path / "big.jsonl", tokenizer_dir, "b")
    extra_corpus_kib = (big_bytes - small_bytes) / 1024
    print(
        f"peak RSS main {small_main} -> {big_main} KiB, workers {small_workers} -> {big_workers} KiB, "
        f"corpus +{extra_corpus_kib:.0f} KiB"
    )
    # Holding the corpus (or its tokens) in memory would add at least its size; streaming adds a fraction.
    assert big_main - small_main < 0.2 * extra_corpus_kib, (small_main, big_main, extra_corpus_kib)
    assert big_workers - small_workers < 0.2 * extra_corpus_kib, (small_workers, big_workers, extra_corpus_kib)
    assert big_bytes > 30e6


def test_a_killed_worker_is_one_line_and_leaves_no_dataset(tmp_path, tokenizer_dir):
    """A worker the kernel's OOM killer takes (SIGKILL) broke the process pool with a traceback."""
    import psutil

    proc, out = start_big_prepare(tmp_path, tokenizer_dir, workers=2, text=True)
    workers, deadline = [], time.time() + 120  # hang guard
    while len(workers) < 2 and proc.poll() is None and time.time() < deadline:
        workers = [
            child
            for child in psutil.Process(proc.pid).children()  # spawned pool workers, not the tracker
            if "--multiprocessing-fork" in child.cmdline() and "spawn_main" in " ".join(child.cmdline())
        ]
        time.sleep(0.05)
    while not list(out.glob(".partial-*/train.bin")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2 and proc.poll() is None, "prepare finished before a worker could be killed"
    workers[0].send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    line = assert_user_error(
        subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr),
        " while tokenizing documents ",
        "big.jsonl",
        "most likely out of memory",
        "fewer --workers (this run had 2)",
    )
    # the worker is named when the pool still knew it (CI once saw it gone from the pool's table): never another
    assert f"worker process {workers[0].pid} was killed by SIGKILL" in line or "a worker process died" in line, line
    assert re.search(r"documents [\d,]+-[\d,]+ \(", line), line
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists() and not list(out.glob(".partial-*"))


def test_output_over_an_input_or_the_tokenizer_is_refused(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "c.jsonl", make_documents(50))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "link").symlink_to(corpus)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output, fragments in (
        (corpus, ["is", "which --input reads"]),
        (corpus / "ds", ["lies inside", "which --input reads"]),
        (tmp_path / "link" / "ds", ["lies inside", "(symlinks resolved), which --input reads"]),
        (tmp_path, ["contains", "which --input reads"]),
        (tok, ["contains", "tokenizer.json, which --tokenizer reads"]),
    ):
        proc = run_script(SCRIPT, "--input", corpus, "--tokenizer", tok, "--output", output, "--overwrite")
        assert_user_error(proc, f"--output {output} ", *fragments, "choose another --output")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (corpus / "ds").exists()
    run_script(SCRIPT, "--input", corpus, "--tokenizer", tok / "tokenizer.json", "--output", tok / "ds", check_rc=0)


def test_folder_reads_markdown_and_reports_what_it_skipped(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    texts = make_documents(12, seed=4)
    for i, text in enumerate(texts):
        (corpus / ("sub" if i % 3 == 0 else ".") / f"doc{i:02d}{('.md', '.rst', '.txt')[i % 3]}").write_text(text)
    for name in ("setup.py", "sub/util.py", "sub/notes.html", "Makefile"):
        (corpus / name).write_text("not a document, but long enough to pass the filter")
    args = ["--input", corpus, "--tokenizer", tokenizer_dir, "--output", tmp_path / "ds", "--val-fraction", 0]
    proc = run_script(SCRIPT, *args, check_rc=0)
    skipped_line = "skipped 4 files: 2 .py, 1 (no extension), 1 .html; pass them as .txt/.md or convert them"
    assert proc.stdout.splitlines()[0] == skipped_line
    assert "documents  read 12 |" in proc.stdout
    assert sorted(decoded_documents(tmp_path / "ds", "train")) == sorted(texts)
    meta = json.loads((tmp_path / "ds" / "meta.json").read_text())
    assert meta["files_read"] == 12
    assert sorted(meta["files_skipped"]) == sorted(
        str(corpus / n) for n in ("setup.py", "sub/util.py", "sub/notes.html", "Makefile")
    )


def test_folder_without_readable_files_is_one_line_naming_what_it_found(tmp_path, tokenizer_dir):
    (tmp_path / "site").mkdir()
    for name in ("index.html", "about.html", "style.css"):
        (tmp_path / "site" / name).write_text("<p>x</p>")
    proc = run_script(SCRIPT, "--input", tmp_path / "site", "--tokenizer", tokenizer_dir, "--output", tmp_path / "ds")
    assert_user_error(proc, "site: folder holds no readable input (found 2 .html, 1 .css)", ".md", "convert them")
    assert not (tmp_path / "ds").exists()


DATA_COMMANDS = {  # module -> the script a user runs by path
    "dsllm.data.prepare": "data_pipeline/prepare.py",
    "dsllm.data.validate": "data_pipeline/validate.py",
    "dsllm.data.default_corpus": "data_pipeline/default_corpus.py",
    "dsllm.data.train_tokenizer": "tokenizer/train_tokenizer.py",
}
_PARSER_PROBE = """
import argparse, importlib, inspect, json, sys
module = importlib.import_module(sys.argv[1])
parser = module.build_parser()
actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
heavy = ("torch", "transformers", "deepspeed", "matplotlib", "pyarrow", "datasets")
print(json.dumps({
    "heavy": [name for name in heavy if name in sys.modules],
    "options": [(a.option_strings or [a.metavar or a.dest])[0] for a in actions],
    "without_help": [a.dest for a in actions if not (a.help or "").strip()],
    "main_params": list(inspect.signature(module.main).parameters),
}))
"""


@pytest.mark.parametrize("module", list(DATA_COMMANDS))
def test_data_command_parsers_are_light_and_every_option_has_help(module):
    """--help in well under 2 s: no torch (or another heavy import) when the parser is built, in a fresh process."""
    probe = subprocess.run([sys.executable, "-c", _PARSER_PROBE, module], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["heavy"] == [] and found["without_help"] == [] and found["main_params"] == ["argv"], found
    assert found["options"]
    proc = run_script(DATA_COMMANDS[module], "--help", check_rc=0)
    for option in found["options"]:
        assert option in proc.stdout, (option, proc.stdout)


def test_a_streaming_datasets_source_prepares_in_bounded_memory(tmp_path, tokenizer_dir, hf_offline):
    """`--input hf:FOLDER:train` streams through datasets.load_dataset(..., streaming=True): 4x the corpus, the
    same peak memory (within 10%), in the main process and in the workers. The corpus is sharded, as large ones
    are: datasets reads a JSON file in 10 MB chunks, so one file under 10 MB would be read whole."""

    def write_corpus(folder, shards):
        folder.mkdir()
        for shard in range(shards):
            texts = make_documents(2000, seed=shard, max_words=120)
            write_jsonl(folder / f"part-{shard:02d}.jsonl", [f"{shard} {t}" for t in texts])
        return sum(p.stat().st_size for p in folder.iterdir())

    small_bytes = write_corpus(tmp_path / "small", 2)
    big_bytes = write_corpus(tmp_path / "big", 8)
    peaks = {}
    for name in ("small", "big"):
        main_kib, worker_kib, stdout = peak_rss_kib(
            "dsllm.data.prepare",
            "--input",
            f"hf:{tmp_path / name}:train",
            "--tokenizer",
            tokenizer_dir,
            "--output",
            tmp_path / f"{name}-out",
            "--workers",
            2,
        )
        peaks[name] = main_kib, worker_kib
        assert f"documents  read {4000 if name == 'small' else 16000:,}" in stdout
    (small_main, small_workers), (big_main, big_workers) = peaks["small"], peaks["big"]
    print(
        f"streaming {small_bytes / 1e6:.1f} -> {big_bytes / 1e6:.1f} MB: peak RSS main {small_main} -> {big_main} "
        f"KiB, workers {small_workers} -> {big_workers} KiB"
    )
    assert big_main < 1.1 * small_main and big_workers < 1.1 * small_workers, peaks
    assert json.loads((tmp_path / "big-out" / "meta.json").read_text())["inputs"] == [f"hf:{tmp_path / 'big'}:train"]
