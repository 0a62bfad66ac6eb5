"""The command line: ``longnet-ref demo | bench | pattern``.

Every error (bad option, bad configuration, a missing optional extra) ends the program with a
one-line message on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from . import complexity
from .attention import dilated_attention, dilated_attention_backward
from .backends import backend_names, backend_spec
from .bench import presets
from .bench.weak_scaling import MpiexecNotFound
from .dense import dense_attention, dense_attention_backward
from .multiplicity import multiplicity, multiplicity_bias

if TYPE_CHECKING:
    from collections.abc import Sequence

DESCRIPTION = "LongNet dilated attention (arXiv 2307.02486): check it, benchmark it, draw its patterns."
FIGURES_DIR = "longnet-ref-figures"

# The optional extra that provides each importable dependency (pyproject.toml).
EXTRAS = {"cupy": "gpu", "numba_cuda": "gpu", "matplotlib": "bench", "tqdm": "bench", "mpi4py": "mpi"}
EXIT_USAGE, EXIT_MISSING_EXTRA, EXIT_FAILED = 2, 3, 1
"""Exit statuses: 2 a bad option or configuration, 3 a missing optional extra (or ``mpiexec``),
1 a demo whose check failed; 0 success."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """``"256,512,1024"`` -> ``[256, 512, 1024]``; anything else is a usage error."""
    parts = text.split(",")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 256,512, got {text!r}") from None
    if any(value <= 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 256,512, got {text!r}")
    return values


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_relative_error(result: np.ndarray, oracle: np.ndarray) -> float:
    """``max |result - oracle| / max |oracle|`` over all elements, the demo's check.

    The denominator is at least the dtype's smallest normal number, so an all-zero oracle gives
    the absolute error divided by it (huge unless ``result`` is zero too).

    Args:
        result: Any shape, float32 or float64.
        oracle: The shape of ``result`` (or broadcastable to it), a float dtype.

    Returns:
        The relative error as a Python ``float``; ``0.0`` for an empty ``oracle``. A NaN in
        either array gives NaN, which fails every ``<=`` tolerance.

    Raises:
        ValueError: The shapes do not broadcast.
    """
    return float(np.abs(result - oracle).max() / max(np.abs(oracle).max(), np.finfo(oracle.dtype).tiny)) if oracle.size else 0.0


def demo(args: argparse.Namespace) -> int:
    """Dilated attention forward + backward, verified against the dense oracle with ``log m`` bias (SPEC §4).

        dilated_attention(Q, K, V) = dense_attention(Q, K, V, bias = log m)

    Prints the attended pairs and FLOPs against dense attention, the times, and the largest
    relative error of ``out``, ``lse``, ``dq``, ``dk``, ``dv`` of each backend; float32 passes
    at ``1e-4``, float64 at ``1e-10``.

    Args:
        args: The parsed ``demo`` options: ``n``, ``batch``, ``heads``, ``dim``,
            ``segment_lengths``, ``dilation_rates``, ``causal``, ``offsets``, ``dtype``,
            ``seed``, ``backend``.

    Returns:
        ``0`` if every error is within the tolerance, else ``EXIT_FAILED`` (1).

    Raises:
        ValueError: The configuration is invalid (SPEC §7); [`main`][longnet_ref.cli.main]
            prints it and exits with status 2.
        ImportError: ``--backend numba`` without Numba; ``main`` exits with status 3.
    """
    w, r = args.segment_lengths, args.dilation_rates
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.n, args.heads, args.dim)  # (B, N, H, D)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    options = dict(causal=args.causal, offsets=args.offsets)

    print(f"longnet_ref demo: B={args.batch} N={args.n} H={args.heads} D={args.dim} w={w} r={r} "
          f"causal={args.causal} offsets={args.offsets} dtype={dtype}")
    backends = [args.backend] + (["numpy"] if args.backend != "numpy" else [])
    timings, results = {}, {}
    for backend in backends:
        if backend == "numba":  # compile (first run only) or load the cached kernels, outside the timing
            from .backends.numba_cpu import warm_up

            seconds = warm_up()  # both dtypes: a later float32 (or float64) call does not compile silently
            print(f"numba kernels (forward and backward, float32 and float64) ready in {seconds:.1f} s "
                  "(compiled on the first run, then loaded from the cache)")
        (out, lse), t_fwd = _timed(lambda: dilated_attention(q, k, v, w, r, return_lse=True, backend=backend, **options))
        grads, t_bwd = _timed(lambda: dilated_attention_backward(dout, q, k, v, out, lse, w, r, backend=backend, **options))
        timings[backend], results[backend] = (t_fwd, t_bwd), (out, lse, *grads)

    bias, t_mult = _timed(lambda: multiplicity_bias(multiplicity(args.n, args.heads, w, r, **options)))
    (out_d, lse_d), t_dfwd = _timed(lambda: dense_attention(q, k, v, causal=args.causal, bias=bias, return_lse=True))
    grads_d, t_dbwd = _timed(lambda: dense_attention_backward(dout, q, k, v, out_d, lse_d, causal=args.causal, bias=bias))
    timings["dense oracle"] = (t_dfwd, t_dbwd)

    sizes = dict(batch=args.batch, causal=args.causal)
    flops = complexity.dilated_flops(args.n, args.heads, args.dim, w, r, offsets=args.offsets, **sizes)
    dense = complexity.dense_flops(args.n, args.heads, args.dim, **sizes)
    pairs = complexity.attended_pairs(args.n, args.heads, w, r, offsets=args.offsets, **sizes)
    dense_pairs = complexity.dense_pairs(args.n, args.heads, **sizes)

    print()
    print(f"{'attended (query, key) pairs':34s}{pairs:>16,d}  (dense: {dense_pairs:,d}, ratio {pairs / dense_pairs:.4f})")
    print(f"{'forward FLOPs (QK^T + PV)':34s}{flops.total:>16,d}  (dense: {dense.total:,d})")
    print()
    print(f"{'time [s]':20s}" + "".join(f"{name:>16s}" for name in timings))
    for i, phase in enumerate(("forward", "backward")):
        print(f"{phase:20s}" + "".join(f"{t[i]:16.3f}" for t in timings.values()))
    base = timings[args.backend]
    print(f"{'speed-up of ' + args.backend:20s}" + "".join(f"{(t[0] + t[1]) / (base[0] + base[1]):15.1f}x" for t in timings.values()))
    print(f"(the multiplicity matrix for the oracle took {t_mult:.3f} s)")
    print()
    # Both sides are computed in `dtype`; sums of at most N terms of rounding eps each.
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    ok = True
    oracle = (out_d, lse_d, *grads_d)
    for backend, values in results.items():
        errors = {name: max_relative_error(x, y) for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), values, oracle)}
        ok &= all(err <= tolerance for err in errors.values())
        print(f"max relative error of {backend} vs dense attention with bias log(multiplicity):")
        print("  " + "  ".join(f"{name}={err:.2e}" for name, err in errors.items()))
    print(f"{'OK' if ok else 'FAILED'}: every error {'<=' if ok else 'not <='} {tolerance:g}")
    return 0 if ok else EXIT_FAILED


class UsageError(Exception):
    """A combination of options that cannot be run; the message says why.

    [`main`][longnet_ref.cli.main] prints it on one line and exits with status 2.
    """


# Options of ``bench`` that only the single-process benchmark reads, with their defaults.
SINGLE_PROCESS_OPTIONS = {
    "preset": list(presets.DEFAULT_PRESETS),
    "max_n": presets.DEFAULT_MAX_N,
    "reference_max_n": presets.REFERENCE_MAX_N,
    "dense_max_n": presets.DENSE_MAX_N,
    "memory": False,
    "output_dir": presets.DEFAULT_OUTPUT_DIR,
}
# Options only ``--distributed`` reads.
DISTRIBUTED_OPTIONS = {"ranks": list(presets.WeakScaling().ranks), "n_per_rank": presets.WeakScaling().n_per_rank}


def _option(name):
    return "--" + name.replace("_", "-")


def bench(args: argparse.Namespace) -> int:
    """Benchmark presets; prints the table and writes JSON + PNG under ``--output-dir``.

    With ``--distributed``, runs [`weak_scaling`][longnet_ref.bench.weak_scaling.weak_scaling]
    instead and prints its table. Options left out are absent from ``args``, so a
    single-process option given with ``--distributed`` (or the reverse) is an error.

    Args:
        args: The parsed ``bench`` options (``argparse.SUPPRESS`` defaults: only those given).

    Returns:
        ``0`` once the table is printed and the files are written.

    Raises:
        UsageError: Options that do not go together, a backend ``--distributed`` cannot use, or
            a ``--max-n`` that excludes every configuration.
        ImportError: The backend's extra (cupy, numba) or mpi4py is not installed.
        MpiexecNotFound: ``--distributed`` and no ``mpiexec`` is installed.
    """
    from . import bench as benchmarks

    given = vars(args)
    backend = given.get("backend", presets.DEFAULT_BACKEND)
    repeats = given.get("repeats", presets.DEFAULT_REPEATS)
    if args.distributed:
        ignored = [_option(name) for name in SINGLE_PROCESS_OPTIONS if name in given]
        if ignored:
            verb = "does" if len(ignored) == 1 else "do"
            raise UsageError(f"{', '.join(ignored)} {verb} not apply to --distributed (weak scaling has its own configuration)")
        if not backend_spec(backend).distributed:
            raise UsageError(f"--distributed runs on the CPU: --backend must be one of {', '.join(backend_names(distributed=True))}")
        import mpi4py  # noqa: F401  (fail early, naming the extra, before any mpiexec is launched)

        setup = replace(presets.WeakScaling(), backend=backend, repeats=repeats,
                        ranks=tuple(given.get("ranks", DISTRIBUTED_OPTIONS["ranks"])),
                        n_per_rank=given.get("n_per_rank", DISTRIBUTED_OPTIONS["n_per_rank"]))
        rows = benchmarks.weak_scaling(setup)
        print(benchmarks.format_weak_scaling(rows, setup))
        return 0
    ignored = [_option(name) for name in DISTRIBUTED_OPTIONS if name in given]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} apply only with --distributed")
    options = {name: given.get(name, default) for name, default in SINGLE_PROCESS_OPTIONS.items()}
    from .backends import get_backend

    get_backend(backend)  # import it now: a missing extra (cupy) is reported before any work
    candidates = [c for name in options["preset"] for c in presets.PRESETS[name]]
    configs = [c for c in candidates if c.n <= options["max_n"]]
    if not configs:
        shortest = min(c.n for c in candidates)
        raise UsageError(f"--max-n {options['max_n']} excludes every configuration of --preset {' '.join(options['preset'])}"
                         f" (the shortest has N = {shortest}); nothing was run or written")
    results = benchmarks.run(
        configs, backend=backend, repeats=repeats, reference_max_n=options["reference_max_n"],
        dense_max_n=options["dense_max_n"], memory=options["memory"],
    )
    print(benchmarks.format_table(results))
    for path in benchmarks.save(results, options["output_dir"]):
        print(f"wrote {path}")
    return 0


def pattern(args: argparse.Namespace) -> int:
    """Draw the documentation's figures from the library, into ``--output-dir``.

    Args:
        args: The parsed ``pattern`` options: ``output_dir``.

    Returns:
        ``0`` once every figure is written (each path is printed).

    Raises:
        ImportError: matplotlib is not installed (the ``bench`` or ``docs`` extra).
    """
    from .figures import generate

    for path in generate(args.output_dir):
        print(f"wrote {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longnet-ref", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench,pattern,train,generate}")
    with_defaults = dict(formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    p = sub.add_parser("demo", help="forward + backward of dilated attention, checked against dense attention",
                       description="Run dilated attention forward and backward on random inputs, time it, and check it "
                                   "against dense attention with bias log(multiplicity).", **with_defaults)
    p.add_argument("--n", type=_positive_int, default=4096, help="sequence length N")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size B")
    p.add_argument("--heads", type=_positive_int, default=4, help="number of heads H")
    p.add_argument("--dim", type=_positive_int, default=32, help="head dimension D")
    p.add_argument("--segment-lengths", type=_int_list, default=[256, 512, 1024], metavar="W1,W2,...",
                   help="segment length w_i of each branch, comma-separated")
    p.add_argument("--dilation-rates", type=_int_list, default=[1, 2, 4], metavar="R1,R2,...",
                   help="dilation r_i of each branch, comma-separated (as many as segment lengths)")
    p.add_argument("--causal", action="store_true", help="causal attention: keys at positions <= the query's only")
    p.add_argument("--offsets", choices=["paper", "torchscale"], default="paper",
                   help="head offsets: paper (h mod r) or torchscale (contiguous blocks of heads)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="floating-point type of the inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--backend", choices=["numba", "numpy"], default="numba", help="the backend checked and timed")
    p.set_defaults(func=demo)

    # bench: defaults live in longnet_ref.bench.presets; an option left out is absent from the
    # parsed namespace (SUPPRESS), so bench() can tell which options the user gave.
    weak = presets.WeakScaling()
    p = sub.add_parser("bench", argument_default=argparse.SUPPRESS,
                       help="benchmarks: GFLOP/s vs this machine's GEMM rate, speed-ups vs numpy and dense",
                       description="Time dilated attention on preset configurations (or, with --distributed, MPI weak "
                                   "scaling) and write a table, results.json and plots.")
    p.add_argument("--preset", nargs="+", choices=list(presets.PRESETS),
                   help=f"configurations to run (default: {' '.join(presets.DEFAULT_PRESETS)})")
    p.add_argument("--backend", choices=backend_names(),
                   help=f"backend to time; cupy needs the gpu extra (default: {presets.DEFAULT_BACKEND})")
    p.add_argument("--repeats", type=_positive_int, help=f"runs per measurement, median reported (default: {presets.DEFAULT_REPEATS})")
    p.add_argument("--max-n", type=_positive_int, help=f"skip configurations longer than this (default: {presets.DEFAULT_MAX_N})")
    p.add_argument("--reference-max-n", type=_non_negative_int,
                   help=f"time the NumPy reference up to this N; 0: never (default: {presets.REFERENCE_MAX_N})")
    p.add_argument("--dense-max-n", type=_non_negative_int,
                   help=f"time dense attention up to this N; 0: never (default: {presets.DENSE_MAX_N})")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, in a fresh subprocess (default: off)")
    p.add_argument("--output-dir", help=f"where results.json and the plots go (default: {presets.DEFAULT_OUTPUT_DIR})")
    p.add_argument("--distributed", action="store_true", default=False,
                   help="MPI weak scaling instead (N per rank fixed, over --ranks; needs the mpi extra). "
                        "Honours --backend (numba or numpy) and --repeats (default: off)")
    p.add_argument("--ranks", type=_positive_int, nargs="+",
                   help=f"with --distributed: numbers of MPI ranks (default: {' '.join(map(str, weak.ranks))})")
    p.add_argument("--n-per-rank", type=_positive_int, help=f"with --distributed: rows per rank (default: {weak.n_per_rank})")
    p.set_defaults(func=bench)

    p = sub.add_parser("pattern", help="draw the attention-pattern, multiplicity, FLOPs and path-length figures",
                       description="Draw the documentation's figures from the library (needs matplotlib: the bench or "
                                   "docs extra). They go to --output-dir, relative to the current directory; to redraw "
                                   "the docs' figures, run it from the project root with --output-dir docs/figures.",
                       **with_defaults)
    p.add_argument("--output-dir", default=FIGURES_DIR, help="directory for the PNG files (created if missing)")
    p.set_defaults(func=pattern)

    p = sub.add_parser("train", help="train a small LongNet language model (passkey task or --text FILE)", **with_defaults)
    from . import train

    train.add_arguments(p)
    p.set_defaults(func=train.run)
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint, token by token through KV caches",
                       **with_defaults)
    from . import generate

    generate.add_arguments(p)
    p.set_defaults(func=generate.run)

    return parser


def _missing_extra(error: ImportError) -> str:
    if "pip install" in str(error):  # the message already names what to install
        return str(error)
    module = (error.name or "").split(".")[0]
    extra = EXTRAS.get(module)
    if extra is None:
        return f"a required module is missing: {error}"
    return f'this command needs {module}: pip install "longnet-ref[{extra}]"'


def main(argv: Sequence[str] | None = None) -> int:
    """The ``longnet-ref`` entry point: parse ``argv``, run the subcommand, map errors to exit statuses.

    Args:
        argv: The arguments after the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        The exit status: the subcommand's (0, or 1 for a failed demo check), ``EXIT_USAGE`` (2)
        for a ``UsageError``, ``ValueError`` or ``TypeError``, ``EXIT_MISSING_EXTRA`` (3) for a
        missing extra or ``mpiexec``; each error is one line on stderr, no traceback.

    Raises:
        SystemExit: From argparse, for ``--help`` (status 0) or an unknown or malformed option
            (status 2, with the usage line).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError) as error:  # incl. bad configurations named by the library (SPEC §7)
        print(f"longnet-ref {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as error:
        print(f"longnet-ref {args.command}: error: {_missing_extra(error)}", file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except MpiexecNotFound as error:
        print(f"longnet-ref {args.command}: error: {error}", file=sys.stderr)
        return EXIT_MISSING_EXTRA


if __name__ == "__main__":
    sys.exit(main())
