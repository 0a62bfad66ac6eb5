"""``longnet-ref check MODULE:FUNCTION``: the conformance kit (``longnet_ref.conformance``) on an implementation.

Exit 0 when conformant, 1 when not (the table names the sections and minimal counterexamples),
2 on a usage error (bad import path, not callable, unknown option): one line, no traceback.
Docs: ``docs/conformance.md``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .options import UsageError, positive_int

EXIT_NOT_CONFORMANT = 1
HELP = "check an implementation of dilated attention against the spec, section by section"
DESCRIPTION = (
    "Run the conformance kit (longnet_ref.conformance) on FUNCTION: exit 0 when conformant, 1 when not "
    "(the table names the sections and minimal counterexamples), 2 on a usage error."
)


def _import_callable(path: str, option: str):
    """``"package.module:function"`` -> the function; a ``UsageError`` naming ``option`` otherwise."""
    import importlib
    import os

    if os.getcwd() not in sys.path:  # like `python -m`: the user's own modules, where they run it
        sys.path.insert(0, os.getcwd())
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{option} must be MODULE:FUNCTION, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 (any failure to import is the user's path)
        raise UsageError(f"{option}: cannot import {module_name!r}: {type(error).__name__}: {error}") from None
    target = module
    for name in attribute.split("."):
        if not hasattr(target, name):
            raise UsageError(f"{option}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, name)
    if not callable(target):
        raise UsageError(f"{option}: {path} is not callable ({type(target).__name__})")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``longnet-ref check`` (see ``docs/conformance.md``)."""
    parser.add_argument("forward", metavar="MODULE:FUNCTION", help="forward(q, k, v, segment_lengths, dilation_rates, *, causal) -> out (B, N, H, Dv)")
    parser.add_argument(
        "--backward",
        metavar="MODULE:FUNCTION",
        help="backward(dout, q, k, v, segment_lengths, dilation_rates, *, causal) -> (dq, dk, dv); "
        "without it torch/jax autodiff is checked, and numpy/cupy skip the gradient",
    )
    parser.add_argument("--framework", choices=["numpy", "torch", "jax", "cupy"], default="numpy", help="the arrays the functions take and return")
    parser.add_argument("--offsets", choices=["paper", "torchscale"], default="paper", help="the head-offset rule claimed")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both", help="which causal settings to check")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="dtype of the inputs")
    parser.add_argument("--examples", type=positive_int, default=100, help="configurations drawn per spec section")
    parser.add_argument("--seed", type=int, default=None, help="seed of the run (default: random, printed)")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")


def run(args: argparse.Namespace) -> int:
    """Run the kit; print the table and the minimal counterexamples; 0 conformant, 1 not."""
    from ..conformance import check

    forward = _import_callable(args.forward, "MODULE:FUNCTION")
    backward = _import_callable(args.backward, "--backward") if args.backward else None
    if args.json:  # checked before the run, so a report is never lost to a bad path
        target = os.path.abspath(args.json)
        if os.path.isdir(target) or not os.path.isdir(os.path.dirname(target)) or not os.access(os.path.dirname(target), os.W_OK):
            raise UsageError(f"--json {args.json!r} is not a file that can be written (a directory, or its folder is missing or read-only)")
    causal = {"both": None, "yes": True, "no": False}[args.causal]
    report = check(
        forward, backward, offsets=args.offsets, causal=causal, dtype=args.dtype, max_examples=args.examples, seed=args.seed, framework=args.framework
    )
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            file.write(report.to_json(indent=2) + "\n")
    return 0 if report.ok else EXIT_NOT_CONFORMANT
