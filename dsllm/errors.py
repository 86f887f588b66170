"""One exception type for user errors, and the command-line wrapper that prints it in one line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's input: the message names the file or field and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's own line breaks and ends each option's line of meaning with its
    default, when it has one worth saying (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or default == []
            or not action.option_strings
            or isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction))
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit 2), like every other user error, and
    `--help` shows each option's default (HelpFormatter)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        if _is_main_rank():  # under a launcher every rank parses the same command line: one line, from rank 0
            sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(USER_ERROR_EXIT)


def positive(text: str) -> int:
    """argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be 1 or more")
    return value


def finite(text: str) -> float:
    """argparse type: a number that is not nan or infinite."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; a UserError becomes one line on stderr and exit 2 (said once: by rank 0 when a
    launcher started one process per rank). Tracebacks are for bugs."""
    try:
        return int(main(argv) or 0)
    except UserError as err:
        if _is_main_rank():
            sys.stderr.write(f"error: {err}\n")
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:  # `dsllm plan --json | head`: the reader left; no traceback at exit either
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command cut off by its pipe


def _is_main_rank() -> bool:
    from dsllm.world import World

    return World.from_env().is_main
