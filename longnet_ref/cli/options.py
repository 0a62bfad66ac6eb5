"""What every subcommand shares: option types, the help format, one-line usage errors, output paths.

Every check here runs while the options are parsed or before a command does any work, so a
mistake costs nothing: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_EXTRA, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 3, 70, 130
"""Exit statuses: 1 a demo whose check failed, 2 a bad option, configuration or file, 3 a missing
optional extra (or ``mpiexec``), 70 a bug (an unexpected exception: please report it), 130
interrupted by Ctrl-C; 0 success."""


class UsageError(Exception):
    """A combination of options that cannot be run; the message says why.

    [`main`][longnet_ref.cli.main] prints it on one line and exits with status 2.
    """


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line: ``longnet-ref train: error: ... (see --help)``.

    Options are named in full (``allow_abbrev=False``): argparse would otherwise read ``bench --n 5``
    as ``--n-per-rank 5`` and report an option the user never typed.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default once, as ``(default: X)``.

    Not for an option whose help already says its default, a required option, a flag (off unless
    given) or a default of ``None`` (the help says what leaving the option out means). A
    description of one paragraph is wrapped; one with line breaks (examples) is kept as written.
    """

    def _fill_text(self, text, width, indent):
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "(default" in text or action.required or default in (None, argparse.SUPPRESS) or isinstance(default, bool) or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if action.type is int_list:
            shown = ",".join(map(str, default))
        return f"{text} (default: {shown})"


# ---- option types: each names what it expects; argparse prefixes the option ---------------------


LARGEST_INT = 2**63 - 1
"""Integers must fit NumPy's int64 (sizes, counts and seeds are used as array indices and shapes)."""


def _integer(text: str, what: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if value > LARGEST_INT:
        raise argparse.ArgumentTypeError(f"expected {what} below 2**63, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, "a positive integer", 1)


def non_negative_int(text: str) -> int:
    return _integer(text, "a non-negative integer", 0)


def int_list(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``; anything else is a usage error."""
    what = "comma-separated positive integers such as 256,512"
    return [_integer(part, what, 1) for part in text.split(",")]


def _number(text: str, what: str, accept) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _number(text, "a finite number > 0", lambda x: x > 0)


def non_negative_float(text: str) -> float:
    return _number(text, "a finite number >= 0", lambda x: x >= 0)


def fraction_below_one(text: str) -> float:
    return _number(text, "a number in [0, 1)", lambda x: 0 <= x < 1)


# ---- files and directories: checked before any work, created only when written ----------------


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path, option: str) -> Path:
    """``path`` can be a directory we write into: it is one, or can be created. Nothing is created.

    Raises:
        UsageError: ``path`` is an existing file, lies under a file, or is not writable.
    """
    if not str(path):
        raise UsageError(f"{option} must not be empty")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path}: exists and is not a directory")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"{option} {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {existing} is not writable")
    return path


def make_output_dir(path: Path, option: str) -> Path:
    """Create the directory checked by :func:`check_output_dir` (the file system may still refuse)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot create it ({error.strerror or error})") from None
    return path


def check_input_file(path, option: str) -> Path:
    """``path`` is an existing, readable file (not a directory)."""
    if not str(path):
        raise UsageError(f"{option} must not be empty")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{option} {path}: does not exist")
    if path.is_dir():
        raise UsageError(f"{option} {path}: is a directory, not a file")
    if not path.is_file():
        raise UsageError(f"{option} {path}: is not a regular file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path}: not readable")
    return path
