"""``backend="cupy-tensor-core"`` on a real GPU against the NumPy reference (``pytest -m gpu``).

NOT YET RUN: no session with a GPU has executed these (see docs/gpu.md). Skipped, with the
reason, where CuPy or a device is missing, as in CI; the CPU checks of the same algorithm are
tests/test_tensor_core_tiles.py (tiling and emulated tile loop) and
tests/test_tensor_core_compile.py (NVRTC compile).
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dilated_attention, dilated_attention_backward
from longnet_ref.validation import InputTypeError

from .strategies import Problem
from .tensor_core_emulation import ROUNDING
from .test_gpu import AVAILABLE, REASON
from .tolerances import TENSOR_CORE_ROUNDING

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not AVAILABLE, reason=REASON)]
BACKEND = "cupy-tensor-core"
NAMES = ("out", "lse", "dq", "dk", "dv")


def _device_dtype(name):
    if name == "float16":
        return np.float16
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="no ml_dtypes: CuPy has no bfloat16 dtype here")
    return ml_dtypes.bfloat16


def check_against_reference(problem, dtype_name):
    """Inputs rounded to the half type; the reference reads the same values in float64."""
    import cupy

    arrays = tuple(ROUNDING[dtype_name](x.astype(np.float32)) for x in problem.arrays)
    q, k, v, dout = (x.astype(np.float64) for x in arrays)
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    expected = (out, lse, *dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, **problem.options))
    gq, gk, gv, gdout = (cupy.asarray(x.astype(_device_dtype(dtype_name))) for x in arrays)
    gout, glse = dilated_attention(gq, gk, gv, *problem.branches, return_lse=True, backend=BACKEND, **problem.options)
    grads = dilated_attention_backward(gdout, gq, gk, gv, gout, glse, *problem.branches, backend=BACKEND, **problem.options)
    assert gout.dtype == gq.dtype and glse.dtype == cupy.float32 and all(g.dtype == gq.dtype for g in grads)
    for name, got, want in zip(NAMES, (gout, glse, *grads), expected):
        got = cupy.asnumpy(got.astype(cupy.float32)).astype(np.float64)
        np.testing.assert_allclose(got, want, err_msg=f"{dtype_name}: {name}", **TENSOR_CORE_ROUNDING[dtype_name][name])


@st.composite
def tensor_core_problems(draw):
    """Several 64-row tiles per segment, ragged segments, r > 1, both offset rules, D = Dv in {64, 128}."""
    branches = draw(st.integers(1, 3))
    return Problem(
        batch=draw(st.integers(1, 2)),
        n=draw(st.integers(1, 700)),
        num_heads=draw(st.integers(1, 4)),
        head_dim=(dim := draw(st.sampled_from([64, 128]))),
        value_dim=dim,
        segment_lengths=draw(st.lists(st.integers(1, 800), min_size=branches, max_size=branches)),
        dilation_rates=draw(st.lists(st.integers(1, 5), min_size=branches, max_size=branches)),
        causal=draw(st.booleans()),
        offsets=draw(st.sampled_from(["paper", "torchscale"])),
        dtype=np.dtype(np.float32),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@settings(max_examples=20, deadline=None)
@given(problem=tensor_core_problems())
def test_tensor_core_path_agrees_with_the_reference(dtype_name, problem):
    check_against_reference(problem, dtype_name)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_tensor_core_path_on_the_paper_configuration(dtype_name, causal):
    problem = Problem(1, 8192, 8, 64, 64, [1024, 2048, 4096, 8192], [1, 2, 4, 8], causal, "paper", np.dtype(np.float32), seed=5)
    check_against_reference(problem, dtype_name)


def test_tensor_core_path_rejects_what_its_kernels_do_not_take():
    import cupy

    q = cupy.zeros((1, 64, 2, 64), cupy.float32)
    with pytest.raises(InputTypeError, match="q must be float16 or bfloat16"):
        dilated_attention(q, q, q, [64], [1], backend=BACKEND)
    h = cupy.zeros((1, 64, 2, 32), cupy.float16)
    with pytest.raises(ValueError, match="head dims"):
        dilated_attention(h, h, h, [64], [1], backend=BACKEND)


def test_empty_sequence_gives_empty_results():
    import cupy

    q = cupy.zeros((1, 0, 2, 64), cupy.float16)
    out, lse = dilated_attention(q, q, q, [16], [1], return_lse=True, backend=BACKEND)
    assert out.shape == (1, 0, 2, 64) and lse.shape == (1, 0, 2)
