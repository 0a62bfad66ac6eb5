"""Causality (SPEC §3) and numerical behaviour (SPEC §7, numerics standard)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from longnet_ref import dense_attention, dilated_attention, dilated_attention_backward, multiplicity

from . import oracle
from .strategies import Problem, problems
from .tolerances import LARGE_SCORES_GRAD, LARGE_SCORES_LSE, LARGE_SCORES_OUT, SUMMATION


@settings(max_examples=100, deadline=None)
@given(problems(causal=True), st.data())
def test_causal_output_ignores_every_later_position(problem, data):
    assume(problem.n > 0)
    p = data.draw(st.integers(0, problem.n - 1))
    q, k, v, _ = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    rng = np.random.default_rng(problem.seed + 1)
    changed = [x.copy() for x in (q, k, v)]
    for x in changed:
        x[:, p + 1 :] = rng.standard_normal(x[:, p + 1 :].shape) * 10  # anything, even large
    out2, lse2 = dilated_attention(*changed, *problem.branches, return_lse=True, **problem.options)
    # Bitwise: later rows are masked out (never summed), not down-weighted.
    np.testing.assert_array_equal(out2[:, : p + 1], out[:, : p + 1])
    np.testing.assert_array_equal(lse2[:, : p + 1], lse[:, : p + 1])


def large_score_problem(dtype):
    return Problem(1, 48, 4, 4, 4, [8, 16, 48], [1, 2, 3], False, "paper", np.dtype(dtype), seed=11)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scores_of_magnitude_1e4_give_finite_outputs_equal_to_the_oracle(dtype):
    problem = large_score_problem(dtype)
    q, k, v, dout = problem.arrays
    q, k = q * 100, k * 100  # |scale q.k| ~ 1e4: exp overflows unless the max is subtracted
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches)
    assert np.abs(lse).max() > 5e3
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    assert all(np.all(np.isfinite(g)) for g in grads)
    want_out, want_lse = oracle.dilated_attention(q, k, v, *problem.branches)
    want_grads = oracle.dilated_attention_gradients(dout, q, k, v, *problem.branches)
    np.testing.assert_allclose(out, want_out, **LARGE_SCORES_OUT[problem.dtype])
    np.testing.assert_allclose(lse, want_lse, **LARGE_SCORES_LSE[problem.dtype])
    for name, g, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, want, err_msg=f"d{name}", **LARGE_SCORES_GRAD[problem.dtype])


def poisoned_row_is_reached(problem, which, p, h):
    """``(B, N, H)``: the rows whose output a non-finite entry of ``which`` at ``(0, p, h)`` can reach."""
    counts = multiplicity(problem.n, problem.num_heads, *problem.branches, **problem.index_options)  # (H, N, N)
    reached = np.zeros((problem.batch, problem.n, problem.num_heads), bool)  # (B, N, H)
    if which == "q":
        reached[0, p, h] = True
    else:
        reached[0, :, h] = counts[h, :, p] > 0
    return reached


def assert_same_non_finite_pattern_and_values(name, got, want, tolerance):
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{name}: NaN pattern")
    np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)], err_msg=f"{name}: infinities")
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], err_msg=name, **tolerance)


# The loop oracle sums attended pairs only, so a NaN or Inf reaches exactly the rows that attend
# it. (dense_attention's plain products would spread a NaN of v through 0 * NaN.)
SMALL = dict(max_n=32, max_heads=4, max_dim=6, max_branches=3, max_segment=40, max_dilation=5)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@settings(max_examples=40, deadline=None)
@given(problem=problems(**SMALL, scales=True), data=st.data(), which=st.sampled_from(["q", "k", "v"]), bad=st.sampled_from([np.nan, np.inf]))
def test_nan_or_inf_reaches_exactly_the_rows_that_attend_it(backend, problem, data, which, bad):
    assume(problem.n > 0)
    q, k, v, _ = problem.arrays
    p = data.draw(st.integers(0, problem.n - 1), label="position")
    h = data.draw(st.integers(0, problem.num_heads - 1), label="head")
    poisoned = dict(q=q.copy(), k=k.copy(), v=v.copy())
    poisoned[which][0, p, h, 0] = bad
    arrays = (poisoned["q"], poisoned["k"], poisoned["v"])
    out, lse = dilated_attention(*arrays, *problem.branches, return_lse=True, backend=backend, **problem.options)
    want_out, want_lse = oracle.dilated_attention(*arrays, *problem.branches, **problem.options)
    assert_same_non_finite_pattern_and_values("out", out, want_out, problem.tolerance)
    # A row with a +inf score has lse = +inf mathematically; max-subtraction gives inf - inf = NaN
    # there. SPEC §7 asks only that the row be non-finite, so lse is compared where it is finite.
    finite = np.isfinite(want_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite, err_msg="lse: finite pattern")
    np.testing.assert_allclose(lse[finite], want_lse[finite], err_msg="lse", **problem.tolerance)
    # Rows that do not attend position p of head h are untouched: equal to the clean result.
    reached = poisoned_row_is_reached(problem, which, p, h)
    clean = dilated_attention(q, k, v, *problem.branches, backend=backend, **problem.options)
    np.testing.assert_allclose(out[~reached], clean[~reached], **problem.tolerance)


def test_nan_in_one_query_row_leaves_every_other_row_unchanged():
    problem = Problem(2, 50, 3, 6, 5, [10, 20, 50], [1, 2, 5], True, "paper", np.dtype(np.float32), seed=2)
    q, k, v, _ = problem.arrays
    clean = dilated_attention(q, k, v, *problem.branches, causal=True)
    q[1, 17, 2, 3] = np.nan
    out = dilated_attention(q, k, v, *problem.branches, causal=True)
    assert np.all(np.isnan(out[1, 17, 2]))
    rest = np.ones(out.shape[:3], bool)
    rest[1, 17, 2] = False
    np.testing.assert_allclose(out[rest], clean[rest], **problem.tolerance)


def test_empty_sequence_gives_empty_results():
    q = np.zeros((2, 0, 3, 4), np.float32)
    v = np.zeros((2, 0, 3, 5), np.float32)
    out, lse = dilated_attention(q, q, v, [4], [2], return_lse=True)
    assert out.shape == (2, 0, 3, 5) and lse.shape == (2, 0, 3) and out.dtype == np.float32
    grads = dilated_attention_backward(out, q, q, v, out, lse, [4], [2])
    assert [g.shape for g in grads] == [q.shape, q.shape, v.shape]
    assert multiplicity(0, 3, [4], [2]).shape == (3, 0, 0)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@settings(max_examples=40, deadline=None)
@given(problem=problems(**SMALL, scales=True), data=st.data(), which=st.sampled_from(["q", "k", "v", "dout"]))
def test_nan_in_the_backward_reaches_exactly_the_gradients_the_chain_rule_gives(backend, problem, data, which):
    """The forward and backward of poisoned inputs against the oracle's chain-rule gradient."""
    assume(problem.n > 0)
    q, k, v, dout = problem.arrays
    poisoned = dict(q=q.copy(), k=k.copy(), v=v.copy(), dout=dout.copy())
    position = data.draw(st.integers(0, problem.n - 1), label="position")
    head = data.draw(st.integers(0, problem.num_heads - 1), label="head")
    poisoned[which][0, position, head, 0] = np.nan
    dout, q, k, v = (poisoned[name] for name in ("dout", "q", "k", "v"))
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, backend=backend, **problem.options)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, backend=backend, **problem.options)
    want = oracle.dilated_attention_gradients(dout, q, k, v, *problem.branches, **problem.options)
    for name, g, o in zip("qkv", grads, want):
        assert_same_non_finite_pattern_and_values(f"d{name}", g, o, problem.tolerance)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_nan_query_does_not_reach_the_gradient_of_a_later_key_under_causal(backend):
    """The smallest case of a former Numba leak: row 0 attends key 0 only, so key 1's dv must
    stay finite (the kernels now zero P on masked pairs after the exp)."""
    q = np.array([[[[np.nan]], [[0.5]]]])  # (B, N, H, D) = (1, 2, 1, 1): query 0 is NaN
    k = v = dout = np.array([[[[0.3]], [[-0.7]]]])
    out, lse = dilated_attention(q, k, v, [2], [1], causal=True, return_lse=True, backend=backend)
    _, _, dv = dilated_attention_backward(dout, q, k, v, out, lse, [2], [1], causal=True, backend=backend)
    assert np.isnan(dv[0, 0, 0, 0]) and np.isfinite(dv[0, 1, 0, 0])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_query_whose_every_score_is_minus_infinity_has_no_weight_and_no_gradient(backend, causal):
    """SPEC §4-5: a row whose logits are all ``-inf`` gets ``out = 0``, ``lse = -inf`` and
    contributes nothing to ``dq``, ``dk``, ``dv``: its own ``dq`` is 0 and the keys it attends get
    only the other rows' gradient.

    ``q = -inf`` against keys that are all positive makes every score of that row ``-inf``; its
    ``lse = -inf`` must turn neither ``P = exp(S - lse)`` into ``exp(-inf + inf) = NaN`` nor
    ``dK += dS q`` into ``0 * -inf``, and its ``dout``, NaN here, must reach nothing. Branch
    ``w = 2`` has 12 segment items (the Numba backward's one-item-per-segment path), ``w = 12``
    two (its two-pass path). Expected values from the loop oracle (chain rule, float64).
    """
    rng = np.random.default_rng(9)
    q, v, dout = (rng.standard_normal((1, 12, 2, 3)) for _ in range(3))
    k = np.abs(rng.standard_normal((1, 12, 2, 3))) + 0.5  # every q.k of the -inf row is -inf
    q[0, 6, 0] = -np.inf  # position 6 of head 0: in both branches (w = 12, r = 3 keeps 0, 3, 6, 9)
    dout[0, 6, 0] = np.nan  # the gradient of a row without weight: must reach nothing
    branches = ([2, 12], [1, 3])
    out, lse = dilated_attention(q, k, v, *branches, causal=causal, return_lse=True, backend=backend)
    dq, dk, dv = dilated_attention_backward(dout, q, k, v, out, lse, *branches, causal=causal, backend=backend)
    want = oracle.dilated_attention_gradients(dout, q, k, v, *branches, causal=causal)
    assert lse[0, 6, 0] == -np.inf and (out[0, 6, 0] == 0).all()
    assert (dq[0, 6, 0] == 0).all()
    for name, got, expected in zip(("dq", "dk", "dv"), (dq, dk, dv), want):
        assert np.isfinite(got).all(), name
        # float64 sums of <= 12 O(1) terms, in a different order than the oracle's
        np.testing.assert_allclose(got, expected, err_msg=name, **SUMMATION[np.dtype(np.float64)])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_dense_attention_never_reads_a_key_that_a_minus_inf_bias_masks_for_every_row(dtype, bad):
    """Keys 3 and 7 hold NaN or Inf and a ``-inf`` bias masks them for every query: the masked score
    is replaced, not added to (``NaN + -inf = NaN`` would reach every row through the row max), so
    every output and lse is finite and equals the loop oracle, which never reads a masked pair."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 10, 2, 3)).astype(dtype) for _ in range(3))
    k[:, [3, 7]] = bad
    bias = rng.standard_normal((1, 2, 10, 10))
    bias[..., [3, 7]] = -np.inf
    bias[0, 1, 5, :] = -np.inf  # and one row with no key at all: out 0, lse -inf
    for causal in (False, True):
        with np.errstate(invalid="ignore"):  # the masked NaN scores are computed, then replaced
            out, lse = dense_attention(q, k, v, bias=bias, causal=causal, return_lse=True)
        want_out, want_lse = oracle.attention(q, k, v, bias=bias, causal=causal)
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
        np.testing.assert_allclose(out, want_out, **SUMMATION[np.dtype(dtype)])
        np.testing.assert_allclose(lse, want_lse, **SUMMATION[np.dtype(dtype)])
