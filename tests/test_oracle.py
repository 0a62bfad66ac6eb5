"""The library against the brute-force loop oracle (``tests/oracle.py``), which shares none of its code.

The dense oracle, the multiplicity matrix and every CPU backend are compared, forward and
backward, with the SPEC written out as loops: its own offsets, segments and causal rule, its own
softmax (``scipy.special.logsumexp``), its own chain-rule backward, its own default scale. A bug
in a helper the library's implementations share therefore shows up here even when they still
agree with one another. Sizes are small because the oracle is ``O(B H N^2)`` Python steps.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dense_attention, dense_attention_backward, dilated_attention, dilated_attention_backward, multiplicity

from . import oracle
from .strategies import Problem, problems

CPU_BACKENDS = ["numpy", "numba"]

# Small enough for the loops (<= 2 * 4 * 28 query rows of <= 28 keys), large enough for several
# segments per branch, ragged last segments, w % r != 0, r > w and H % r != 0.
SMALL = dict(max_n=28, max_heads=4, max_dim=6, max_branches=3, max_segment=30, max_dilation=5)


def assert_close(name, got, want, tolerance):
    """``got`` (the library, in its dtype) equals the float64 oracle, -inf and NaN included."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, err_msg=name, **tolerance)


@settings(max_examples=80, deadline=None)
@given(problems(**{**SMALL, "max_branches": 4}))
def test_multiplicity_counts_the_branches_linking_each_query_to_each_key(problem):
    counts = multiplicity(problem.n, problem.num_heads, *problem.branches, **problem.index_options)
    expected = oracle.multiplicity(problem.n, problem.num_heads, *problem.branches, problem.causal, problem.offsets)
    np.testing.assert_array_equal(counts, expected)


def random_bias(problem, data):
    """A bias of a drawn broadcastable shape: normal entries, about a quarter of them -inf."""
    b, h, n = problem.batch, problem.num_heads, problem.n
    shape = data.draw(st.sampled_from([(b, h, n, n), (1, h, n, n), (n, n)]), label="bias shape")
    rng = np.random.default_rng(problem.seed + 2)
    bias = rng.standard_normal(shape)
    bias[rng.random(shape) < 0.25] = -np.inf
    return bias


@settings(max_examples=60, deadline=None)
@given(problems(**SMALL, scales=True), st.data())
def test_dense_attention_equals_the_loop_oracle(problem, data):
    q, k, v, dout = problem.arrays
    bias = random_bias(problem, data)
    out, lse = dense_attention(q, k, v, bias=bias, return_lse=True, **problem.dense_options)
    grads = dense_attention_backward(dout, q, k, v, out, lse, bias=bias, **problem.dense_options)
    want_out, want_lse = oracle.attention(q, k, v, bias=bias, **problem.dense_options)
    want_grads = oracle.attention_gradients(dout, q, k, v, bias=bias, **problem.dense_options)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want_grads)):
        assert got.dtype == problem.dtype, name
        assert_close(name, got, want, problem.tolerance)


def assert_backend_equals_oracle(problem, backend):
    q, k, v, dout = problem.arrays
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, backend=backend, **problem.options)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, backend=backend, **problem.options)
    want_out, want_lse = oracle.dilated_attention(q, k, v, *problem.branches, **problem.options)
    want_grads = oracle.dilated_attention_gradients(dout, q, k, v, *problem.branches, **problem.options)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want_grads)):
        assert got.dtype == problem.dtype, f"{backend}: {name}"
        assert_close(f"{backend}: {name}", got, want, problem.tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=60, deadline=None)
@given(problem=problems(**SMALL, scales=True))
def test_every_cpu_backend_equals_the_loop_oracle(backend, problem):
    assert_backend_equals_oracle(problem, backend)


# D = 9: the default 1/sqrt(D) = 1/3 is far from 1/D = 1/9 and from 1; several segments,
# ragged, two overlapping branches, both offset rules.
FIXED = dict(batch=2, n=20, num_heads=3, head_dim=9, value_dim=4, segment_lengths=[6, 20], dilation_rates=[2, 3])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("scale", [None, 0.3], ids=["default scale", "given scale"])
@pytest.mark.parametrize("causal, offsets", [(False, "paper"), (True, "torchscale")])
def test_default_and_given_scales_are_the_spec_scales(backend, scale, causal, offsets):
    problem = Problem(**FIXED, causal=causal, offsets=offsets, dtype=np.dtype(np.float64), seed=4, scale=scale)
    assert_backend_equals_oracle(problem, backend)


@pytest.mark.parametrize("scale", [None, 0.3], ids=["default scale", "given scale"])
def test_dense_attention_uses_the_spec_scale(scale):
    problem = Problem(**FIXED, causal=True, offsets="paper", dtype=np.dtype(np.float64), seed=5, scale=scale)
    q, k, v, _ = problem.arrays
    out, lse = dense_attention(q, k, v, return_lse=True, **problem.dense_options)
    want_out, want_lse = oracle.attention(q, k, v, **problem.dense_options)
    assert_close("out", out, want_out, problem.tolerance)
    assert_close("lse", lse, want_lse, problem.tolerance)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=20, deadline=None)
@given(problem=problems(**SMALL, scales=True))
def test_no_value_columns_give_an_empty_output_and_the_true_lse(backend, problem):
    """``Dv = 0``: ``out`` is ``(B, N, H, 0)``, ``lse`` is still the log-sum-exp of the scores."""
    q, k, _, _ = problem.arrays
    v = np.zeros(q.shape[:3] + (0,), problem.dtype)  # (B, N, H, 0)
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, backend=backend, **problem.options)
    assert out.shape == v.shape and out.dtype == problem.dtype
    _, want_lse = oracle.dilated_attention(q, k, v, *problem.branches, **problem.options)
    assert_close("lse", lse, want_lse, problem.tolerance)
    grads = dilated_attention_backward(out, q, k, v, out, lse, *problem.branches, backend=backend, **problem.options)
    for name, g, x in zip("qkv", grads, (q, k, v)):  # no output column: nothing depends on q, k
        assert g.shape == x.shape and np.all(g == 0), f"d{name}"
