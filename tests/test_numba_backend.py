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
from longnet_ref.backends import numba_cpu
from longnet_ref.backends.numba_exp import exp_shifted

from . import oracle
from .strategies import Problem, problems
from .tolerances import NUMBA


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
        np.testing.assert_allclose(fast, ref, err_msg=name, **NUMBA[problem.dtype])


def longest_sparse_segment(problem):
    """Rows head 0 (offset 0) keeps in a branch's first segment, the largest over branches: ``ceil(min(w, N) / r)``."""
    return max((-(-min(w, problem.n) // r) for w, r in zip(*problem.branches)), default=0)


@settings(max_examples=20, deadline=None)
@given(problems())
def test_numba_agrees_with_the_reference_on_the_spec_problems(problem):
    """The spec problems (N <= 96): every branch fits in one 128-row key block."""
    assert_agree(problem)


def test_numba_agrees_with_the_reference_on_several_key_blocks():
    """Problems with a sparse segment longer than one 128-row key block (several key blocks, ragged
    last blocks, causal skipping at a nonzero key offset). That every example reaches the multi-block
    code is asserted, so a change to the strategy cannot quietly stop reaching it."""
    reached = []

    @settings(max_examples=40, deadline=None)
    @given(multi_block_problems())
    def run(problem):
        reached.append(longest_sparse_segment(problem) > numba_cpu.BLOCK_K)
        assert_agree(problem)

    run()
    assert reached and all(reached), f"only {sum(reached)} of {len(reached)} examples had a segment of several key blocks"


@st.composite
def long_segment_problems(draw, max_dilation=3, max_n=700, max_batch=2, max_segment=900, max_other_segment=800, max_other_dilation=3):
    """Problems whose first branch has sparse segments longer than one key block (> 128 rows):
    several key blocks, ragged last blocks and causal diagonals in every example; 0-2 further
    branches of any size up to ``max_other_segment``."""
    dilation = draw(st.integers(1, max_dilation))
    rows = numba_cpu.BLOCK_K + 1  # selected rows of a full segment at offset 0 must exceed one key block
    extra = draw(st.integers(0, 2))
    return Problem(
        batch=draw(st.integers(1, max_batch)),
        n=draw(st.integers(rows * dilation, max_n)),
        num_heads=draw(st.integers(1, 3)),
        head_dim=draw(st.integers(1, 8)),
        value_dim=draw(st.integers(1, 8)),
        segment_lengths=[draw(st.integers(rows * dilation, max_segment))] + draw(st.lists(st.integers(1, max_other_segment), min_size=extra, max_size=extra)),
        dilation_rates=[dilation] + draw(st.lists(st.integers(1, max_other_dilation), min_size=extra, max_size=extra)),
        causal=draw(st.booleans()),
        offsets=draw(st.sampled_from(["paper", "torchscale"])),
        dtype=np.dtype(draw(st.sampled_from([np.float32, np.float64]))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def multi_block_problems():
    """:func:`long_segment_problems` kept small for the main test: one batch, a first branch whose
    sparse segments hold 129-~280 rows (two or three key blocks), N <= 408."""
    return long_segment_problems(max_dilation=2, max_n=408, max_batch=1, max_segment=420, max_other_segment=300, max_other_dilation=4)


@pytest.mark.parametrize("query_block", [None, 64, 100])
@settings(max_examples=15, deadline=None)
@given(long_segment_problems())
def test_numba_agrees_across_query_and_key_blocks(query_block, problem):
    """Sparse segments of 129-700 rows: several 128-row key blocks, ragged last blocks, causal
    diagonals; the query block (a run-time argument) forced small and not a multiple of the
    key block, so block boundaries fall everywhere."""
    assert numba_cpu.segment_size(problem.n, problem.segment_lengths[0], problem.dilation_rates[0], 0, 0) > numba_cpu.BLOCK_K
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
            grads = dilated_attention_backward(
                arrays["dout"], arrays["q"], arrays["k"], arrays["v"], out, lse, *problem.branches, backend=backend, **problem.options
            )
            results[backend] = (out, lse, *grads)
    for name, fast, ref in zip(("out", "lse", "dq", "dk", "dv"), results["numba"], results["numpy"]):
        np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref), err_msg=name)
        finite = np.isfinite(ref)
        np.testing.assert_allclose(fast[finite], ref[finite], err_msg=name, **NUMBA[problem.dtype])


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
    exp_shifted(x, np.zeros(1, dtype), out)
    assert np.max(np.abs(out / np.exp(x.astype(np.float64)) - 1)) < bound  # ~1-2 ulp
    special = np.array([[-np.inf, np.nan, 2 * low, 0.0]], dtype)
    special_out = np.empty_like(special)
    exp_shifted(special, np.zeros(1, dtype), special_out)
    assert special_out[0, 0] == 0 and np.isnan(special_out[0, 1]) and special_out[0, 2] == 0 and special_out[0, 3] == 1


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
    result = subprocess.run([sys.executable, "-c", BOUNDS_CHECKED], env=env, capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bounds-checked kernels ran 10 cases" in result.stdout


def test_warm_up_compiles_every_kernel_the_timed_calls_use():
    """The demo and the benchmarks time only warm kernels: after warm_up(), in a fresh process (no
    kernel called before), the forward and both backward paths hold one signature per dtype, and
    a later call of either dtype, on read-only and strided inputs too, adds none."""
    script = textwrap.dedent(
        """
        import numba, numpy as np
        from longnet_ref import dilated_attention, dilated_attention_backward
        from longnet_ref.backends import numba_cpu
        kernels = [getattr(numba_cpu, name) for name in numba_cpu.KERNELS]
        before = [len(kernel.signatures) for kernel in kernels]
        numba_cpu.warm_up()
        dtypes = [sorted(str(sig[0].dtype) for sig in kernel.signatures) for kernel in kernels]
        for dtype in (np.float32, np.float64):
            x = np.broadcast_to(np.ones((1, 64, 1, 4), dtype), (2, 64, 8, 4))  # read-only, strided
            for w, r in (([64], [2]), ([8], [1])):  # the two-pass and the one-item-per-segment backward
                out, lse = dilated_attention(x, x, x, w, r, causal=True, backend="numba", return_lse=True)
                dilated_attention_backward(x[..., ::-1], x, x, x, out, lse, w, r, causal=True, backend="numba")
        print(before, dtypes == [["float32", "float64"]] * 4, [len(kernel.signatures) for kernel in kernels])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[0, 0, 0, 0] True [2, 2, 2, 2]"


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda x: np.broadcast_to(x[:1], x.shape), id="broadcast"),
        pytest.param(lambda x: x[:, :, ::-1], id="negative-stride"),
        pytest.param(lambda x: np.asfortranarray(x), id="fortran"),
        pytest.param(lambda x: (x.setflags(write=False), x)[1], id="read-only"),
    ],
)
def test_read_only_and_strided_inputs_reuse_the_compiled_kernels(make_input):
    """Numba specialises on layout and writeability: every input reaches the kernels as a
    C-contiguous writeable array, so no such input compiles a kernel again (which costs 20-40 s)
    and the results equal those of a contiguous copy."""
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((2, 70, 3, 5)) for _ in range(4))
    w, r = [16, 70], [2, 1]  # the one-item-per-segment and the two-pass backward paths
    out, lse = dilated_attention(q, k, v, w, r, causal=True, backend="numba", return_lse=True)  # compiles if needed
    dilated_attention_backward(dout, q, k, v, out, lse, w, r, causal=True, backend="numba")
    kernels = [getattr(numba_cpu, name) for name in numba_cpu.KERNELS]
    counts = [len(kernel.signatures) for kernel in kernels]
    odd = [make_input(x.copy()) for x in (q, k, v, dout)]
    out, lse = dilated_attention(*odd[:3], w, r, causal=True, backend="numba", return_lse=True)
    grads = dilated_attention_backward(odd[3], *odd[:3], out, lse, w, r, causal=True, backend="numba")
    assert [len(kernel.signatures) for kernel in kernels] == counts
    plain = [np.ascontiguousarray(x) for x in odd]  # the same values, the layout the kernels saw first
    ref_out, ref_lse = dilated_attention(*plain[:3], w, r, causal=True, backend="numba", return_lse=True)
    for fast, ref in zip((out, *grads), (ref_out, *dilated_attention_backward(plain[3], *plain[:3], ref_out, ref_lse, w, r, causal=True, backend="numba"))):
        np.testing.assert_array_equal(fast, ref)  # same kernels, same values: bitwise


BLAS_IN_FIRST_CALL = textwrap.dedent(
    """
    import numpy as np
    from threadpoolctl import threadpool_info
    from longnet_ref import dilated_attention
    from longnet_ref.backends import numba_cpu
    seen = []
    kernel = numba_cpu.forward_branch
    def spy(*args):  # runs inside forward's thread limit, around the first kernel call
        kernel(*args)  # loads (or compiles) the kernel and calls BLAS from the parallel loop
        seen.extend((pool["filepath"], pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas")
    numba_cpu.forward_branch = spy
    x = np.ones((1, 256, 2, 8), np.float32)
    dilated_attention(x, x, x, [128], [1], backend="numba")
    print(repr(seen))
    """
)


def test_first_call_runs_blas_single_threaded_inside_the_parallel_kernels():
    """In a fresh process, the first kernel call must already see every BLAS library, including
    SciPy's (the one Numba's np.dot calls), limited to one thread: a second BLAS thread pool
    inside the parallel loop oversubscribes the cores (measured 2.5-60x slower first calls)."""
    blas_settings = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    env = {name: value for name, value in os.environ.items() if name not in blas_settings}  # library defaults
    result = subprocess.run([sys.executable, "-c", BLAS_IN_FIRST_CALL], env=env, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    pools = eval(result.stdout.strip())  # [(library path, threads), ...]
    assert any("scipy" in path for path, _ in pools), pools  # the kernels' BLAS is loaded by then
    assert all(threads == 1 for _, threads in pools), pools


def attention_of_rows(q_rows, keys, values, dout_rows, first_query, causal, scale):
    """Plain NumPy, float64: softmax attention of segment rows ``first_query + i`` against all the
    segment's keys (causally keys ``t <= first_query + i``), and its exact gradient (SPEC §3, §5)."""
    q, k, v, do = (x.astype(np.float64) for x in (q_rows, keys, values, dout_rows))
    scores = scale * q @ np.swapaxes(k, -1, -2)  # (B, Hs, nq, T)
    if causal:
        query_t = first_query + np.arange(q.shape[2])[:, None]
        scores = np.where(np.arange(k.shape[2])[None, :] <= query_t, scores, -np.inf)
    lse = np.log(np.sum(np.exp(scores - scores.max(-1, keepdims=True)), -1)) + scores.max(-1)
    p = np.exp(scores - lse[..., None])
    out = p @ v
    dp = do @ np.swapaxes(v, -1, -2)
    ds = p * (dp - np.sum(do * out, -1, keepdims=True))
    return out, lse, (scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ do)


@settings(max_examples=20, deadline=None)
@given(st.data(), st.booleans(), st.sampled_from([np.float32, np.float64]))
def test_gathered_segment_kernels_match_plain_attention(data, causal, dtype):
    """The distributed backend's shared branches: a rank's run of query rows against a whole
    gathered sparse segment (several key and query blocks), forward and exact gradient."""
    size = data.draw(st.integers(1, 300))
    first = data.draw(st.integers(0, size - 1))
    nq = data.draw(st.integers(1, size - first))
    batch, heads, dim, value_dim = (data.draw(st.integers(1, n)) for n in (2, 3, 8, 8))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q_rows, dout_rows = rng.standard_normal((batch, heads, nq, dim)), rng.standard_normal((batch, heads, nq, value_dim))
    keys, values = rng.standard_normal((batch, heads, size, dim)), rng.standard_normal((batch, heads, size, value_dim))
    q_rows, dout_rows, keys, values = (x.astype(dtype) for x in (q_rows, dout_rows, keys, values))
    scale = 1 / np.sqrt(dim)
    out, lse, grads = attention_of_rows(q_rows, keys, values, dout_rows, first, causal, scale)
    fast_out, fast_lse = numba_cpu.segment_forward(q_rows, keys, values, first, causal, scale)
    # the backward takes the global LSE and Dsum = rowsum(dO * O): here those of this one softmax
    dsum = np.sum(dout_rows.astype(np.float64) * out, -1).astype(dtype)
    fast_grads = numba_cpu.segment_backward(q_rows, keys, values, dout_rows, lse.astype(dtype), dsum, first, causal, scale)
    tolerance = NUMBA[np.dtype(dtype)]  # rounding of the kernels' sums against a float64 oracle
    for name, fast, expected in zip(("out", "lse", "dq", "dk", "dv"), (fast_out, fast_lse, *fast_grads), (out, lse, *grads)):
        assert fast.dtype == dtype, name
        np.testing.assert_allclose(fast, expected, err_msg=name, **tolerance)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_nan_query_does_not_reach_the_gradient_of_a_key_it_does_not_attend(dtype):
    """Causal: query 0 attends key 0 only. Its NaN makes its own LSE NaN, and exp(-inf - NaN) is
    NaN, so P must be zeroed on masked pairs after the exp, not only S before it (SPEC §7)."""
    q = np.array([[[[np.nan]], [[0.5]]]], dtype)  # (B, N, H, D) = (1, 2, 1, 1): query 0 is NaN
    k = v = dout = np.array([[[[0.3]], [[-0.7]]]], dtype)
    with np.errstate(invalid="ignore"):
        out, lse = dilated_attention(q, k, v, [2], [1], causal=True, return_lse=True, backend="numba")
        dq, dk, dv = dilated_attention_backward(dout, q, k, v, out, lse, [2], [1], causal=True, backend="numba")
    assert np.isnan(dv[0, 0, 0, 0]) and np.isfinite(dv[0, 1, 0, 0]) and np.isfinite(dk[0, 1, 0, 0])
    assert np.isnan(dq[0, 0, 0, 0]) and np.isfinite(dq[0, 1, 0, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_gathered_segment_kernels_give_a_row_without_weight_no_gradient(causal):
    """SPEC §5 on the distributed backend's gathered-segment kernels (``segment_forward`` /
    ``segment_backward``, reached only through shared branches): a query row whose every score is
    ``-inf`` gets ``out = 0``, ``lse = -inf``, ``dq = 0``, and adds nothing to ``dk``, ``dv`` (not
    even its NaN ``dout`` or the NaN ``Dsum = dO . O`` of that row). Expected values from the loop
    oracle: the segment's rows as one dense softmax, this rank's queries at rows ``first ..``."""
    rng = np.random.default_rng(4)
    size, first, nq = 40, 3, 20  # the segment's rows; this rank's queries are rows 3 .. 22
    keys = np.abs(rng.standard_normal((1, 2, size, 3))) + 0.5  # (B, Hs, T, D), all positive
    values = rng.standard_normal((1, 2, size, 4))
    q_rows, dout_rows = rng.standard_normal((1, 2, nq, 3)), rng.standard_normal((1, 2, nq, 4))
    q_rows[0, 1, 5] = -np.inf  # segment row first + 5 of head 1: every score -inf
    dout_rows[0, 1, 5] = np.nan
    scale = 0.5
    # the oracle on the segment laid out as a sequence (B, T, Hs, .); other rows' queries are 0
    # with dout 0, so they add nothing to dk, dv
    rows = (slice(None), slice(first, first + nq))
    q_full, dout_full = np.zeros((1, size, 2, 3)), np.zeros((1, size, 2, 4))
    q_full[rows], dout_full[rows] = q_rows.transpose(0, 2, 1, 3), dout_rows.transpose(0, 2, 1, 3)
    k_seq, v_seq = keys.transpose(0, 2, 1, 3), values.transpose(0, 2, 1, 3)
    want_out, want_lse = oracle.attention(q_full, k_seq, v_seq, scale=scale, causal=causal)
    want_dq, want_dk, want_dv = oracle.attention_gradients(dout_full, q_full, k_seq, v_seq, scale=scale, causal=causal)

    out, lse = numba_cpu.segment_forward(q_rows, keys, values, first, causal, scale)
    with np.errstate(invalid="ignore"):  # NaN * 0 in Dsum of the row without weight, as distributed computes it
        dsum = np.sum(dout_rows * out, -1)  # (B, Hs, nq): NaN on that row
    dq, dk, dv = numba_cpu.segment_backward(q_rows, keys, values, dout_rows, lse, dsum, first, causal, scale)

    assert lse[0, 1, 5] == -np.inf and (out[0, 1, 5] == 0).all() and (dq[0, 1, 5] == 0).all()
    tolerance = NUMBA[np.dtype(np.float64)]  # the kernels' block sums against the float64 oracle
    np.testing.assert_allclose(out, want_out[rows].transpose(0, 2, 1, 3), err_msg="out", **tolerance)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(want_lse[rows].transpose(0, 2, 1)))
    finite = np.isfinite(lse)
    np.testing.assert_allclose(lse[finite], want_lse[rows].transpose(0, 2, 1)[finite], err_msg="lse", **tolerance)
    expected = (want_dq[rows].transpose(0, 2, 1, 3), want_dk.transpose(0, 2, 1, 3), want_dv.transpose(0, 2, 1, 3))
    for name, got, want in zip(("dq", "dk", "dv"), (dq, dk, dv), expected):
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, err_msg=name, **tolerance)


def gradient_given_statistics(q_rows, keys, values, dout_rows, lse, dsum, first_query, causal, scale):
    """Plain NumPy, float64: the exact gradient of segment rows given the *global* ``lse`` and
    ``Dsum`` (SPEC §5), ``P = exp(S - lse)`` and ``P = 0`` on a row with ``lse = -inf`` (no key)."""
    q, k, v, do, lse, dsum = (x.astype(np.float64) for x in (q_rows, keys, values, dout_rows, lse, dsum))
    scores = scale * q @ np.swapaxes(k, -1, -2)  # (B, Hs, nq, T)
    if causal:
        query_t = first_query + np.arange(q.shape[2])[:, None]
        scores = np.where(np.arange(k.shape[2])[None, :] <= query_t, scores, -np.inf)
    uncovered = np.isneginf(lse)[..., None]  # (B, Hs, nq, 1)
    p = np.where(uncovered, 0.0, np.exp(scores - np.where(uncovered, 0.0, lse[..., None])))
    ds = p * (do @ np.swapaxes(v, -1, -2) - dsum[..., None])
    return scale * ds @ k, scale * np.swapaxes(ds, -1, -2) @ q, np.swapaxes(p, -1, -2) @ do


@settings(max_examples=20, deadline=None)
@given(st.data(), st.sampled_from([np.float32, np.float64]))
def test_gathered_backward_gives_rows_with_lse_minus_inf_no_gradient_and_never_reads_unattended_nan(data, dtype):
    """Rows no branch covers arrive with ``lse = -inf``: their ``P`` is 0 (not ``exp(S + inf)``), so
    their ``dq`` is 0 and they add nothing to ``dk, dv``. Causally, keys after the last query row
    are never attended: NaN there must not reach any gradient. Several key blocks (size <= 300)."""
    size = data.draw(st.integers(2, 300), label="keys")
    first = data.draw(st.integers(0, size - 2), label="first query")
    nq = data.draw(st.integers(1, size - first - 1), label="query rows")  # >= 1 key after the last query
    batch, heads, dim, value_dim = 1, data.draw(st.integers(1, 2)), data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    q_rows, dout_rows = rng.standard_normal((batch, heads, nq, dim)), rng.standard_normal((batch, heads, nq, value_dim))
    keys, values = rng.standard_normal((batch, heads, size, dim)), rng.standard_normal((batch, heads, size, value_dim))
    scale = 1 / np.sqrt(dim)
    out, lse, _ = attention_of_rows(q_rows, keys, values, dout_rows, first, True, scale)
    dsum = np.sum(dout_rows * out, -1)
    lse[rng.random(lse.shape) < 0.4] = -np.inf
    lse[0, 0, 0] = -np.inf  # at least one uncovered row
    expected = gradient_given_statistics(q_rows, keys, values, dout_rows, lse, dsum, first, True, scale)
    unattended = slice(first + nq, size)
    keys[:, :, unattended], values[:, :, unattended] = np.nan, np.inf
    arrays = (x.astype(dtype) for x in (q_rows, keys, values, dout_rows, lse, dsum))
    grads = numba_cpu.segment_backward(*arrays, first, True, scale)
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert np.isfinite(got).all(), name
        np.testing.assert_allclose(got, want, err_msg=name, **NUMBA[np.dtype(dtype)])
    assert not grads[0][np.isneginf(lse)].any()  # uncovered rows: dq exactly 0
