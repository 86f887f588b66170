"""Outputs apart from inputs: every command that writes a folder refuses one that is, contains, or lies inside a
path it reads, before it reads or writes anything (an export with --overwrite would otherwise delete its own run)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from dsllm.errors import UserError


def real_path(path: str | os.PathLike) -> Path:
    """Absolute, with every symlink of the existing part resolved (the rest need not exist yet)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_output_apart(
    output: str | os.PathLike, output_flag: str, inputs: Iterable[tuple[str, str | os.PathLike]]
) -> None:
    """UserError when `output` is, contains or lies inside one of the (flag, path) inputs, symlinks resolved."""
    target = real_path(output)
    clashes = []
    for flag, path in inputs:
        source = real_path(path)
        if target == source:
            clashes.append((0, "is", flag, path, source))
        elif source in target.parents:
            clashes.append((1, "lies inside", flag, path, source))
        elif target in source.parents:
            clashes.append((2, "contains", flag, path, source))
    if clashes:  # the closest one names the problem best
        _, relation, flag, path, source = min(clashes, key=lambda clash: clash[0])
        resolved = (
            " (symlinks resolved)"
            if (target, source) != (Path(os.path.abspath(output)), Path(os.path.abspath(path)))
            else ""
        )
        raise UserError(
            f"{output_flag} {output} {relation} {path}{resolved}, which {flag} reads: an output must not "
            f"overlap an input; choose another {output_flag}"
        )


@contextlib.contextmanager
def staged_folder(output: str | os.PathLike, overwrite: bool, flag: str = "--output") -> Iterator[Path]:
    """A new folder written whole or not at all: refuses `output` when it is a file, or a folder with files in it
    (unless `overwrite`), before anything is written; yields a hidden staging folder beside it, and renames that to
    `output` when the block ends without an error (removed otherwise: an old `output` is untouched)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"{output}: exists and is not a folder; choose another {flag}")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise UserError(f"{output}: exists and is not empty; pass --overwrite to replace it or choose another {flag}")
    stage = output.with_name(f".{output.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
        if output.exists():
            shutil.rmtree(output)
        os.replace(stage, output)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
