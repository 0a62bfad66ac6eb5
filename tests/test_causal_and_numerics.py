"""Causality (SPEC §3) and numerical behaviour (SPEC §7, numerics standard)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dense_attention, dense_attention_backward, dilated_attention, dilated_attention_backward, multiplicity

from .strategies import Problem, problems


@settings(max_examples=100, deadline=None)
@given(problems(causal=True), st.data())
def test_causal_output_ignores_every_later_position(problem, data):
    if problem.n == 0:
        return
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


def test_scores_of_magnitude_1e4_give_finite_outputs_equal_to_the_oracle():
    problem = large_score_problem(np.float64)
    q, k, v, dout = problem.arrays
    q, k = q * 100, k * 100  # |scale q.k| ~ 1e4: exp overflows unless the max is subtracted
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True)
    assert np.abs(lse).max() > 5e3
    dense_out, dense_lse = dense_attention(q, k, v, bias=problem.multiplicity_bias(), return_lse=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    # Scores of 1e4 carry an absolute rounding error of 1e4 * 1.1e-16 ~ 1e-12 in float64, which
    # moves softmax weights by that relative amount: the usual float64 tolerance scaled by 1e4.
    np.testing.assert_allclose(out, dense_out, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(lse, dense_lse, rtol=1e-10)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches)
    assert all(np.all(np.isfinite(g)) for g in grads)


def test_scores_of_magnitude_1e4_stay_finite_in_float32():
    problem = large_score_problem(np.float32)
    q, k, v, dout = problem.arrays
    out, lse = dilated_attention(q * 100, k * 100, v, *problem.branches, return_lse=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse))
    grads = dilated_attention_backward(dout, q * 100, k * 100, v, out, lse, *problem.branches)
    assert all(np.all(np.isfinite(g)) for g in grads)


@settings(max_examples=60, deadline=None)
@given(problems(min_branches=1), st.data(), st.sampled_from(["q", "k", "v"]), st.sampled_from([np.nan, np.inf]))
def test_nan_or_inf_reaches_exactly_the_rows_it_reaches_in_dense_attention(problem, data, which, bad):
    if problem.n == 0:
        return
    q, k, v, _ = problem.arrays
    p = data.draw(st.integers(0, problem.n - 1))
    h = data.draw(st.integers(0, problem.num_heads - 1))
    poisoned = dict(q=q.copy(), k=k.copy(), v=v.copy())
    poisoned[which][0, p, h, 0] = bad
    with np.errstate(invalid="ignore", over="ignore"):
        out = dilated_attention(poisoned["q"], poisoned["k"], poisoned["v"], *problem.branches, **problem.options)
        oracle = dense_attention(
            poisoned["q"], poisoned["k"], poisoned["v"], causal=problem.causal, bias=problem.multiplicity_bias()
        )
    np.testing.assert_array_equal(np.isnan(out), np.isnan(oracle))
    np.testing.assert_array_equal(out[np.isinf(oracle)], oracle[np.isinf(oracle)])
    finite = np.isfinite(oracle)
    np.testing.assert_allclose(out[finite], oracle[finite], **problem.tolerance)
    # Rows that do not attend position p of head h (a q poison reaches only its own row) are untouched.
    counts = multiplicity(problem.n, problem.num_heads, *problem.branches, **problem.options)  # (H, N, N)
    reached = np.zeros(out.shape[:3], bool)  # (B, N, H)
    if which == "q":
        reached[0, p, h] = True
    else:
        reached[0, :, h] = counts[h, :, p] > 0
    clean = dilated_attention(q, k, v, *problem.branches, **problem.options)
    # Equal up to rounding (the poisoned column is summed on its own path); a leak would be NaN/Inf.
    np.testing.assert_allclose(out[~reached], clean[~reached], **problem.tolerance)


def test_nan_in_one_query_row_leaves_every_other_row_finite():
    problem = Problem(2, 50, 3, 6, 5, [10, 20, 50], [1, 2, 5], True, "paper", np.dtype(np.float32), seed=2)
    q, k, v, _ = problem.arrays
    q[1, 17, 2, 3] = np.nan
    out = dilated_attention(q, k, v, *problem.branches, causal=True)
    assert np.all(np.isnan(out[1, 17, 2]))
    rest = np.ones(out.shape[:3], bool)
    rest[1, 17, 2] = False
    assert np.all(np.isfinite(out[rest]))


def test_empty_sequence_gives_empty_results():
    q = np.zeros((2, 0, 3, 4), np.float32)
    v = np.zeros((2, 0, 3, 5), np.float32)
    out, lse = dilated_attention(q, q, v, [4], [2], return_lse=True)
    assert out.shape == (2, 0, 3, 5) and lse.shape == (2, 0, 3) and out.dtype == np.float32
    grads = dilated_attention_backward(out, q, q, v, out, lse, [4], [2])
    assert [g.shape for g in grads] == [q.shape, q.shape, v.shape]
    assert multiplicity(0, 3, [4], [2]).shape == (3, 0, 0)


@settings(max_examples=60, deadline=None)
@given(problems(min_branches=1), st.data(), st.sampled_from(["q", "k", "v", "dout"]))
def test_nan_in_the_backward_reaches_exactly_the_gradients_it_reaches_in_dense_attention(problem, data, which):
    if problem.n == 0:
        return
    q, k, v, dout = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    poisoned = dict(q=q.copy(), k=k.copy(), v=v.copy(), dout=dout.copy())
    poisoned[which][0, data.draw(st.integers(0, problem.n - 1)), data.draw(st.integers(0, problem.num_heads - 1)), 0] = np.nan
    bias = problem.multiplicity_bias()
    names = ("dout", "q", "k", "v")
    with np.errstate(invalid="ignore"):
        grads = dilated_attention_backward(*(poisoned[n] for n in names), out, lse, *problem.branches, **problem.options)
        oracle = dense_attention_backward(*(poisoned[n] for n in names), out, lse, causal=problem.causal, bias=bias)
    for name, g, o in zip("qkv", grads, oracle):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(o), err_msg=f"d{name}")
        finite = np.isfinite(o)
        np.testing.assert_allclose(g[finite], o[finite], err_msg=f"d{name}", **problem.tolerance)
