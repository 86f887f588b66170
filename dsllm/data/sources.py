"""The one reader of every input format: tokenizer training and `prepare` both read text through it.

Formats: plain text (`.txt`, `.text`, `.md`, `.rst`: one document per file, or one per line with
`split_lines`), `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.parquet` (streamed by row group), folders saved
with `datasets.save_to_disk`, folders of these, and `hf:NAME[:CONFIG]:SPLIT`: a dataset `datasets.load_dataset`
streams (a Hub name, or a local folder of data files), read batch by batch and never materialised. Other files in
a folder are skipped and counted by extension (`skipped_summary`). Everything streams: memory does not grow with
the corpus.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path

from dsllm.errors import UserError
from dsllm.jsonl import parse_line

TEXT_EXTENSIONS = (".txt", ".text", ".md", ".rst")  # read as plain text, one document per file
EXTENSIONS = (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", *TEXT_EXTENSIONS)
READABLE = ".jsonl .jsonl.gz .jsonl.zst .parquet .txt .text .md .rst files or datasets.save_to_disk folders"
SKIPPED_FIX = "pass them as .txt/.md or convert them"
NO_EXTENSION = "(no extension)"
HF_DATASET_MARKERS = ("dataset_dict.json", "state.json")
HF_STREAM_PREFIX = "hf:"
HF_STREAM_FORM = "hf:NAME[:CONFIG]:SPLIT"
HF_STREAM_SPELLING = f"{HF_STREAM_FORM} (e.g. hf:allenai/c4:en:train, or hf:corpus/:train for a local folder)"
_BATCH_ROWS = 1024


class InputError(UserError):
    """An input file is missing, unreadable or not in a supported shape."""


_replaced = [0]  # characters replaced while decoding, process-wide; the reader reads the delta


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _replaced[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("dsllm-count-replace", _count_and_replace)


@dataclasses.dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes_in: int = 0
    replaced_bytes: int = 0  # invalid UTF-8 bytes replaced by U+FFFD
    documents_with_replacements: int = 0
    skipped_files: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class HFStream:
    """An `--input hf:NAME[:CONFIG]:SPLIT`: `datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`,
    so a Hub corpus larger than the disk is read as it downloads, and a local folder of data files (.jsonl,
    .parquet, ...) is read without a conversion. A colon separates the parts, so NAME holds none."""

    spec: str  # as the user wrote it: the name in messages and in meta.json
    name: str
    config: str | None
    split: str

    @classmethod
    def parse(cls, spec: str) -> HFStream:
        parts = spec[len(HF_STREAM_PREFIX) :].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise InputError(f"{spec}: not a dataset spelling datasets can stream; use {HF_STREAM_SPELLING}")
        return cls(spec, parts[0], parts[1] if len(parts) == 3 else None, parts[-1])

    def local_path(self) -> Path | None:
        """NAME when it is a folder here (an output must stay apart from it), else None (a Hub name)."""
        return Path(self.name) if Path(self.name).is_dir() else None

    def load(self):
        """The streaming dataset; a name, config or split that does not load is an InputError, before any work."""
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # datasets raises many types: missing files, bad split or config, offline Hub
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            raise InputError(
                f"{self.spec}: datasets cannot stream it ({reason}); check the NAME, CONFIG and SPLIT "
                f"of {HF_STREAM_FORM}"
            ) from None

    def __str__(self) -> str:
        return self.spec


def is_stream(raw: str | os.PathLike) -> bool:
    """Whether an --input is an `hf:` dataset spelling rather than a path."""
    return isinstance(raw, str) and raw.startswith(HF_STREAM_PREFIX)


def local_input_paths(inputs: list[str | os.PathLike]) -> list[str | os.PathLike]:
    """The inputs that are paths here (files, folders, the folder of a local `hf:` dataset): what an output
    must not overlap."""
    paths: list[str | os.PathLike] = []
    for raw in inputs:
        if not is_stream(raw):
            paths.append(raw)
        else:
            local = HFStream.parse(raw).local_path()
            if local is not None:
                paths.append(local)
    return paths


def describe_input(raw: str | os.PathLike) -> str:
    """An input as meta.json records it: a path resolved, an `hf:` spelling as given."""
    return raw if is_stream(raw) else str(Path(raw).resolve())


def input_kind(path: Path) -> str | None:
    """The format of a file or folder, or None for an unsupported file."""
    if path.is_dir():
        return "hf" if any((path / m).is_file() for m in HF_DATASET_MARKERS) else "folder"
    name = path.name.lower()
    kind = next((ext for ext in EXTENSIONS if name.endswith(ext)), None)
    return "text" if kind in TEXT_EXTENSIONS else kind


def extension(path: str | os.PathLike) -> str:
    """The last suffix, lower-cased (`.PY` and `.py` count together), or NO_EXTENSION."""
    return Path(path).suffix.lower() or NO_EXTENSION


def count_by_extension(paths: list[str], shown: int = 6) -> str:
    """`2,400 .py, 200 .html, 55 (no extension)`: the most common extensions first; beyond `shown`, one total."""
    counts = sorted(collections.Counter(extension(p) for p in paths).items(), key=lambda item: (-item[1], item[0]))
    parts = [f"{n:,} {ext}" for ext, n in counts[:shown]]
    if len(counts) > shown:
        rest = counts[shown:]
        parts.append(f"{sum(n for _, n in rest):,} files of {len(rest)} other extensions")
    return ", ".join(parts)


def skipped_summary(skipped: list[str]) -> str | None:
    """One line on the files a folder held that are not inputs, or None when there were none."""
    if not skipped:
        return None
    files = "file" if len(skipped) == 1 else "files"
    return f"skipped {len(skipped):,} {files}: {count_by_extension(skipped)}; {SKIPPED_FIX}"


def _expand(path: Path, skipped: list[str], seen: set[str]) -> list[tuple[Path, str]]:
    """The files under `path`, each once: `seen` holds the real paths already visited, so a folder symlinked
    into itself (or the same file reached twice) is read once."""
    real = os.path.realpath(path)
    if real in seen:
        return []
    seen.add(real)
    kind = input_kind(path)
    if kind != "folder":
        return [(path, kind)]
    found: list[tuple[Path, str]] = []
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() or input_kind(entry):
            found += _expand(entry, skipped, seen)
        else:
            skipped.append(str(entry))
    return found


def add_input_arguments(parser) -> None:
    """`--input`, `--text-key`, `--split-lines`: shared by the tokenizer trainer and `prepare`."""
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="files or folders: .jsonl .jsonl.gz .jsonl.zst .parquet, text (.txt .text .md .rst), save_to_disk "
        f"folders; or a dataset datasets streams: {HF_STREAM_SPELLING}",
    )
    parser.add_argument("--text-key", default="text", help="the JSONL field or Parquet/datasets column with the text")
    parser.add_argument(
        "--split-lines",
        action="store_true",
        help="text files (.txt .text .md .rst): one document per line, not per file",
    )


def _stream_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (OSError, EOFError, zstandard.ZstdError)


class CorpusReader:
    """Iterates the documents (str) of all inputs in a fixed order; `stats` counts what was read.

    The inputs are resolved when the reader is made, so a missing file or unknown extension is
    reported before any work starts."""

    def __init__(self, inputs: list[str | os.PathLike], text_key: str = "text", split_lines: bool = False):
        if not inputs:
            raise InputError("no input given; pass --input with files or folders")
        self.text_key = text_key
        self.split_lines = split_lines
        self.stats = ReadStats()
        self.files: list[tuple[Path | HFStream, str]] = []
        self._streams: dict[str, object] = {}  # spec -> the datasets.IterableDataset, loaded up front
        seen: set[str] = set()
        for raw in inputs:
            if is_stream(raw):
                stream = HFStream.parse(raw)
                if stream.spec not in self._streams:  # the same input twice is read once
                    self._streams[stream.spec] = self._open_stream(stream)
                    self.files.append((stream, "hf-stream"))
                continue
            path = Path(raw)
            if not path.exists():
                raise InputError(f"{path}: no such file or folder; check the --input path")
            if input_kind(path) is None:
                raise InputError(
                    f"{path}: unknown input type ({extension(path)}); use {READABLE}, or a folder of these "
                    "(plain text: rename it to .txt)"
                )
            given_before = os.path.realpath(path) in seen  # the same input twice is read once
            skipped_before = len(self.stats.skipped_files)
            expanded = _expand(path, self.stats.skipped_files, seen)
            if not expanded and not given_before:
                skipped = self.stats.skipped_files[skipped_before:]
                if not skipped:
                    raise InputError(
                        f"{path}: folder holds no readable input (found no files); put {READABLE} in it "
                        "or pass another --input"
                    )
                raise InputError(
                    f"{path}: folder holds no readable input (found {count_by_extension(skipped)}); "
                    f"{SKIPPED_FIX} (readable: {READABLE})"
                )
            self.files += expanded

    def __iter__(self) -> Iterator[str]:
        readers = {
            "text": self._read_text,
            ".jsonl": self._read_jsonl,
            ".jsonl.gz": self._read_jsonl,
            ".jsonl.zst": self._read_jsonl,
            ".parquet": self._read_parquet,
            "hf": self._read_hf,
            "hf-stream": self._read_stream,
        }
        for path, kind in self.files:
            self.stats.files += 1
            for text in readers[kind](path):
                self.stats.documents += 1
                yield text

    # -- decoding -----------------------------------------------------------------------------------
    def _decode(self, data: bytes) -> str:
        self.stats.bytes_in += len(data)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            before = _replaced[0]
            text = data.decode("utf-8", errors="dsllm-count-replace")
            self.stats.replaced_bytes += _replaced[0] - before
            self.stats.documents_with_replacements += 1
            return text

    # -- formats ------------------------------------------------------------------------------------
    def _read_text(self, path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            if not self.split_lines:
                yield self._decode(f.read())
                return
            for line in f:
                if line.strip():
                    yield self._decode(line.rstrip(b"\r\n"))

    def _open_lines(self, path: Path) -> io.BufferedIOBase:
        if path.name.lower().endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.lower().endswith(".zst"):
            import zstandard

            raw = open(path, "rb")
            return io.BufferedReader(
                zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
            )
        return open(path, "rb")

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        key = self.text_key
        with self._open_lines(path) as f:
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    record = parse_line(self._decode(line), f"{path}:{lineno}", InputError)
                    if not isinstance(record, dict) or key not in record:
                        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                        raise InputError(
                            f"{path}:{lineno}: no '{key}' field (found: {fields}); "
                            "pass --text-key with the field that holds the text"
                        )
                    text = record[key]
                    if text is None:
                        text = ""
                    if not isinstance(text, str):
                        raise InputError(
                            f"{path}:{lineno}: field '{key}' is {type(text).__name__}, not text; "
                            "pass --text-key with the field that holds the text"
                        )
                    if b"\\ud" in line or b"\\uD" in line:  # JSON may escape lone surrogates, which no tokenizer takes
                        text = text.encode("utf-8", "replace").decode("utf-8")
                    yield text
            except _stream_errors() as err:  # gzip/zstd damage shows up while reading
                raise InputError(f"{path}: cannot be read ({err}); check the file is complete") from None

    def _arrow_texts(self, path: Path | HFStream, column) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            for value in column.to_pylist():
                yield "" if value is None else self._decode(value)
            return
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise InputError(
                f"{path}: column '{self.text_key}' has type {column.type}, not text; "
                "pass --text-key with the column that holds the text"
            )
        self.stats.bytes_in += int(pc.sum(pc.binary_length(column)).as_py() or 0)
        for value in column.to_pylist():
            yield "" if value is None else value

    def _check_column(self, path: Path | HFStream, names: list[str]) -> None:
        if self.text_key not in names:
            raise InputError(
                f"{path}: no '{self.text_key}' column (found: {', '.join(names)}); "
                "pass --text-key with the column that holds the text"
            )

    def _read_parquet(self, path: Path) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise InputError(f"{path}: not a readable Parquet file ({err})") from None
        self._check_column(path, parquet.schema_arrow.names)
        batches, rows = parquet.iter_batches(batch_size=_BATCH_ROWS, columns=[self.text_key]), 0
        while True:
            try:  # a damaged page shows up only when its row group is read
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as err:
                raise InputError(
                    f"{path}: damaged Parquet data after row {rows:,} ({str(err).rstrip('.')}); "
                    "re-create or re-download the file"
                ) from None
            rows += batch.num_rows
            yield from self._arrow_texts(path, batch.column(0))

    def _read_hf(self, path: Path) -> Iterator[str]:
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises several types for a damaged folder
            raise InputError(f"{path}: not a readable datasets.save_to_disk folder ({err})") from None
        splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for split in splits:
            self._check_column(path, split.column_names)
            table = split.select_columns([self.text_key]).with_format("arrow")
            for batch in table.iter(batch_size=_BATCH_ROWS):
                yield from self._arrow_texts(path, batch.column(0))

    def _open_stream(self, stream: HFStream):
        dataset = stream.load()
        names = dataset.column_names  # None when datasets learns the columns only by reading
        if names is not None:
            self._check_column(stream, names)
            dataset = dataset.select_columns([self.text_key])  # the other columns are not decoded
        return dataset.with_format("arrow")

    def _read_stream(self, stream: HFStream) -> Iterator[str]:
        batches, rows = self._streams[stream.spec].iter(batch_size=_BATCH_ROWS), 0
        while True:
            try:  # a damaged file, or a lost connection, shows up while reading
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:  # datasets and its builders raise many types
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
                raise InputError(
                    f"{stream}: reading failed after row {rows:,} ({reason}); check the dataset's files "
                    "(or the connection) and run again"
                ) from None
            self._check_column(stream, batch.column_names)
            rows += batch.num_rows
            yield from self._arrow_texts(stream, batch.column(self.text_key))
