"""Outputs apart from inputs: every command that writes a folder refuses one that is, contains, or lies inside a
path it reads, before it reads or writes anything (an export with --overwrite would otherwise delete its own run)."""

from __future__ import annotations

import os
from collections.abc import Iterable
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
