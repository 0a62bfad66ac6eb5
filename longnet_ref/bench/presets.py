"""What ``longnet-ref bench`` measures by default: the presets and the defaults of every option.

The command line (``longnet_ref.cli``) takes its defaults from here, so they are written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One benchmarked problem: sizes, branches, causality and dtype."""

    name: str
    n: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    batch: int = 1
    heads: int = 8
    dim: int = 64
    causal: bool = False
    dtype: str = "float32"


PAPER_BRANCHES = dict(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))
LM_BRANCHES = dict(segment_lengths=(2048, 4096, 8192, 16384, 32768), dilation_rates=(1, 2, 4, 6, 12))

PRESETS = {
    "quick": [Config("quick", 4096, (256, 512, 1024), (1, 2, 4), heads=4, dim=64)],
    "paper": [
        Config(f"paper N={n}{' causal' if causal else ''}", n, causal=causal, **PAPER_BRANCHES)
        for n in (16384, 65536)
        for causal in (False, True)
    ],
    "lm": [Config(f"paper LM N={n}", n, **LM_BRANCHES) for n in (32768, 65536)],
    "sweep": [Config(f"sweep N=2^{e}", 2**e, heads=4, **PAPER_BRANCHES) for e in range(14, 21)],
}

BACKENDS = ("numba", "numpy", "cupy", "cupy-fused")
DEFAULT_PRESETS = ("quick",)
DEFAULT_BACKEND = "numba"
DEFAULT_REPEATS = 3  # runs per measurement; the median is reported
DEFAULT_MAX_N = 2**20  # skip configurations longer than this
REFERENCE_MAX_N = 16384  # time the NumPy reference up to this N (its memory grows as N w / r)
DENSE_MAX_N = 16384  # time dense attention up to this N (its memory grows as N^2)
DEFAULT_OUTPUT_DIR = "bench-results"


@dataclass(frozen=True)
class WeakScaling:
    """The distributed benchmark: ``N = P * n_per_rank`` on ``P`` ranks, one shared branch."""

    n_per_rank: int = 8192
    ranks: tuple[int, ...] = (1, 2, 4)
    segment_lengths: tuple[int, ...] = (2048, 16384)  # the second spans two ranks at n_per_rank = 8192
    dilation_rates: tuple[int, ...] = (1, 8)
    heads: int = 4
    dim: int = 64
    causal: bool = False
    backend: str = DEFAULT_BACKEND
    dtype: str = "float32"
    repeats: int = DEFAULT_REPEATS


DISTRIBUTED_BACKENDS = ("numba", "numpy")
