"""``backend="numba"`` agrees with the NumPy reference (the single source of truth), forward and backward."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dilated_attention, dilated_attention_backward
from longnet_ref.backends.numba_exp import exp_shifted

from .strategies import problems

# The kernels sum in blocks of 128 rows and use their own exp (max relative error 8e-8 in
# float32, 2.2e-16 in float64, below): against the reference they differ by rounding only.
# float64: sums of <= ~3000 terms of unit roundoff 1.1e-16 -> ~3e-13 relative; 1e-12 covers it.
# float32: the same sums at 6e-8 plus the exp's 8e-8 -> ~2e-4 worst case, ~1e-6 typical.
AGREEMENT = {
    np.dtype(np.float64): dict(rtol=1e-12, atol=1e-12),
    np.dtype(np.float32): dict(rtol=2e-4, atol=2e-5),
}


def both_backends(problem):
    q, k, v, dout = problem.arrays
    results = {}
    for backend in ("numpy", "numba"):
        out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, backend=backend, **problem.options)
        grads = dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, backend=backend, **problem.options)
        results[backend] = (out, lse, *grads)
    return results


def assert_agree(problem):
    results = both_backends(problem)
    for name, fast, ref in zip(("out", "lse", "dq", "dk", "dv"), results["numba"], results["numpy"]):
        assert fast.dtype == ref.dtype and fast.shape == ref.shape, name
        np.testing.assert_allclose(fast, ref, err_msg=name, **AGREEMENT[problem.dtype])


@settings(max_examples=150, deadline=None)
@given(problems())
def test_numba_agrees_with_the_reference_on_the_spec_problems(problem):
    assert_agree(problem)


@pytest.mark.parametrize("query_block", [None, 64, 100])
@settings(max_examples=15, deadline=None)
@given(problems(max_n=700, max_heads=3, max_dim=8, max_branches=3, max_segment=800, max_dilation=3))
def test_numba_agrees_across_query_and_key_blocks(query_block, problem):
    """Segments of up to 700 rows: several 128-row key blocks, ragged last blocks, causal
    diagonals; the query block (a run-time argument) forced small and not a multiple of the
    key block, so block boundaries fall everywhere."""
    from longnet_ref.backends import numba_cpu

    saved = dict(numba_cpu.QUERY_BLOCK)
    if query_block:
        numba_cpu.QUERY_BLOCK.update({False: query_block, True: query_block})
    try:
        assert_agree(problem)
    finally:
        numba_cpu.QUERY_BLOCK.update(saved)


@settings(max_examples=40, deadline=None)
@given(problems(min_branches=1), st.data(), st.sampled_from(["q", "k", "v", "dout"]), st.sampled_from([np.nan, np.inf]))
def test_numba_nan_and_inf_reach_the_same_rows_as_the_reference(problem, data, which, bad):
    if problem.n == 0:
        return
    arrays = dict(zip(("q", "k", "v", "dout"), (x.copy() for x in problem.arrays)))
    arrays[which][0, data.draw(st.integers(0, problem.n - 1)), data.draw(st.integers(0, problem.num_heads - 1)), 0] = bad
    results = {}
    with np.errstate(all="ignore"):
        for backend in ("numpy", "numba"):
            out, lse = dilated_attention(arrays["q"], arrays["k"], arrays["v"], *problem.branches, return_lse=True, backend=backend, **problem.options)
            grads = dilated_attention_backward(arrays["dout"], arrays["q"], arrays["k"], arrays["v"], out, lse, *problem.branches, backend=backend, **problem.options)
            results[backend] = (out, lse, *grads)
    for name, fast, ref in zip(("out", "lse", "dq", "dk", "dv"), results["numba"], results["numpy"]):
        np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref), err_msg=name)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(fast[finite], ref[finite], err_msg=name, **AGREEMENT[problem.dtype])


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="one core: 1 thread vs 1 thread would prove nothing")
def test_numba_results_do_not_depend_on_the_thread_count():
    """Every row is written by one work item per branch, branches in order: bitwise reproducible."""
    from .strategies import Problem

    problem = Problem(2, 600, 4, 16, 16, [64, 256, 600], [1, 2, 4], True, "paper", np.dtype(np.float32), seed=9)
    runs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            runs.append(both_backends(problem)["numba"])
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, low, bound", [(np.float32, -87.0, 1.5e-7), (np.float64, -708.0, 4.5e-16)])
def test_vectorised_exp_is_accurate_to_the_input_precision(dtype, low, bound):
    x = np.linspace(low, 0.0, 200_001).astype(dtype)[None]
    out = np.empty_like(x)
    exp_shifted(x, np.zeros(1, dtype), out, np.empty(x.shape, np.int32 if dtype == np.float32 else np.int64))
    assert np.max(np.abs(out / np.exp(x.astype(np.float64)) - 1)) < bound  # ~1-2 ulp
    special = np.array([[-np.inf, np.nan, 2 * low, 0.0]], dtype)
    exp_shifted(special, np.zeros(1, dtype), out[:, :4], np.empty((1, 4), np.int32 if dtype == np.float32 else np.int64))
    assert out[0, 0] == 0 and np.isnan(out[0, 1]) and out[0, 2] == 0 and out[0, 3] == 1


BOUNDS_CHECKED = textwrap.dedent(
    """
    import numpy as np
    from longnet_ref import dilated_attention, dilated_attention_backward
    rng = np.random.default_rng(0)
    cases = [  # (B, N, H, D, Dv, w, r, causal, offsets): ragged, w > N, r > w, offsets past the segment
        (1, 1, 1, 1, 1, [1], [1], False, "paper"),
        (2, 37, 5, 3, 2, [8, 13, 50], [1, 3, 4], True, "paper"),
        (1, 300, 3, 4, 5, [7, 129, 1000], [9, 2, 3], False, "torchscale"),
        (1, 260, 2, 2, 2, [260, 131], [1, 1], True, "torchscale"),
        (2, 17, 7, 2, 3, [3, 5], [6, 11], True, "paper"),
    ]
    for dtype in (np.float32, np.float64):
        for B, N, H, D, Dv, w, r, causal, offsets in cases:
            q, k = (rng.standard_normal((B, N, H, D)).astype(dtype) for _ in range(2))
            v, dout = (rng.standard_normal((B, N, H, Dv)).astype(dtype) for _ in range(2))
            out, lse = dilated_attention(q, k, v, w, r, causal=causal, offsets=offsets, backend="numba", return_lse=True)
            dilated_attention_backward(dout, q, k, v, out, lse, w, r, causal=causal, offsets=offsets, backend="numba")
    print("bounds-checked kernels ran", len(cases) * 2, "cases")
    """
)


def test_kernels_never_index_out_of_bounds_under_numba_boundscheck(tmp_path):
    """Re-run the kernels compiled with NUMBA_BOUNDSCHECK=1 (fresh cache): an out-of-range index
    raises IndexError there instead of reading memory."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", BOUNDS_CHECKED], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bounds-checked kernels ran 10 cases" in result.stdout


def test_warm_up_compiles_every_kernel_the_timed_calls_use():
    """The demo and the benchmarks time only warm kernels: after warm_up, in a fresh process (no
    kernel called before), the forward and both backward paths hold a float32 signature."""
    script = textwrap.dedent(
        """
        import numba, numpy as np
        from longnet_ref.backends import numba_cpu
        kernels = ("forward_branch", "backward_segments_branch", "backward_keys_branch", "backward_queries_branch")
        before = [len(getattr(numba_cpu, name).signatures) for name in kernels]
        numba_cpu.warm_up(np.float32)
        after = [any(sig[0].dtype == numba.float32 for sig in getattr(numba_cpu, name).signatures) for name in kernels]
        print(before, after)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[0, 0, 0, 0] [True, True, True, True]"
