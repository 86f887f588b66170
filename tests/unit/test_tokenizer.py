"""tokenizer/train_tokenizer.py: byte-level BPE that round-trips any text, and one-line errors."""

import ast
import json
import subprocess
import sys

from conftest import ROOT, assert_user_error, make_documents, run_script, write_jsonl
from tokenizers import Tokenizer, decoders

from dsllm.tokenizer import EOT_TOKEN, MAX_PIECE_BYTES, load_tokenizer, tokenizer_hash, train_tokenizer

SCRIPT = "tokenizer/train_tokenizer.py"


def test_train_from_jsonl_and_round_trip(tmp_path, corpus_jsonl):
    proc = run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", 320, "--output", tmp_path / "tok", check_rc=0)
    assert "read 400 documents from 1 file (" in proc.stdout and "trained 320 tokens" in proc.stdout
    assert "skipped" not in proc.stdout  # a file given by path: nothing to skip
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert tok.get_vocab_size() == 320 and tok.token_to_id(EOT_TOKEN) == 0
    spec = json.loads(tok.to_str())
    assert spec["model"]["type"] == "BPE"
    assert [p["type"] for p in spec["pre_tokenizer"]["pretokenizers"]] == ["ByteLevel", "Split"]
    text = "the model reads\n\ttabs, ünïcödé, 😀, 漢字, and bytes \x01 never seen in training"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned
    assert tokenizer_hash(load_tokenizer(tmp_path / "tok")) == tokenizer_hash(tok)


def test_same_input_from_every_format_gives_the_same_tokenizer(tmp_path, corpus_texts):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "c.jsonl", corpus_texts)
    pq.write_table(pa.table({"text": corpus_texts}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        run_script(SCRIPT, "--input", tmp_path / name, "--vocab-size", 300, "--output", tmp_path / name[2:], check_rc=0)
    assert (tmp_path / "jsonl/tokenizer.json").read_text() == (tmp_path / "parquet/tokenizer.json").read_text()


def test_vocab_larger_than_the_corpus_supports(tmp_path, corpus_jsonl):
    proc = run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", 50257, "--output", tmp_path / "tok")
    assert_user_error(proc, "the corpus supports only", "fewer than --vocab-size 50,257", "use --vocab-size")
    assert not (tmp_path / "tok").exists()


def test_vocab_outside_the_format(tmp_path, corpus_jsonl):
    for size in (100, 2**32, 2**32 + 1):  # 2**32 made the Rust trainer abort on a 283 GB allocation
        proc = run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", size, "--output", tmp_path / "tok")
        assert_user_error(proc, f"--vocab-size {size} is outside 257..")
    assert not (tmp_path / "tok").exists()


def test_min_frequency_out_of_range(tmp_path, corpus_jsonl):
    for frequency in (-5, 0, 2**64):
        proc = run_script(
            SCRIPT,
            "--input",
            corpus_jsonl,
            "--vocab-size",
            300,
            "--min-frequency",
            frequency,
            "--output",
            tmp_path / "tok",
        )
        assert_user_error(proc, f"--min-frequency {frequency} is outside 1..")
    assert not (tmp_path / "tok").exists()


def test_a_megabyte_without_whitespace_trains_and_round_trips(tmp_path):
    """One long run without whitespace (a minified or base64 blob) made BPE training quadratic: 1 MB never ended."""
    (tmp_path / "blob.txt").write_text("ab" * 500_000)
    command = [
        sys.executable,
        str(ROOT / SCRIPT),
        "--input",
        str(tmp_path / "blob.txt"),
        "--vocab-size",
        "260",
        "--output",
        str(tmp_path / "tok"),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)  # a hang guard, not a timing
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(tmp_path / "tok")
    text = (tmp_path / "blob.txt").read_text()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < len(text) // 4


def test_pieces_cut_inside_a_character_still_round_trip(corpus_texts):
    tok = train_tokenizer(corpus_texts, vocab_size=300, show_progress=False)
    # the chunk boundaries fall inside "é" (2 bytes), "😀" (4 bytes) and "漢" (3 bytes)
    for text in ("a" * (MAX_PIECE_BYTES - 1) + "é" * 300, "!" + "😀" * 100, "漢字" * 200 + " tail"):
        pieces = [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]
        assert max(map(len, pieces)) == MAX_PIECE_BYTES
        assert any("\ufffd" in decoders.ByteLevel().decode([piece]) for piece in pieces)  # a piece ends mid-character
        assert tok.decode(tok.encode(text).ids) == text
    text = "the model " + "ab" * 1000 + "\n\t ünïcödé \x01 \x00 end"
    assert tok.decode(tok.encode(text).ids) == text


def test_refuses_to_overwrite_without_flag(tmp_path, corpus_jsonl):
    out = tmp_path / "tok"
    run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", 300, "--output", out, check_rc=0)
    before = (out / "tokenizer.json").read_bytes()
    proc = run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", 310, "--output", out)
    assert_user_error(proc, "already exists", "--overwrite")
    assert (out / "tokenizer.json").read_bytes() == before
    run_script(SCRIPT, "--input", corpus_jsonl, "--vocab-size", 310, "--output", out, "--overwrite", check_rc=0)
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == 310


def test_empty_and_fully_filtered_corpora(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(
        run_script(SCRIPT, "--input", tmp_path / "empty.jsonl", "--vocab-size", 300, "--output", tmp_path / "t"),
        "corpus is empty",
    )
    write_jsonl(tmp_path / "short.jsonl", ["tiny", "also tiny"])
    assert_user_error(
        run_script(SCRIPT, "--input", tmp_path / "short.jsonl", "--vocab-size", 300, "--output", tmp_path / "t"),
        "all 2 documents were dropped",
        "2 too short",
        "--min-chars",
    )
    assert not (tmp_path / "t").exists()


def test_bad_arguments_are_one_line(tmp_path):
    assert_user_error(run_script(SCRIPT, "--vocab-size", 300), "required: --input")
    assert_user_error(
        run_script(SCRIPT, "--input", tmp_path / "missing.txt", "--vocab-size", 300, "--output", tmp_path / "t"),
        "missing.txt: no such file",
    )


def test_folder_of_markdown_and_rst_is_read_and_other_files_are_reported(tmp_path):
    """A folder of 2,705 files trained on 50 of them without a word: .md and .rst were skipped silently."""
    corpus = tmp_path / "docs"
    (corpus / "guide").mkdir(parents=True)
    texts = make_documents(40, seed=7)
    names = []
    for i, text in enumerate(texts):
        name = ("guide/" if i % 2 else "") + f"page{i:02d}" + (".md", ".rst", ".text", ".txt")[i % 4]
        (corpus / name).write_text(text)
        names.append(name)
    for i in range(5):
        (corpus / "guide" / f"tool{i}.py").write_text("print('not a document')\n" * 10)
    (corpus / "index.html").write_text("<p>skipped</p>")
    (corpus / "LICENSE").write_text("MIT License, skipped")
    proc = run_script(SCRIPT, "--input", corpus, "--vocab-size", 280, "--output", tmp_path / "tok", check_rc=0)
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "skipped 7 files: 5 .py, 1 (no extension), 1 .html; pass them as .txt/.md or convert them"
    assert "read 40 documents from 40 files" in lines[-1] and "trained 280 tokens" in lines[-1]
    expected = train_tokenizer([(corpus / n).read_text() for n in sorted(names)], vocab_size=280, show_progress=False)
    assert tokenizer_hash(load_tokenizer(tmp_path / "tok")) == tokenizer_hash(expected)  # the same documents, cleaned


def test_unknown_extensions_are_one_line_errors(tmp_path):
    (tmp_path / "corpus.csv").write_text("text\nhello\n")
    assert_user_error(
        run_script(SCRIPT, "--input", tmp_path / "corpus.csv", "--vocab-size", 300, "--output", tmp_path / "t"),
        "corpus.csv: unknown input type (.csv)",
        "rename it to .txt",
    )
    (tmp_path / "code").mkdir()
    for name in ("a.py", "b.py", "c.html"):
        (tmp_path / "code" / name).write_text("x = 1")
    assert_user_error(
        run_script(SCRIPT, "--input", tmp_path / "code", "--vocab-size", 300, "--output", tmp_path / "t"),
        "code: folder holds no readable input (found 2 .py, 1 .html)",
        "pass them as .txt/.md or convert them",
    )
    assert not (tmp_path / "t").exists()


def test_the_library_does_not_import_the_data_layer():
    """dsllm.tokenizer sits below dsllm.data: the command that reads corpora lives in dsllm/data/train_tokenizer.py."""
    tree = ast.parse((ROOT / "dsllm" / "tokenizer.py").read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("dsllm.data")], imported
    from dsllm.cli import VERBS  # the script runs the train-tokenizer verb, whose module is the command's

    assert 'run_verb("train-tokenizer")' in (ROOT / SCRIPT).read_text()
    assert VERBS["train-tokenizer"][0] == "dsllm.data.train_tokenizer"
