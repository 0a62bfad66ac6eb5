"""``longnet-ref pattern``: draw the documentation's figures from the library."""

from __future__ import annotations

import argparse

from .options import check_output_dir, make_output_dir

FIGURES_DIR = "longnet-ref-figures"
HELP = "draw the attention-pattern, multiplicity, FLOPs and path-length figures"
DESCRIPTION = (
    "Draw the documentation's figures from the library (needs matplotlib: the bench or docs extra). They "
    "go to --output-dir, relative to the current directory; to redraw the docs' figures, run it from the "
    "project root with --output-dir docs/figures."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default=FIGURES_DIR, help="directory for the PNG files (created if missing)")


def run(args: argparse.Namespace) -> int:
    """Draw the documentation's figures from the library, into ``--output-dir``.

    Args:
        args: The parsed ``pattern`` options: ``output_dir``.

    Returns:
        ``0`` once every figure is written (each path is printed).

    Raises:
        UsageError: ``--output-dir`` is a file or cannot be created.
        ImportError: matplotlib is not installed (the ``bench`` or ``docs`` extra).
    """
    output_dir = check_output_dir(args.output_dir, "--output-dir")
    import matplotlib  # noqa: F401  (a missing extra is named before the directory is made)

    from ..figures import generate

    for path in generate(make_output_dir(output_dir, "--output-dir")):
        print(f"wrote {path}")
    return 0
