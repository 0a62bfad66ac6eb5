"""The multiplicity matrix: how many branches link query ``p`` to key ``k`` (SPEC §4).

    m_h(p, k) = #{ i : k in K_i(p) for head h }

With it the mixture of branches is one dense softmax with additive bias ``log m``
(``-inf`` where ``m = 0``): the bridge between dilated attention and the dense oracle.
Docs: ``docs/mixture.md``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .config import sparse_segments, validate_branches, validate_offset_rule
from .validation import check_flag


def multiplicity(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
) -> np.ndarray:
    """How many branches let head ``h``'s query ``p`` see key ``k``: ``m_h(p, k)`` (SPEC §4).

    Dilated attention equals dense attention with the additive bias ``log m`` (``-inf`` where
    ``m = 0``): [mixture](mixture.md), [worked example](worked_example.md).

    Memory: the result is dense, ``4 H N^2`` bytes (``int32``), so this is a tool for testing
    and for pictures at small ``N`` (``N = 4096``, ``H = 8``: 512 MiB), not for long sequences.

    Args:
        n: the sequence length ``N``, a non-negative integer.
        num_heads: the number of heads ``H``, a non-negative integer.
        segment_lengths: the branches' ``w_i``, positive integers.
        dilation_rates: the branches' ``r_i``, positive integers, as many as ``w_i``.
        causal: count only keys ``k <= p``.
        offsets: ``"paper"`` or ``"torchscale"`` (SPEC §2).

    Returns:
        ``m``, ``int32`` of shape ``(H, N, N)``: ``m[h, p, k]`` in ``0 .. len(segment_lengths)``.

    Raises:
        ValueError: a negative or non-integer ``n`` or ``num_heads``, bad branch lists, an unknown
            ``offsets`` (SPEC §7).
        TypeError: a ``w`` or ``r`` of the wrong type, a non-bool ``causal``.
    """
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


def multiplicity_bias(counts: np.ndarray) -> np.ndarray:
    """The dense oracle's bias ``log m``, ``-inf`` where ``m = 0``.

    Args:
        counts: ``m``, integer ``(H, N, N)``, as returned by
            [`multiplicity`][longnet_ref.multiplicity.multiplicity].

    Returns:
        ``float64`` ``(1, H, N, N)``, broadcastable to ``(B, H, N, N)`` as ``dense_attention``'s ``bias``.
    """
    with np.errstate(divide="ignore"):
        return np.log(counts.astype(np.float64))[None]
