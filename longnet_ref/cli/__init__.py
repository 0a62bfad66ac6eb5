"""The command line: ``longnet-ref demo | bench | pattern | train | generate``.

Each subcommand is a module of this package with ``HELP`` (its line in ``longnet-ref --help``),
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> exit status``; ``COMMANDS`` lists
them, so a new command is a module and a line. Every error (bad option, bad configuration, bad
file, a missing optional extra, even a bug) ends the program with a one-line message on stderr
and a non-zero exit status, never a traceback. The library never imports this package.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING

from .. import __version__
from ..backends import install_hint
from ..bench.weak_scaling import MpiexecNotFound
from . import bench, check, demo, generate, pattern, train
from .options import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_MISSING_EXTRA,
    EXIT_USAGE,
    HelpFormatter,
    Parser,
    UsageError,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["COMMANDS", "EXIT_FAILED", "EXIT_INTERNAL", "EXIT_MISSING_EXTRA", "EXIT_USAGE", "UsageError", "main"]

DESCRIPTION = "LongNet dilated attention (arXiv 2307.02486): check it, benchmark it, draw its patterns, train and run a model."
COMMANDS = {"demo": demo, "bench": bench, "pattern": pattern, "train": train, "generate": generate, "check": check}
"""Subcommand name -> its module (``HELP``, ``DESCRIPTION``, ``add_arguments``, ``run``)."""
PARSER_OPTIONS = {"bench": {"argument_default": argparse.SUPPRESS}}
"""Extra ``add_parser`` arguments: ``bench`` tells the options given from those left out."""

# The optional extra that provides each importable dependency (pyproject.toml).
EXTRAS = {"cupy": "gpu", "numba_cuda": "gpu", "matplotlib": "bench", "tqdm": "bench", "mpi4py": "mpi"}


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``longnet-ref`` parser and each subcommand's parser (by name)."""
    parser = Parser(prog="longnet-ref", description=DESCRIPTION)
    commands = {}
    parser.add_argument("--version", action="version", version=f"longnet-ref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION, formatter_class=HelpFormatter, **PARSER_OPTIONS.get(name, {}))
        command.add_arguments(p)
        p.set_defaults(run=command.run)
        commands[name] = p
    return parser, commands


def _missing_extra(error: ImportError) -> str:
    module = (error.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    text = _one_line(error)
    named = re.search(r"longnet-ref\[(\w+)\]", text)
    if named:  # the library's message names the extra: add the form that works in a clone
        return text if 'pip install ".[' in text else f'{text} (in a clone of the repository: pip install ".[{named.group(1)}]")'
    if extra is None:
        return f"a required module is missing: {error} (reinstall longnet-ref: pip install longnet-ref, or pip install . in a source checkout)"
    return f"this command needs {module}: {install_hint(extra)}"


def _one_line(text) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """The ``longnet-ref`` entry point: parse ``argv``, run the subcommand, map errors to exit statuses.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: the subcommand's (0, or 1 for a failed demo check), ``EXIT_USAGE`` (2)
        for a ``UsageError``, ``ValueError`` or ``TypeError`` (a bad option, configuration or
        file), ``EXIT_MISSING_EXTRA`` (3) for a missing extra or ``mpiexec``, 130 for Ctrl-C and
        ``EXIT_INTERNAL`` (70) for anything unexpected (a bug: the message asks to report it);
        each error is one line on stderr, no traceback.

    Raises:
        SystemExit: From argparse, for ``--help`` (status 0) or an unknown or malformed option
            (status 2, one line).
    """
    parser, commands = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand's parser: its name, and the help that lists its options
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    prefix = f"longnet-ref {args.command}: error:"
    try:
        return args.run(args)
    except (UsageError, ValueError, TypeError) as error:  # incl. bad configurations named by the library (SPEC §7)
        message, status = _one_line(error), EXIT_USAGE
    except ImportError as error:
        message, status = _missing_extra(error), EXIT_MISSING_EXTRA
    except MpiexecNotFound as error:
        message, status = _one_line(error), EXIT_MISSING_EXTRA
    except MemoryError:
        message, status = "out of memory (lower the sizes: --n, --batch, ...)", EXIT_USAGE
    except KeyboardInterrupt:
        message, status = "interrupted", EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `longnet-ref generate ... | head -c 100`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as error:
        message, status = _one_line(f"{error.strerror or error}: {error.filename}" if error.filename else error), EXIT_USAGE
    except Exception as error:  # noqa: BLE001 (a bug: one line and where to report it, still no traceback)
        message = f"unexpected {type(error).__name__}: {_one_line(error)} (a bug in longnet-ref: please report it with the command line that caused it)"
        status = EXIT_INTERNAL
    try:
        sys.stdout.flush()
    except OSError:
        pass
    print(f"{prefix} {message}", file=sys.stderr)
    return status
