"""Small JSONL inputs of the commands (`evaluate --choices`, `generate --prompt-file`): one JSON value a
line, blank lines skipped, and every fault reported as `FILE:LINE`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from dsllm.errors import UserError


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
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON ({err.msg} at column {err.colno}); fix or remove that line") from None
