"""Benchmarks of ``longnet-ref bench``: every figure is a ratio to something measured in the same run.

These machines are shared and noisy, so a time alone means little. One module per concern:

- ``presets``:      the benchmarked configurations and the defaults of every option,
- ``gemm``:         this machine's matrix-multiply rate, and timing on the CPU or GPU,
- ``timing``:       the timing loop: forward and forward+backward, fraction of GEMM, speed-ups
                    over the NumPy reference and dense attention,
- ``memory``:       peak memory, measured in a fresh process,
- ``report``:       the printed tables, ``results.json`` and the plots,
- ``weak_scaling``: the distributed benchmark, a module run under mpiexec.

Docs: ``docs/numba.md`` (results) and ``docs/complexity.md``.
"""

from .gemm import gemm_gflops
from .presets import PRESETS, Config, WeakScaling
from .report import format_table, format_weak_scaling, save
from .timing import BACKWARD_FLOP_FACTOR, Result, run
from .weak_scaling import weak_scaling

__all__ = [
    "BACKWARD_FLOP_FACTOR",
    "PRESETS",
    "Config",
    "Result",
    "WeakScaling",
    "format_table",
    "format_weak_scaling",
    "gemm_gflops",
    "run",
    "save",
    "weak_scaling",
]
