"""SPEC §3-4: dilated attention equals dense attention with bias log(multiplicity)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dense_attention, dilated_attention, multiplicity

from . import oracle
from .strategies import problems


@settings(max_examples=150, deadline=None)
@given(problems(scales=True))
def test_forward_equals_dense_attention_with_multiplicity_bias(problem):
    q, k, v, _ = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    dense_out, dense_lse = dense_attention(q, k, v, bias=problem.multiplicity_bias(), return_lse=True, **problem.dense_options)
    assert out.dtype == lse.dtype == problem.dtype
    assert out.shape == v.shape and lse.shape == q.shape[:3]
    np.testing.assert_allclose(out, dense_out, **problem.tolerance)
    # -inf (rows covered by no branch) must match exactly; assert_allclose compares infs as equal.
    np.testing.assert_allclose(lse, dense_lse, **problem.tolerance)


@settings(max_examples=60, deadline=None)
@given(problems(max_branches=1), st.integers(0, 50))
def test_one_branch_covering_the_sequence_without_dilation_equals_dense(problem, extra):
    q, k, v, _ = problem.arrays
    w = problem.n + extra  # w >= N: one segment, the whole sequence
    out, lse = dilated_attention(q, k, v, [max(w, 1)], [1], causal=problem.causal, return_lse=True)
    dense_out, dense_lse = dense_attention(q, k, v, causal=problem.causal, return_lse=True)
    np.testing.assert_allclose(out, dense_out, **problem.tolerance)
    np.testing.assert_allclose(lse, dense_lse, **problem.tolerance)


@settings(max_examples=60, deadline=None)
@given(problems(max_branches=1))
def test_rows_covered_by_no_branch_are_zero_with_lse_minus_infinity(problem):
    q, k, v, _ = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    covered = problem.multiplicity().any(axis=2)  # (H, N), the loop oracle's index rule
    uncovered = ~covered.T[None].repeat(problem.batch, 0)  # (B, N, H)
    assert np.all(out[uncovered] == 0)
    assert np.all(lse[uncovered] == -np.inf)
    assert np.all(np.isfinite(lse[~uncovered]))


@settings(max_examples=80, deadline=None)
@given(problems(max_branches=4, scales=True))
def test_mixture_is_the_softmax_denominator_weighted_sum_of_branches(problem):
    """Paper Eqs. 9-10 written out: each branch alone, then out = sum_i exp(lse_i - LSE) o_i."""
    q, k, v, _ = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    single = [dilated_attention(q, k, v, [w], [r], return_lse=True, **problem.options) for w, r in zip(*problem.branches)]
    lses = np.stack([l for _, l in single])  # (k, B, N, H)
    expected_lse = np.logaddexp.reduce(lses, axis=0)
    with np.errstate(invalid="ignore"):
        alphas = np.nan_to_num(np.exp(lses - expected_lse))  # 0 for uncovered rows (-inf - -inf)
    expected_out = sum(a[..., None] * o for a, (o, _) in zip(alphas, single))
    np.testing.assert_allclose(lse, expected_lse, **problem.tolerance)
    np.testing.assert_allclose(out, expected_out, **problem.tolerance)


def union_attention(problem, counts):
    """Dense attention over the *set* of keys some branch attends (a 0/1 mask, no multiplicity)."""
    q, k, v, _ = problem.arrays
    return dense_attention(q, k, v, bias=np.where(counts > 0, 0.0, -np.inf)[None], **problem.dense_options)


@settings(max_examples=80, deadline=None)
@given(problems(min_branches=2, scales=True))
def test_rows_whose_keys_no_two_branches_share_attend_over_the_union(problem):
    """The paper's remark, where it applies: if no key of row p is counted twice, the mixture
    is attention over the union of the branches' keys."""
    q, k, v, _ = problem.arrays
    counts = problem.multiplicity()  # (H, N, N)
    out = dilated_attention(q, k, v, *problem.branches, **problem.options)
    disjoint_rows = np.broadcast_to((counts.max(axis=2, initial=0) <= 1).T[None], out.shape[:3])  # (B, N, H)
    np.testing.assert_allclose(out[disjoint_rows], union_attention(problem, counts)[disjoint_rows], **problem.tolerance)


@settings(max_examples=60, deadline=None)
@given(problems(min_branches=2, max_n=40, dtypes=(np.float64,)))
def test_a_row_covered_by_several_branches_counts_itself_once_per_branch(problem):
    """Why the remark cannot hold for a whole multi-branch configuration: each branch covering p
    attends (p, p), so the library's ``m[h, p, p]`` is the number of branches whose segment
    selects ``p`` for head ``h``: counted here from the SPEC §2 rule written out (offset ``o_h``,
    ``p mod w >= o_h`` and ``(p mod w - o_h) mod r = 0``). Head 0 (offset 0) covers row 0 in
    every branch."""
    counts = multiplicity(problem.n, problem.num_heads, *problem.branches, **problem.index_options)  # (H, N, N)
    if problem.n:
        assert counts[0, 0, 0] == len(problem.segment_lengths)
    covering = np.zeros((problem.num_heads, problem.n), int)
    for h in range(problem.num_heads):
        for p in range(problem.n):
            for w, r in zip(*problem.branches):
                o = oracle.head_offset(h, r, problem.num_heads, problem.offsets)
                covering[h, p] += p % w >= o and (p % w - o) % r == 0
    np.testing.assert_array_equal(np.diagonal(counts, axis1=1, axis2=2), covering)


def test_overlapping_paper_branches_count_shared_keys_several_times():
    """The paper's configuration overlaps (torchscale issue #108): a 0/1 union oracle is wrong."""
    from .strategies import Problem

    problem = Problem(1, 64, 4, 8, 8, [8, 16, 32], [1, 2, 4], False, "paper", np.dtype(np.float64), seed=7)
    q, k, v, _ = problem.arrays
    counts = problem.multiplicity()
    assert counts.max() == 3  # a key in all three branches
    assert (counts > 1).sum() > counts.size // 100
    out = dilated_attention(q, k, v, *problem.branches)
    np.testing.assert_allclose(out, dense_attention(q, k, v, bias=problem.multiplicity_bias()), **problem.tolerance)
    assert np.abs(out - union_attention(problem, counts)).max() > 1e-2
