"""Both GPU paths on a real GPU against the NumPy reference (``pytest -m gpu``).

``backend="cupy"`` is the reference itself on CuPy arrays (cuBLAS GEMMs per sparse segment);
``backend="cupy-fused"`` the Numba-CUDA kernels specialised per ``(dtype, D, Dv)``. Skipped,
with the reason shown by ``-ra``, only where CuPy is not installed or CUDA reports no device
(or no driver) — as in CI. Any other failure (a broken CuPy, a kernel that does not compile)
fails the tests.
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dilated_attention, dilated_attention_backward
from longnet_ref.backends import backend_names

from .strategies import Problem, problems
from .tolerances import GPU, HALF_ROUNDING

AGREEMENT = GPU  # tests/tolerances.py

NO_DEVICE = {100: "cudaErrorNoDevice", 35: "cudaErrorInsufficientDriver"}  # CUDA runtime status codes


def _gpu_available():
    try:
        import cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as error:
        if error.status in NO_DEVICE:
            return False, f"no CUDA device or driver ({NO_DEVICE[error.status]})"
        raise
    return count > 0, "no CUDA device visible to CuPy"


AVAILABLE, REASON = _gpu_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=REASON)]
GPU_BACKENDS = backend_names(device="gpu")  # "cupy", "cupy-fused": the registry's GPU entries
# Head dims the fused kernels are compiled for here: each (dtype, D, Dv) is one compile, so the
# draws reuse a few; (64, 64) is the paper's, (3, 5) an odd small pair with D != Dv.
KERNEL_DIMS = [(3, 5), (64, 64)]


@st.composite
def gpu_problems(draw, **bounds):
    problem = draw(problems(**bounds))
    dim, value_dim = draw(st.sampled_from(KERNEL_DIMS))
    return dataclasses.replace(problem, head_dim=dim, value_dim=value_dim)


def reference_results(problem):
    """out, lse, dq, dk, dv of the NumPy reference (float64 for half inputs)."""
    q, k, v, dout = (x.astype(np.float64) if x.dtype.itemsize == 2 else x for x in problem.arrays)
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    return (out, lse, *dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, **problem.options))


def gpu_results(problem, backend):
    import cupy

    gq, gk, gv, gdout = (cupy.asarray(x) for x in problem.arrays)
    out, lse = dilated_attention(gq, gk, gv, *problem.branches, return_lse=True, backend=backend, **problem.options)
    grads = dilated_attention_backward(gdout, gq, gk, gv, out, lse, *problem.branches, backend=backend, **problem.options)
    results = (out, lse, *grads)
    assert all(isinstance(x, cupy.ndarray) for x in results)
    assert out.dtype == gq.dtype and all(g.dtype == gq.dtype for g in grads)
    return tuple(cupy.asnumpy(x) for x in results)


def assert_gpu_agrees(problem, backend, expected=None):
    expected = reference_results(problem) if expected is None else expected
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), gpu_results(problem, backend), expected):
        np.testing.assert_allclose(got, want, err_msg=f"{backend}: {name}", **AGREEMENT[problem.dtype])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@settings(max_examples=25, deadline=None)
@given(problem=gpu_problems())
def test_gpu_paths_agree_with_the_reference_on_the_spec_problems(backend, problem):
    assert_gpu_agrees(problem, backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@settings(max_examples=6, deadline=None)
@given(problem=gpu_problems(max_n=2000, max_heads=4, max_branches=3, max_segment=2500, max_dilation=5, dtypes=(np.float32,)))
def test_gpu_paths_agree_with_the_reference_on_long_segments(backend, problem):
    """Segments of up to 2000 rows: many thread blocks and tiles, several GEMM chunks."""
    assert_gpu_agrees(problem, backend)


PAPER = Problem(1, 8192, 8, 64, 64, [1024, 2048, 4096, 8192], [1, 2, 4, 8], True, "paper", np.dtype(np.float32), seed=4)
_PAPER_EXPECTED = []


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_paths_on_the_paper_configuration(backend):
    if not _PAPER_EXPECTED:
        _PAPER_EXPECTED.append(reference_results(PAPER))
    assert_gpu_agrees(PAPER, backend, _PAPER_EXPECTED[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_float16_inputs_accumulate_in_float32_and_return_float16(backend, causal):
    problem = Problem(2, 700, 4, 64, 64, [128, 512], [1, 4], causal, "paper", np.dtype(np.float16), seed=9)
    expected = reference_results(problem)  # float64 on the same float16 values
    got = gpu_results(problem, backend)
    assert got[1].dtype == np.float32  # lse
    for name, g, want in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        tol = HALF_ROUNDING["float16"][name]
        np.testing.assert_allclose(g.astype(np.float64), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()), err_msg=f"{backend}: {name}")


def test_bfloat16_inputs_on_the_reference_path():
    """bfloat16 needs a CuPy that can hold it (through ml_dtypes); the fused kernels reject it."""
    import cupy

    ml_dtypes = pytest.importorskip("ml_dtypes", reason="no ml_dtypes: CuPy has no bfloat16 dtype here")
    problem = Problem(1, 300, 2, 64, 64, [128, 300], [1, 2], True, "paper", np.dtype(np.float32), seed=2)
    try:
        half = [cupy.asarray(x.astype(ml_dtypes.bfloat16)) for x in problem.arrays]
    except (TypeError, ValueError) as error:
        pytest.skip(f"this CuPy cannot hold bfloat16 arrays: {error}")
    out = dilated_attention(*half[:3], *problem.branches, backend="cupy", **problem.options)
    wide = [x.astype(ml_dtypes.bfloat16).astype(np.float64) for x in problem.arrays]
    want = dilated_attention(*wide[:3], *problem.branches, **problem.options)
    tol = HALF_ROUNDING["bfloat16"]["out"]
    np.testing.assert_allclose(cupy.asnumpy(out.astype(cupy.float32)), want, rtol=tol, atol=tol * np.abs(want).max())
    with pytest.raises(TypeError, match="cupy-fused"):
        dilated_attention(*half[:3], *problem.branches, backend="cupy-fused")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_zero_value_dim_gives_the_true_log_sum_exp(backend):
    """Dv = 0: out is (B, N, H, 0) and lse the log-sum-exp of the scores, as the reference's."""
    import cupy

    rng = np.random.default_rng(3)
    q, k = (rng.standard_normal((1, 40, 2, 8)) for _ in range(2))
    v = np.zeros((1, 40, 2, 0))
    _, want_lse = dilated_attention(q, k, v, [16, 40], [1, 2], return_lse=True)
    out, lse = dilated_attention(*(cupy.asarray(x) for x in (q, k, v)), [16, 40], [1, 2], return_lse=True, backend=backend)
    assert out.shape == (1, 40, 2, 0) and bool(cupy.isfinite(lse).all())
    np.testing.assert_allclose(cupy.asnumpy(lse), want_lse, **GPU[np.dtype(np.float64)])
    assert math.isfinite(float(want_lse.max()))
