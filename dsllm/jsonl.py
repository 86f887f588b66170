"""Small JSONL inputs of the commands (`evaluate --choices`, `generate --prompt-file`): one JSON value a
line, blank lines skipped, and every fault reported as `FILE:LINE`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from dsllm.errors import UserError


def parse_line(line: str, where: str, error: type[UserError] = UserError) -> object:
    """One JSON value from one line, every fault as `error("FILE:LINE: ...")`: malformed JSON, nesting deeper
    than Python's recursion limit, an integer longer than Python's int-string limit (4300 digits)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise error(f"{where}: malformed JSON ({err.msg} at column {err.colno}); fix or remove that line") from None
    except RecursionError:
        raise error(
            f"{where}: JSON nested too deeply for Python's parser (over {sys.getrecursionlimit()} levels); "
            "flatten or remove that line"
        ) from None
    except ValueError as err:  # int("9" * 5000): "Exceeds the limit (4300 digits) for integer string conversion"
        raise error(
            f"{where}: a number too long to parse ({str(err).split(':')[0]}); write it as a string or remove that line"
        ) from None


def read_jsonl(path: str | os.PathLike, option: str) -> Iterator[tuple[str, object]]:
    """(`FILE:LINE`, parsed value) for each non-blank line; `option` names the flag in the errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{option} {path}: no such file")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: not UTF-8 (byte {err.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            yield where, parse_line(line, where)
