"""``longnet-ref bench``: timings of preset configurations, or MPI weak scaling."""

from __future__ import annotations

import argparse
from dataclasses import replace

from ..backends import backend_names, backend_spec
from ..bench import presets
from .options import (
    UsageError,
    check_output_dir,
    make_output_dir,
    non_negative_int,
    positive_int,
)

HELP = "benchmarks: GFLOP/s vs this machine's GEMM rate, speed-ups vs numpy and dense"
DESCRIPTION = "Time dilated attention on preset configurations (or, with --distributed, MPI weak scaling) and write a table, results.json and plots."


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


def run(args: argparse.Namespace) -> int:
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
    from .. import bench as benchmarks

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

        setup = replace(
            presets.WeakScaling(),
            backend=backend,
            repeats=repeats,
            ranks=tuple(given.get("ranks", DISTRIBUTED_OPTIONS["ranks"])),
            n_per_rank=given.get("n_per_rank", DISTRIBUTED_OPTIONS["n_per_rank"]),
        )
        rows = benchmarks.weak_scaling(setup)
        print(benchmarks.format_weak_scaling(rows, setup))
        return 0
    ignored = [_option(name) for name in DISTRIBUTED_OPTIONS if name in given]
    if ignored:
        raise UsageError(f"{', '.join(ignored)} {'apply' if len(ignored) > 1 else 'applies'} only with --distributed")
    options = {name: given.get(name, default) for name, default in SINGLE_PROCESS_OPTIONS.items()}
    output_dir = check_output_dir(options["output_dir"], "--output-dir")  # before the benchmark, not after
    from ..backends import get_backend

    get_backend(backend)  # import it now: a missing extra (cupy) is reported before any work
    candidates = [c for name in options["preset"] for c in presets.PRESETS[name]]
    configs = [c for c in candidates if c.n <= options["max_n"]]
    if not configs:
        shortest = min(c.n for c in candidates)
        raise UsageError(
            f"--max-n {options['max_n']} excludes every configuration of --preset {' '.join(options['preset'])}"
            f" (the shortest has N = {shortest}); nothing was run or written"
        )
    make_output_dir(output_dir, "--output-dir")  # before the benchmark: its results must have somewhere to go
    results = benchmarks.run(
        configs,
        backend=backend,
        repeats=repeats,
        reference_max_n=options["reference_max_n"],
        dense_max_n=options["dense_max_n"],
        memory=options["memory"],
    )
    print(benchmarks.format_table(results))
    for path in benchmarks.save(results, output_dir):
        print(f"wrote {path}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options; defaults live in ``longnet_ref.bench.presets``, and an option left out is absent
    from the parsed namespace (``argument_default=SUPPRESS``), so ``run`` can tell which were given."""
    weak = presets.WeakScaling()
    p.add_argument("--preset", nargs="+", choices=list(presets.PRESETS), help=f"configurations to run (default: {' '.join(presets.DEFAULT_PRESETS)})")
    p.add_argument("--backend", choices=backend_names(), help=f"backend to time; cupy needs the gpu extra (default: {presets.DEFAULT_BACKEND})")
    p.add_argument("--repeats", type=positive_int, help=f"runs per measurement, median reported (default: {presets.DEFAULT_REPEATS})")
    p.add_argument("--max-n", type=positive_int, help=f"skip configurations longer than this (default: {presets.DEFAULT_MAX_N})")
    p.add_argument("--reference-max-n", type=non_negative_int, help=f"time the NumPy reference up to this N; 0: never (default: {presets.REFERENCE_MAX_N})")
    p.add_argument("--dense-max-n", type=non_negative_int, help=f"time dense attention up to this N; 0: never (default: {presets.DENSE_MAX_N})")
    p.add_argument("--memory", action="store_true", help="also measure peak memory, in a fresh subprocess (default: off)")
    p.add_argument("--output-dir", help=f"where results.json and the plots go (default: {presets.DEFAULT_OUTPUT_DIR})")
    p.add_argument(
        "--distributed",
        action="store_true",
        default=False,
        help="MPI weak scaling instead (N per rank fixed, over --ranks; needs the mpi extra). Honours --backend (numba or numpy) and --repeats (default: off)",
    )
    p.add_argument("--ranks", type=positive_int, nargs="+", help=f"with --distributed: numbers of MPI ranks (default: {' '.join(map(str, weak.ranks))})")
    p.add_argument("--n-per-rank", type=positive_int, help=f"with --distributed: rows per rank (default: {weak.n_per_rank})")
