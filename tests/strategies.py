"""Hypothesis strategies shared by the specification tests (and backend tests).

Tolerances live in ``tests/tolerances.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from hypothesis import strategies as st

from . import oracle
from .tolerances import SUMMATION


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
    scale: float | None = None  # None: the library's default 1/sqrt(D)
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
        return dict(causal=self.causal, offsets=self.offsets, scale=self.scale)

    @property
    def index_options(self):
        """The options that pick rows (what :func:`longnet_ref.multiplicity` takes)."""
        return dict(causal=self.causal, offsets=self.offsets)

    @property
    def dense_options(self):
        """The options :func:`longnet_ref.dense_attention` shares with dilated attention."""
        return dict(causal=self.causal, scale=self.scale)

    @property
    def tolerance(self):
        return SUMMATION[np.dtype(self.dtype)]

    def multiplicity(self):
        """``m (H, N, N)`` counted by the loop oracle's own index rule (``tests/oracle.py``), not by
        the library's ``multiplicity``, which shares ``sparse_segments`` with the implementations."""
        return oracle.multiplicity(self.n, self.num_heads, *self.branches, self.causal, self.offsets)

    def multiplicity_bias(self):
        """The dense oracle's bias ``log m`` (SPEC §4), ``(1, H, N, N)``, from :meth:`multiplicity`."""
        return oracle.multiplicity_bias(self.multiplicity())


def sequence_lengths(max_n):
    """``N`` in ``0..max_n``, with ``N = 1`` (one row, one key: the smallest non-empty case)
    drawn explicitly in about one example in ten rather than one in ``max_n``."""
    return st.integers(0, 9).flatmap(lambda pick: st.just(1) if pick == 0 else st.integers(0, max_n))


@st.composite
def problems(
    draw,
    max_n=96,
    min_branches=1,
    max_heads=6,
    max_dim=16,
    max_branches=4,
    max_segment=128,
    max_dilation=9,
    dtypes=(np.float32, np.float64),
    causal=None,
    scales=False,
    min_value_dim=1,
):
    """Random problems per the core issue: B 1-2, N 0-96, H 1-6, D 1-16, 1-4 arbitrary branches.

    With ``scales=True`` the score scale is drawn too: ``None`` (the default ``1/sqrt(D)``) or
    a real in ``[0.05, 2]``.
    """
    num_branches = draw(st.integers(min_branches, max(min_branches, max_branches)))
    return Problem(
        batch=draw(st.integers(1, 2)),
        n=draw(sequence_lengths(max_n)),
        num_heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.integers(1, max_dim)),
        value_dim=draw(st.integers(min_value_dim, max_dim)),
        segment_lengths=draw(st.lists(st.integers(1, max_segment), min_size=num_branches, max_size=num_branches)),
        dilation_rates=draw(st.lists(st.integers(1, max_dilation), min_size=num_branches, max_size=num_branches)),
        causal=draw(st.booleans()) if causal is None else causal,
        offsets=draw(st.sampled_from(["paper", "torchscale"])),
        dtype=np.dtype(draw(st.sampled_from(dtypes))),
        seed=draw(st.integers(0, 2**32 - 1)),
        scale=draw(st.none() | st.floats(0.05, 2.0)) if scales else None,
    )
