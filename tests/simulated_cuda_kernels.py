"""Checks of the CUDA kernels run by Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

Run by ``tests/test_cuda_kernels_simulated.py`` in a subprocess (the simulator must be enabled
before Numba is imported): ``python -m tests.simulated_cuda_kernels CHECK [SEED]``. Each check
compares the kernels of ``backend="cupy-fused"`` with the reference (SPEC §3-5) and prints
``ok CHECK`` when it passes. The simulator runs every thread of every block in Python, so the
problems are tiny; ``Geometry(8, 4)`` (8 threads per block, 4 rows per tile) makes them span
several thread blocks and tiles all the same.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from hypothesis import given, seed, settings
from scipy.special import logsumexp

from longnet_ref import reference
from longnet_ref.backends import cuda_kernels
from longnet_ref.backends.cuda_kernels import Geometry
from longnet_ref.validation import validate_branches

from .strategies import Problem, problems
from .tolerances import GPU, HALF_ROUNDING

SMALL = Geometry(block=8, tile=4)


def run_both(arrays, segment_lengths, dilation_rates, causal, offsets, geometry):
    """(out, lse, dq, dk, dv) of the kernels and of the reference, the backward from the reference's out/lse."""
    q, k, v, dout = arrays
    branches, scale = validate_branches(segment_lengths, dilation_rates), 1 / math.sqrt(q.shape[3])
    expected = reference.forward(q, k, v, branches, causal, scale, offsets)
    got = cuda_kernels.forward(np, q, k, v, branches, causal, scale, offsets, geometry)
    expected += reference.backward(dout, q, k, v, *expected, branches, causal, scale, offsets)
    got += cuda_kernels.backward(np, dout, q, k, v, *expected[:2], branches, causal, scale, offsets, geometry)
    return got, expected


def assert_agree(got, expected, tolerance):
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], **tolerance, err_msg=name)
        np.testing.assert_array_equal(a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)], err_msg=name)


def check_random(hypothesis_seed: int):
    """Random tiny problems (ragged, causal or not, both offset rules, r > w, several blocks)."""

    @seed(hypothesis_seed)
    @settings(max_examples=20, deadline=None, database=None)
    @given(problems(max_n=40, max_heads=3, max_dim=4, max_branches=3, max_segment=48, max_dilation=5))
    def agree(problem):
        got, expected = run_both(problem.arrays, *problem.branches, problem.causal, problem.offsets, SMALL)
        assert_agree(got, expected, GPU[problem.dtype])

    agree()


def check_production_geometry():
    """The real block (128 threads) and tile sizes: a causal segment over two blocks and three tiles."""
    problem = Problem(1, 150, 1, 2, 3, [150, 64], [1, 2], True, "paper", np.dtype(np.float32), seed=3)
    got, expected = run_both(problem.arrays, *problem.branches, problem.causal, problem.offsets, Geometry())
    assert_agree(got, expected, GPU[problem.dtype])


def check_nan_rows():
    """A NaN in a value row and in a key row reaches exactly the rows that attend it (SPEC §7)."""
    for causal in (False, True):
        problem = Problem(1, 23, 2, 3, 2, [4, 9, 40], [1, 2, 3], causal, "paper", np.dtype(np.float64), seed=1)
        q, k, v, dout = (x.copy() for x in problem.arrays)
        v[0, 3, 0, 0] = np.nan
        k[0, 14, 1, 2] = np.nan
        got, expected = run_both((q, k, v, dout), *problem.branches, causal, "paper", SMALL)
        assert np.isnan(expected[0]).any() and not np.isnan(expected[0]).all()
        assert_agree(got, expected, GPU[problem.dtype])


def check_weightless_rows():
    """A query whose every score is -inf (SPEC §5): out 0, lse -inf, dq 0, and nothing added to
    dk, dv, not even its NaN dout; the reference decides the expected values."""
    for causal in (False, True):
        problem = Problem(1, 23, 2, 3, 2, [4, 9, 40], [1, 2, 3], causal, "paper", np.dtype(np.float64), seed=6)
        q, k, v, dout = (x.copy() for x in problem.arrays)
        k = np.abs(k) + 0.5  # every product with the -inf query below is -inf
        q[0, 12, 0] = -np.inf
        dout[0, 12, 0] = np.nan
        got, expected = run_both((q, k, v, dout), *problem.branches, causal, "paper", SMALL)
        assert expected[1][0, 12, 0] == -np.inf and all(np.isfinite(g).all() for g in expected[2:])
        assert_agree(got, expected, GPU[problem.dtype])


def check_empty_sequence():
    problem = Problem(1, 0, 2, 3, 3, [4], [2], False, "paper", np.dtype(np.float64), seed=0)
    got, expected = run_both(problem.arrays, *problem.branches, False, "paper", SMALL)
    assert_agree(got, expected, GPU[problem.dtype])


def check_zero_value_dim():
    """Dv = 0: out is (B, N, H, 0) and lse the true log-sum-exp of the scores (SPEC §1)."""
    rng = np.random.default_rng(5)
    q, k = (rng.standard_normal((2, 12, 2, 3)) for _ in range(2))
    v = dout = np.zeros((2, 12, 2, 0))
    for causal in (False, True):
        out, lse = cuda_kernels.forward(np, q, k, v, validate_branches([12], [1]), causal, 1 / math.sqrt(3), "paper", SMALL)
        scores = np.einsum("bphc,bkhc->bhpk", q, k) / math.sqrt(3)  # (B, H, N, N), one branch w = N, r = 1
        if causal:
            scores = np.where(np.tri(12, dtype=bool), scores, -np.inf)
        assert out.shape == (2, 12, 2, 0)
        np.testing.assert_allclose(lse, logsumexp(scores, axis=-1).transpose(0, 2, 1), **GPU[np.dtype(np.float64)])
        grads = cuda_kernels.backward(np, dout, q, k, v, out, lse, validate_branches([12], [1]), causal, 1 / math.sqrt(3), "paper", SMALL)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
        assert all(not g.any() for g in grads)  # no output component: zero gradient


def check_float16():
    """float16 inputs: accumulated in float32, out and grads in float16, lse in float32.

    The reference runs in float64 on the same (float16-representable) inputs, so the only
    errors are float32 accumulation (~1e-6) and the final rounding to float16, at most one unit
    roundoff 2^-11 relative: rtol 2^-10, and atol 2^-10 of the largest magnitude.
    """
    for causal, offsets in ((False, "paper"), (True, "torchscale")):
        problem = Problem(1, 30, 3, 4, 5, [8, 30], [1, 3], causal, offsets, np.dtype(np.float16), seed=11)
        half = problem.arrays
        wide = tuple(x.astype(np.float64) for x in half)
        branches, scale = validate_branches(*problem.branches), 0.5
        out, lse = cuda_kernels.forward(np, *half[:3], branches, causal, scale, offsets, SMALL)
        want_out, want_lse = reference.forward(*wide[:3], branches, causal, scale, offsets)
        assert out.dtype == np.float16 and lse.dtype == np.float32
        grads = cuda_kernels.backward(np, half[3], *half[:3], out, lse, branches, causal, scale, offsets, SMALL)
        want_grads = reference.backward(wide[3], *wide[:3], want_out, want_lse, branches, causal, scale, offsets)
        np.testing.assert_allclose(lse, want_lse, rtol=HALF_ROUNDING["float16"]["lse"], atol=HALF_ROUNDING["float16"]["lse"])
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (want_out, *want_grads)):
            assert got.dtype == np.float16, name
            tol = HALF_ROUNDING["float16"][name]
            np.testing.assert_allclose(got.astype(np.float64), want, rtol=tol, atol=tol * np.abs(want).max(), err_msg=name)


CHECKS = {
    "random": check_random,
    "production-geometry": check_production_geometry,
    "nan-rows": check_nan_rows,
    "weightless-rows": check_weightless_rows,
    "empty-sequence": check_empty_sequence,
    "zero-value-dim": check_zero_value_dim,
    "float16": check_float16,
}

if __name__ == "__main__":
    name = sys.argv[1]
    CHECKS[name](*(int(a) for a in sys.argv[2:]))
    print("ok", name)
