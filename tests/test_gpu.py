"""``backend="cupy"`` on a real GPU against the NumPy reference (``pytest -m gpu``).

Skipped, with the reason shown by ``-ra``, where CuPy or a CUDA device is missing (as in CI).
"""

import numpy as np
import pytest
from hypothesis import given, settings

from longnet_ref import dilated_attention, dilated_attention_backward

from .strategies import Problem, problems
from .test_numba_backend import AGREEMENT


def _gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0, "no CUDA device visible to CuPy"
    except Exception as error:  # ImportError, or CUDA driver errors
        return False, f"CuPy or the CUDA driver is unavailable: {error.__class__.__name__}: {error}"


AVAILABLE, REASON = _gpu_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=REASON)]


def assert_gpu_agrees(problem):
    import cupy

    q, k, v, dout = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    expected = (out, lse, *dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, **problem.options))
    gq, gk, gv, gdout = (cupy.asarray(x) for x in problem.arrays)
    gout, glse = dilated_attention(gq, gk, gv, *problem.branches, return_lse=True, backend="cupy", **problem.options)
    assert isinstance(gout, cupy.ndarray) and isinstance(glse, cupy.ndarray)
    grads = dilated_attention_backward(gdout, gq, gk, gv, gout, glse, *problem.branches, backend="cupy", **problem.options)
    assert all(isinstance(g, cupy.ndarray) for g in grads)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (gout, glse, *grads), expected):
        np.testing.assert_allclose(cupy.asnumpy(got), want, err_msg=name, **AGREEMENT[problem.dtype])


@settings(max_examples=100, deadline=None)
@given(problems())
def test_cupy_agrees_with_the_reference_on_the_spec_problems(problem):
    assert_gpu_agrees(problem)


@settings(max_examples=20, deadline=None)
@given(problems(max_n=2000, max_heads=4, max_dim=64, max_branches=3, max_segment=2500, max_dilation=5))
def test_cupy_agrees_with_the_reference_on_long_segments(problem):
    assert_gpu_agrees(problem)


def test_cupy_paper_configuration():
    problem = Problem(1, 8192, 8, 64, 64, [1024, 2048, 4096, 8192], [1, 2, 4, 8], True, "paper", np.dtype(np.float32), seed=4)
    assert_gpu_agrees(problem)
