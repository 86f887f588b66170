"""The shared reader: every input format gives the same documents; bad input is a one-line UserError."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import write_jsonl

from dsllm.data.sources import CorpusReader, InputError, count_by_extension, skipped_summary

TEXTS = ["first document\nwith two lines", "second: ünïcödé 😀", "third <b>bold</b>"]


def read(*paths, **kwargs):
    reader = CorpusReader(list(paths), **kwargs)
    return list(reader), reader.stats


def test_txt_one_document_per_file_or_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("line one\n\nline two\r\n")
    assert read(tmp_path / "a.txt")[0] == ["line one\n\nline two\r\n"]
    docs, stats = read(tmp_path / "a.txt", split_lines=True)
    assert docs == ["line one", "line two"]  # blank lines are not documents
    assert stats.bytes_in == len("line one") + len("line two")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    raw = "".join(json.dumps({"body": t, "n": i}) + "\n" for i, t in enumerate(TEXTS)).encode()
    path = tmp_path / f"c{suffix}"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(raw))
    elif suffix.endswith(".zst"):
        half = len(raw) // 2  # two frames: a file made by concatenating zstd outputs
        path.write_bytes(zstandard.compress(raw[:half]) + zstandard.compress(raw[half:]))
    else:
        path.write_bytes(raw)
    docs, stats = read(path, text_key="body")
    assert docs == TEXTS
    assert stats.documents == 3 and stats.bytes_in == len(raw)


def test_parquet_streams_every_row_group(tmp_path):
    texts = [f"row {i}" for i in range(2500)]
    table = pa.table({"content": texts, "other": list(range(2500))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=700)
    assert pq.ParquetFile(tmp_path / "c.parquet").num_row_groups == 4
    docs, stats = read(tmp_path / "c.parquet", text_key="content")
    assert docs == texts
    assert stats.bytes_in == sum(len(t) for t in texts)


def test_datasets_save_to_disk_folder_and_dict(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "single"))
    assert read(tmp_path / "single")[0] == TEXTS
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
            "test": datasets.Dataset.from_dict({"text": TEXTS[2:]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert sorted(read(tmp_path / "dict")[0]) == sorted(TEXTS)


def test_folder_of_mixed_inputs_in_sorted_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("from txt")
    write_jsonl(tmp_path / "b" / "c.jsonl", ["from jsonl"])
    pq.write_table(pa.table({"text": ["from parquet"]}), tmp_path / "b" / "d.parquet")
    (tmp_path / "notes.py").write_text("not an input")
    (tmp_path / ".hidden.txt").write_text("hidden")
    docs, stats = read(tmp_path)
    assert docs == ["from txt", "from jsonl", "from parquet"]
    assert stats.files == 3 and stats.skipped_files == [str(tmp_path / "notes.py")]


def test_markdown_rst_and_text_files_are_read_as_text(tmp_path):
    """A folder of .md docs used to yield nothing: only .txt was text."""
    for name in ("a.md", "b.rst", "c.text", "d.TXT", "e.MD"):
        (tmp_path / name).write_text(f"# from {name}\n\nbody of {name}\n")
    docs, stats = read(tmp_path)
    assert docs == [f"# from {name}\n\nbody of {name}\n" for name in ("a.md", "b.rst", "c.text", "d.TXT", "e.MD")]
    assert stats.files == 5 and stats.skipped_files == []
    docs, _ = read(tmp_path / "a.md", tmp_path / "b.rst", split_lines=True)
    assert docs == ["# from a.md", "body of a.md", "# from b.rst", "body of b.rst"]


def test_skipped_files_are_counted_by_extension_in_one_line(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "keep.md").write_text("kept")
    for i in range(4):
        (tmp_path / "docs" / f"m{i}.py").write_text("x = 1")
    (tmp_path / "page.html").write_text("<p>x</p>")
    (tmp_path / "PAGE2.HTML").write_text("<p>x</p>")
    (tmp_path / "LICENSE").write_text("MIT")
    (tmp_path / ".gitignore").write_text("*.pyc")  # hidden files are not inputs and not counted
    reader = CorpusReader([tmp_path])
    assert [str(p) for p, _ in reader.files] == [str(tmp_path / "docs" / "keep.md")]
    assert skipped_summary(reader.stats.skipped_files) == (
        "skipped 7 files: 4 .py, 2 .html, 1 (no extension); pass them as .txt/.md or convert them"
    )
    assert skipped_summary([str(tmp_path / "one.py")]) == "skipped 1 file: 1 .py; pass them as .txt/.md or convert them"
    assert skipped_summary([]) is None
    many = [f"f{i}.{ext}" for i, ext in enumerate("abcdefgh") for _ in range(i + 1)]  # 8 extensions, 36 files
    assert count_by_extension(many) == "8 .h, 7 .g, 6 .f, 5 .e, 4 .d, 3 .c, 3 files of 2 other extensions"


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe text \xc3")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    docs, stats = read(tmp_path / "bad.txt", tmp_path / "bad.jsonl")
    assert docs == ["ok \ufffd\ufffd text \ufffd", "caf\ufffd"]
    assert stats.replaced_bytes == 4 and stats.documents_with_replacements == 2


def test_lone_surrogate_escape_in_json_is_replaced(tmp_path):
    (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n')
    (doc,), _ = read(tmp_path / "s.jsonl")
    assert doc == "a?b"
    doc.encode("utf-8")  # the tokenizer can take it


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": broken}\n')
    with pytest.raises(InputError, match=rf"{path}:3: malformed JSON"):
        read(path)


def test_missing_text_key_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["x"], key="content")
    with pytest.raises(InputError, match=r"c\.jsonl:1: no 'text' field \(found: content, id\); pass --text-key"):
        read(path)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match=r"no 'text' column \(found: body\)"):
        read(tmp_path / "c.parquet")


def test_non_text_field_is_refused(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(InputError, match="field 'text' is int, not text"):
        read(tmp_path / "c.jsonl")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "c.parquet")
    with pytest.raises(InputError, match="column 'text' has type int64"):
        read(tmp_path / "c.parquet")


def test_missing_unknown_and_empty_inputs_fail_before_reading(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        CorpusReader([tmp_path / "nope.jsonl"])
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(
        InputError, match=r"data\.csv: unknown input type \(\.csv\); use \.jsonl .* \.md .*rename it to"
    ):
        CorpusReader([tmp_path / "data.csv"])
    (tmp_path / "README").write_text("no extension")
    with pytest.raises(InputError, match=r"README: unknown input type \(\(no extension\)\)"):
        CorpusReader([tmp_path / "README"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty: folder holds no readable input \(found no files\)"):
        CorpusReader([tmp_path / "empty"])


def test_folder_without_readable_files_names_what_it_found(tmp_path):
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py", "pkg/c.py", "index.html", "Makefile"):
        (tmp_path / "src" / name).write_text("content")
    with pytest.raises(InputError) as caught:
        CorpusReader([tmp_path / "src"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"{tmp_path / 'src'}: folder holds no readable input (found 3 .py, 1 (no extension), 1 .html)"
    )
    assert ".txt" in message and ".md" in message and "pass them as .txt/.md or convert them" in message


def test_damaged_gzip_is_a_user_error(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:60])
    with pytest.raises(InputError, match="cannot be read"):
        read(path)


def test_a_streaming_datasets_source_gives_what_the_files_give(tmp_path, hf_offline):
    """`hf:NAME[:CONFIG]:SPLIT` streams through datasets.load_dataset(streaming=True); a local folder of data files
    stands in for a Hub name (no network in tests). Documents, byte counts and null texts are as for the files."""
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "a.jsonl", TEXTS[:2], key="body")
    write_jsonl(tmp_path / "jsonl" / "b.jsonl", TEXTS[2:], key="body")
    docs, stats = read(f"hf:{tmp_path / 'jsonl'}:train", text_key="body")
    assert docs == TEXTS and stats.files == 1 and stats.documents == 3
    assert stats.bytes_in == sum(len(t.encode()) for t in TEXTS)

    (tmp_path / "parquet").mkdir()
    texts = [f"row {i}" for i in range(2500)] + [None]  # more than one batch; a null text is an empty document
    pq.write_table(pa.table({"text": texts, "n": range(2501)}), tmp_path / "parquet" / "p.parquet", row_group_size=700)
    spec = f"hf:{tmp_path / 'parquet'}:default:train"  # with a CONFIG
    docs, stats = read(spec, spec)  # the same input twice is read once
    assert docs == texts[:-1] + [""] and stats.bytes_in == sum(len(t) for t in texts[:-1])

    with pytest.raises(InputError, match=r"no 'body' column \(found: text, n\); pass --text-key"):
        CorpusReader([spec], text_key="body")


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("hf:", "not a dataset spelling datasets can stream; use hf:NAME[:CONFIG]:SPLIT"),
        ("hf:corpus", "not a dataset spelling"),
        ("hf:corpus::train", "not a dataset spelling"),
        ("hf:a:b:c:d", "not a dataset spelling"),
        ("hf:{tmp}/missing:train", "datasets cannot stream it (Couldn't find any data file at"),
        ("hf:{tmp}/corpus:validation", "datasets cannot stream it (Bad split: validation"),
    ],
)
def test_bad_streaming_spellings_fail_before_reading(tmp_path, hf_offline, spec, fragment):
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", TEXTS)
    with pytest.raises(InputError) as caught:
        CorpusReader([spec.format(tmp=tmp_path)])
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
