"""This machine's matrix-multiply rate, measured in the same run as the attention it calibrates.

Also the two device helpers every timing shares: put an array on the benchmarked device, and
time a call from a synchronised start to a synchronised end.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from ..backends import GPU_BACKENDS


def to_device(x, backend):
    """``x`` as a CuPy array for the GPU backends (``"cupy"``, ``"cupy-fused"``), unchanged otherwise."""
    if backend not in GPU_BACKENDS:
        return x
    import cupy

    return cupy.asarray(x)


def seconds(fn, backend="numba") -> float:
    """Wall time of ``fn()``; for the GPU, from a synchronised start to a synchronised end."""
    if backend in GPU_BACKENDS:
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
    return tuple(to_device(rng.standard_normal((size, size)).astype(dtype), backend) for _ in range(2))


def gemm_gflops(dtype, size=2048, repeats=5, backend="numba") -> float:
    """The matrix-multiply rate now: best of ``repeats`` square products (on the GPU for cupy).

    A product of two ``size x size`` matrices is ``2 size^3`` FLOPs.
    """
    size = 8192 if backend in GPU_BACKENDS else size  # a GPU needs a larger product to reach its rate
    a, b = _gemm_operands(np.dtype(dtype), size, backend)
    a @ b  # warm-up: BLAS threads, GPU context
    best = min(seconds(lambda: a @ b, backend) for _ in range(repeats))
    return 2 * size**3 / best / 1e9
