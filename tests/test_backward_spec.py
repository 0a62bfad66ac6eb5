"""SPEC §5: the backward is the exact gradient of the forward."""

import numpy as np
from hypothesis import given, settings

from longnet_ref import dense_attention, dense_attention_backward, dilated_attention, dilated_attention_backward

from . import oracle
from .oracle import central_differences
from .strategies import Problem, problems
from .tolerances import FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCES


def forward_and_backward(problem):
    q, k, v, dout = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    return out, lse, dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, **problem.options)


@settings(max_examples=150, deadline=None)
@given(problems(scales=True))
def test_backward_equals_dense_backward_with_multiplicity_bias(problem):
    q, k, v, dout = problem.arrays
    _, _, grads = forward_and_backward(problem)
    bias = problem.multiplicity_bias()
    out, lse = dense_attention(q, k, v, bias=bias, return_lse=True, **problem.dense_options)
    dense_grads = dense_attention_backward(dout, q, k, v, out, lse, bias=bias, **problem.dense_options)
    for name, grad, expected, x in zip("qkv", grads, dense_grads, (q, k, v)):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        np.testing.assert_allclose(grad, expected, err_msg=f"d{name}", **problem.tolerance)


@settings(max_examples=25, deadline=None)
@given(problems(max_n=12, max_heads=3, max_dim=3, max_segment=14, max_dilation=4, dtypes=(np.float64,)))
def test_backward_equals_central_finite_differences(problem):
    q, k, v, dout = problem.arrays
    _, _, grads = forward_and_backward(problem)
    loss = lambda: float((dilated_attention(q, k, v, *problem.branches, **problem.options) * dout).sum())
    for name, grad, x in zip("qkv", grads, (q, k, v)):
        expected = central_differences(loss, x, FINITE_DIFFERENCE_STEP)
        np.testing.assert_allclose(grad, expected, err_msg=f"d{name}", **FINITE_DIFFERENCES)


def detached_weights_gradient(problem):
    """What torchscale computes: each branch backpropagated alone, alpha_i held constant."""
    q, k, v, dout = problem.arrays
    single = [dilated_attention(q, k, v, [w], [r], return_lse=True, **problem.options) for w, r in zip(*problem.branches)]
    lse = np.logaddexp.reduce(np.stack([l for _, l in single]), axis=0)
    total = [np.zeros_like(x) for x in (q, k, v)]
    for (w, r), (out_i, lse_i) in zip(zip(*problem.branches), single):
        alpha_i = np.exp(lse_i - np.where(lse == -np.inf, np.inf, lse))[..., None]  # (B, N, H, 1)
        grads = dilated_attention_backward(alpha_i * dout, q, k, v, out_i, lse_i, [w], [r], **problem.options)
        total = [t + g for t, g in zip(total, grads)]
    return total


def test_detaching_the_mixture_weights_gives_a_different_gradient():
    """Regression against torchscale's no_grad mixture weights (SPEC §5, §8).

    alpha_i = exp(lse_i - LSE) depends on the scores, hence on q and k. Holding it constant
    drops the term alpha_i * (o_i - out) . dout of dS, i.e. each branch uses its own
    Dsum_i = dout . o_i instead of the global Dsum = dout . out. dv does not involve Dsum, so
    it is unchanged; dq and dk are wrong by O(1) relative amounts wherever branches overlap.
    """
    problem = Problem(1, 64, 4, 8, 8, [8, 16, 32], [1, 2, 4], False, "paper", np.dtype(np.float64), seed=3)
    _, _, exact = forward_and_backward(problem)
    detached = detached_weights_gradient(problem)
    np.testing.assert_allclose(detached[2], exact[2], **problem.tolerance)  # dv agrees
    for name, d, e in zip("qk", detached[:2], exact[:2]):
        relative = np.abs(d - e).max() / np.abs(e).max()
        assert relative > 0.05, f"d{name}: detached weights should be visibly wrong, got {relative:.3g}"


def test_detached_weights_gradient_is_exact_for_one_branch():
    """With one branch alpha = 1 and nothing is lost: the regression test's oracle (built from the
    library's single-branch calls) equals the loop oracle's chain-rule gradient."""
    problem = Problem(2, 24, 3, 5, 4, [8], [2], True, "paper", np.dtype(np.float64), seed=5)
    q, k, v, dout = problem.arrays
    want = oracle.dilated_attention_gradients(dout, q, k, v, [8], [2], causal=True, offsets="paper")
    for name, d, e in zip("qkv", detached_weights_gradient(problem), want):
        np.testing.assert_allclose(d, e, err_msg=f"d{name}", **problem.tolerance)
