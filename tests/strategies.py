"""Hypothesis strategies and tolerances shared by the specification tests (and backend tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from longnet_ref.multiplicity import multiplicity, multiplicity_bias

# Tolerances, by dtype, for two computations of the same attention that sum in different orders.
# Unit roundoff u = 6e-8 (float32), 1.1e-16 (float64); the longest sum is over N * branches
# <= 96 * 4 keys, so the rounding of a sum of O(1) terms is bounded by about 400 u: 2.4e-5 in
# float32, 4.4e-14 in float64. The gradients' dS = P * (dP - Dsum) subtract O(1) quantities, so
# their absolute error is of that order times the O(1..10) magnitudes of unit-normal inputs.
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-4),
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-11),
}


@dataclass
class Problem:
    """One random dilated-attention problem: sizes, branches and options."""

    batch: int
    n: int
    num_heads: int
    head_dim: int
    value_dim: int
    segment_lengths: list[int]
    dilation_rates: list[int]
    causal: bool
    offsets: str
    dtype: np.dtype
    seed: int
    arrays: tuple = field(init=False, repr=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        qk_shape = (self.batch, self.n, self.num_heads, self.head_dim)  # (B, N, H, D)
        v_shape = (self.batch, self.n, self.num_heads, self.value_dim)  # (B, N, H, Dv)
        self.arrays = tuple(rng.standard_normal(s).astype(self.dtype) for s in (qk_shape, qk_shape, v_shape, v_shape))

    @property
    def branches(self):
        return self.segment_lengths, self.dilation_rates

    @property
    def options(self):
        return dict(causal=self.causal, offsets=self.offsets)

    @property
    def tolerance(self):
        return TOLERANCE[np.dtype(self.dtype)]

    def multiplicity_bias(self):
        """The dense oracle's bias ``log m`` (SPEC §4), ``(1, H, N, N)``."""
        return multiplicity_bias(multiplicity(self.n, self.num_heads, *self.branches, **self.options))


@st.composite
def problems(draw, max_n=96, min_branches=1, max_heads=6, max_dim=16, max_branches=4, max_segment=128, max_dilation=9, dtypes=(np.float32, np.float64), causal=None):
    """Random problems per the core issue: B 1-2, N 0-96, H 1-6, D 1-16, 1-4 arbitrary branches."""
    num_branches = draw(st.integers(min_branches, max(min_branches, max_branches)))
    return Problem(
        batch=draw(st.integers(1, 2)),
        n=draw(st.integers(0, max_n)),
        num_heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.integers(1, max_dim)),
        value_dim=draw(st.integers(1, max_dim)),
        segment_lengths=draw(st.lists(st.integers(1, max_segment), min_size=num_branches, max_size=num_branches)),
        dilation_rates=draw(st.lists(st.integers(1, max_dilation), min_size=num_branches, max_size=num_branches)),
        causal=draw(st.booleans()) if causal is None else causal,
        offsets=draw(st.sampled_from(["paper", "torchscale"])),
        dtype=np.dtype(draw(st.sampled_from(dtypes))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )
