"""The multiplicity matrix: how many branches link query ``p`` to key ``k`` (SPEC §4).

    m_h(p, k) = #{ i : k in K_i(p) for head h }

With it the mixture of branches is one dense softmax with additive bias ``log m``
(``-inf`` where ``m = 0``): the bridge between dilated attention and the dense oracle.
Docs: ``docs/mixture.md``.
"""

from __future__ import annotations

import numpy as np

from .config import sparse_segments, validate_branches, validate_offset_rule
from .validation import check_flag


def multiplicity(n, num_heads, segment_lengths, dilation_rates, *, causal=False, offsets="paper"):
    """``m (H, N, N)``: the number of branches in which head ``h``'s query ``p`` sees key ``k``."""
    for name, value in (("n", n), ("num_heads", num_heads)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    branches = validate_branches(segment_lengths, dilation_rates)
    offsets = validate_offset_rule(offsets)
    causal = check_flag(causal, "causal")
    counts = np.zeros((num_heads, n, n), np.int32)  # (H, N, N)
    for segments in sparse_segments(n, num_heads, branches, offsets):
        attended = segments.attended(causal)  # (S, Tq, Tk)
        query = np.broadcast_to(segments.positions[:, :, None], attended.shape)[attended]  # (M,)
        key = np.broadcast_to(segments.positions[:, None, :], attended.shape)[attended]  # (M,)
        # Each (p, k) pair appears once per branch and offset group: no collision in +=.
        counts[segments.heads[:, None], query[None, :], key[None, :]] += 1
    return counts


def multiplicity_bias(counts):
    """``log m`` with ``-inf`` where ``m = 0``: the dense oracle's bias, ``(H, N, N)`` -> ``(1, H, N, N)``."""
    with np.errstate(divide="ignore"):
        return np.log(counts.astype(np.float64))[None]
