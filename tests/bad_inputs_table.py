#!/usr/bin/env python
"""Regenerate README.md's table of bad inputs from tests/unit/test_bad_inputs.py (`make bad-inputs-table`).

Runs the table's cases with DSLLM_BAD_INPUTS_RECORD set, so each case records the line its command
actually printed, and rewrites the README between `<!-- bad-inputs:start -->` and `<!-- bad-inputs:end -->`
(appending the section when the markers are missing). A failing case leaves the README untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"
HEADING = "## Bad inputs and how they are answered"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(records: list[dict]) -> str:
    lines = [
        "Generated from `tests/unit/test_bad_inputs.py` by `make bad-inputs-table`: each row is a test that runs the "
        "command with one bad input and checks it ends with this one line on stderr and exit code 2, with "
        "nothing written.",
        "",
        "| bad input | command | answer (stderr, exit 2) |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(r['input'])} | `{_cell(r['command'])}` | `{_cell(r['answer'])}` |" for r in records]
    return "\n".join(lines)


def rewrite_readme(readme: Path, table: str) -> None:
    text = readme.read_text()
    block = f"{START}\n{table}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}\n"
    readme.write_text(text)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "cases.jsonl"
        env = {**os.environ, "DSLLM_BAD_INPUTS_RECORD": str(record), "DS_ACCELERATOR": "cpu"}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/unit/test_bad_inputs.py",
                "-k",
                "test_bad_input_is_one_line_and_exit_2",
            ],
            cwd=ROOT,
            env=env,
        )
        if proc.returncode != 0:
            print("bad_inputs_table: a case failed; README.md left as it was", file=sys.stderr)
            return 1
        records = [json.loads(line) for line in record.read_text().splitlines()]
    rewrite_readme(ROOT / "README.md", render(records))
    print(f"README.md: {len(records)} bad inputs in the table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
