"""The multiplicity matrix: how many branches link query ``p`` to key ``k`` (SPEC §4).

    m_h(p, k) = #{ i : k in K_i(p) for head h }

With it the mixture of branches is one dense softmax with additive bias ``log m``
(``-inf`` where ``m = 0``): the bridge between dilated attention and the dense oracle.
Docs: ``docs/mixture.md``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .index_sets import segment_position, segment_size, sparse_segments
from .validation import check_flag, check_int, validate_branches, validate_offset_rule


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
    ``m = 0``): [mixture](mixture.md), [worked example](worked_example.md). Every sparse segment
    ``P(i, s, h)`` is the arithmetic progression ``s w + o + t r``, so its block of ``m`` is the
    slice ``[start:stop:r, start:stop:r]``: each of its queries sees each of its keys (only the
    keys ``t_k <= t`` under ``causal=True``), once per branch.

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
        ValueError: a negative ``n`` or ``num_heads``, bad branch lists, an unknown ``offsets``
            (SPEC §7).
        TypeError: a non-integer ``n``, ``num_heads``, ``w`` or ``r`` (``InputTypeError``, also a
            ``ValueError``), a non-bool ``causal``.
    """
    n, num_heads = check_int(n, "n", minimum=0), check_int(num_heads, "num_heads", minimum=0)
    branches = validate_branches(segment_lengths, dilation_rates)
    offsets = validate_offset_rule(offsets)
    causal = check_flag(causal, "causal")
    counts = np.zeros((num_heads, n, n), np.int32)  # (H, N, N)
    for group in sparse_segments(n, num_heads, branches, offsets):
        w, r, o = group.segment_length, group.dilation, group.offset
        rows_per_segment = group.positions.shape[1]  # the longest segment's T
        # K_i(p) for every query row t of a segment: all T keys, or under causal=True the keys
        # t_k <= t (a shorter segment uses the top-left corner of the same triangle).
        linked = np.tri(rows_per_segment, rows_per_segment, dtype=np.int32) if causal else np.ones((1, 1), np.int32)
        for s in range(group.positions.shape[0]):
            size = segment_size(n, w, r, o, s)  # T rows of this segment
            if size == 0:
                continue
            rows = slice(segment_position(w, r, o, s, 0), segment_position(w, r, o, s, size - 1) + 1, r)  # P(i, s, h)
            block = linked[:size, :size] if causal else linked  # (T, T), or 1 broadcast
            for h in group.heads:
                counts[h, rows, rows] += block  # a strided (T, T) view: added in place
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
