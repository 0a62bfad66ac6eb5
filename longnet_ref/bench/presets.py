"""What ``longnet-ref bench`` measures by default: the presets and the defaults of every option.

The command line (``longnet_ref.cli``) takes its defaults from here, so they are written once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """One benchmarked problem: sizes, branches, causality and dtype.

    Nothing is validated here: a bad configuration is reported by ``dilated_attention`` when it
    runs.

    Attributes:
        name: The label in the tables and plots.
        n: ``N``, the sequence length.
        segment_lengths: ``w_i`` of every branch.
        dilation_rates: ``r_i`` of every branch.
        batch: ``B``.
        heads: ``H``.
        dim: ``D = Dv``.
        causal: Whether the attention is causal.
        dtype: ``"float32"`` or ``"float64"``.
    """

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

PRESETS: dict[str, list[Config]] = {
    "quick": [Config("quick", 4096, (256, 512, 1024), (1, 2, 4), heads=4, dim=64)],
    "paper": [Config(f"paper N={n}{' causal' if causal else ''}", n, causal=causal, **PAPER_BRANCHES) for n in (16384, 65536) for causal in (False, True)],
    "lm": [Config(f"paper LM N={n}", n, **LM_BRANCHES) for n in (32768, 65536)],
    "sweep": [Config(f"sweep N=2^{e}", 2**e, heads=4, **PAPER_BRANCHES) for e in range(14, 21)],
}
"""The configurations of ``longnet-ref bench --preset NAME``: the paper's branches (Table 1),
its language-model branches, and a sweep of ``N`` from ``2^14`` to ``2^20``."""

DEFAULT_PRESETS = ("quick",)
"""``--preset`` when none is given."""
DEFAULT_BACKEND = "numba"
"""``--backend`` when none is given."""
DEFAULT_REPEATS = 3
"""``--repeats``: runs per measurement; the median is reported."""
DEFAULT_MAX_N = 2**20
"""``--max-n``: configurations longer than this are skipped."""
REFERENCE_MAX_N = 16384
"""``--reference-max-n``: the NumPy reference is timed up to this ``N`` (its memory grows as ``N w / r``)."""
DENSE_MAX_N = 16384
"""``--dense-max-n``: dense attention is timed up to this ``N`` (its memory grows as ``N^2``)."""
DEFAULT_OUTPUT_DIR = "bench-results"
"""``--output-dir``: where ``results.json`` and the plots go."""


@dataclass(frozen=True)
class WeakScaling:
    """The distributed benchmark: ``N = P * n_per_rank`` on ``P`` ranks, one shared branch.

    Attributes:
        n_per_rank: ``L``, rows per rank.
        ranks: The rank counts ``P`` to run, one ``mpiexec`` each.
        segment_lengths: ``w_i``; a ``w_i > L`` spans several ranks (a shared branch).
        dilation_rates: ``r_i``.
        heads: ``H``.
        dim: ``D = Dv``.
        causal: Whether the attention is causal.
        backend: The local branches' backend: one with ``distributed=True`` in the registry
            (``longnet_ref.backends.backend_names(distributed=True)``).
        dtype: ``"float32"`` or ``"float64"``.
        repeats: Timed runs after the warm-up; the median is reported.
    """

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
