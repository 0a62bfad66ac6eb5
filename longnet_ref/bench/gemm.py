"""This machine's matrix-multiply rate, measured in the same run as the attention it calibrates.

Also the two device helpers every timing shares: put an array on the benchmarked device, and
time a call from a synchronised start to a synchronised end.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..backends import backend_spec, to_backend_arrays

if TYPE_CHECKING:
    from collections.abc import Callable

    from numpy.typing import DTypeLike


def seconds(fn: Callable[[], Any], backend: str = "numba") -> float:
    """Wall time of ``fn()``; for the GPU, from a synchronised start to a synchronised end.

    Args:
        fn: The call to time, no arguments; its result is discarded.
        backend: a GPU backend synchronises the current GPU before and after; any other backend
            times the call alone.

    Returns:
        Elapsed seconds (``time.perf_counter``).

    Raises:
        ImportError: ``backend="cupy"`` and CuPy is not installed.
        Exception: Whatever ``fn`` raises, unchanged.
    """
    if backend_spec(backend).device == "gpu":
        import cupy

        sync = cupy.cuda.Device().synchronize
    else:
        sync = lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


@functools.lru_cache(maxsize=4)
def _gemm_operands(dtype, size, backend):
    """Made once: the timing loop measures the GEMM rate before every repeat."""
    rng = np.random.default_rng(0)
    return tuple(to_backend_arrays(rng.standard_normal((size, size)).astype(dtype), backend) for _ in range(2))


def gemm_gflops(dtype: DTypeLike, size: int = 2048, repeats: int = 5, backend: str = "numba") -> float:
    """The matrix-multiply rate now: best of ``repeats`` square products (on the GPU for cupy).

        rate = 2 size^3 / min_t / 1e9   GFLOP/s

    A product of two ``size x size`` matrices is ``2 size^3`` FLOPs. The operands are made
    once per ``(dtype, size, backend)`` and cached.

    Args:
        dtype: The operands' dtype, e.g. ``"float32"`` or ``np.float64``.
        size: The matrices' side on the CPU; the GPU always uses 8192 to reach its rate.
        repeats: Products timed after one warm-up; the fastest counts.
        backend: ``"cupy"`` for the GPU; any other backend for NumPy's BLAS on the CPU.

    Returns:
        The rate in GFLOP/s.

    Raises:
        ImportError: ``backend="cupy"`` and CuPy is not installed.
        TypeError: ``dtype`` is not a NumPy dtype.
    """
    size = 8192 if backend_spec(backend).device == "gpu" else size  # a GPU needs a larger product to reach its rate
    a, b = _gemm_operands(np.dtype(dtype), size, backend)
    a @ b  # warm-up: BLAS threads, GPU context
    best = min(seconds(lambda: a @ b, backend) for _ in range(repeats))
    return 2 * size**3 / best / 1e9
