"""Cost and reach of dilated attention: exact counts, the paper's closed forms, path length.

LongNet (arXiv 2307.02486) §2.4. Every count here is taken from the same index sets the
implementation attends over (``index_sets.sparse_segments``), so "the FLOPs we claim" and "the
FLOPs we do" cannot drift apart.

- One branch, ``N`` divisible by ``w`` and ``w`` by ``r`` (Eq. 16):
  ``N/w`` segments of ``w/r`` rows, ``(w/r)^2`` pairs each: ``2 N w d / r^2`` FLOPs for ``Q K^T``.
- All branches (Eq. 17): ``2 N d sum_i w_i / r_i^2``; with geometric ``w_i = w_0 alpha^i``,
  ``r_i = alpha^i`` each term is ``w_0 / alpha^i`` and the sum is at most
  ``2 alpha / (alpha - 1) w_0 N d`` (Eq. 18): linear in ``N``.
- Path length (Eqs. 19-20): a token reaches distance ``sum_{i<l} w_0 alpha^i`` in ``l`` layers,
  so about ``log_alpha(N (alpha - 1) / w_0)`` layers link any two of ``N`` tokens. That holds
  only under conditions (always non-causally for geometric branches with ``alpha | w_0``; causally
  only if every pair of neighbours shares a dilation-1 segment): ``docs/complexity.md`` proves
  both and ``tests/test_connectivity.py`` tests them.

Docs: ``docs/complexity.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np

from .index_sets import sparse_segments
from .validation import check_flag, check_int, validate_branches, validate_offset_rule


def _check_sizes(n, num_heads, batch=1, head_dim=1, value_dim=None, causal=False):
    """The counts' shared arguments (SPEC §7): sizes are integers, ``D, Dv >= 1``, ``causal`` a bool."""
    check_int(n, "n", minimum=0)
    check_int(num_heads, "num_heads", minimum=0)
    check_int(batch, "batch", minimum=0)
    check_int(head_dim, "head_dim", minimum=1)
    if value_dim is not None:
        check_int(value_dim, "value_dim", minimum=1)
    check_flag(causal, "causal")


@dataclass(frozen=True)
class Flops:
    """Floating-point operations of one forward pass, 2 per multiply-add.

    Attributes:
        qk: FLOPs of the scores ``S = Q K^T``: ``2 D`` per attended pair.
        pv: FLOPs of ``O = P V``: ``2 Dv`` per attended pair.
    """

    qk: int  # S = Q K^T: 2 D per attended pair
    pv: int  # O = P V:   2 Dv per attended pair

    @property
    def total(self) -> int:
        """``qk + pv``."""
        return self.qk + self.pv


def attended_pairs(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
    batch: int = 1,
) -> int:
    """The exact number of (query, key) pairs dilated attention scores, over all branches.

    A sparse segment of ``c`` rows scores ``c^2`` pairs, or ``c (c + 1) / 2`` causally; pairs
    that two branches share are counted twice, because both branches compute them.

    Args:
        n: the sequence length ``N``.
        num_heads: the number of heads ``H``.
        segment_lengths: the branches' ``w_i``, positive integers.
        dilation_rates: the branches' ``r_i``, positive integers, as many as ``w_i``.
        causal: count only keys ``k <= p``.
        offsets: ``"paper"`` or ``"torchscale"`` (SPEC §2).
        batch: the batch size ``B``.

    Returns:
        The number of pairs, summed over batch, heads, branches and segments.

    Raises:
        ValueError: bad branch lists or ``offsets``, a negative size (SPEC §7).
        InputTypeError: a non-integer size, a non-bool ``causal``.
    """
    _check_sizes(n, num_heads, batch, causal=causal)
    branches = validate_branches(segment_lengths, dilation_rates)
    pairs = 0
    for segments in sparse_segments(n, num_heads, branches, validate_offset_rule(offsets)):
        rows = segments.valid.sum(axis=1).astype(np.int64)  # (S,) c = |I(i, s, h)|
        per_head = rows * (rows + 1) // 2 if causal else rows * rows
        pairs += int(per_head.sum()) * len(segments.heads)
    return batch * pairs


def dilated_flops(
    n: int,
    num_heads: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    value_dim: int | None = None,
    causal: bool = False,
    offsets: str = "paper",
    batch: int = 1,
) -> Flops:
    """Exact forward FLOPs of dilated attention: ``2 D`` per pair for ``Q K^T``, ``2 Dv`` for ``P V``.

    Args:
        n: the sequence length ``N``.
        num_heads: the number of heads ``H``.
        head_dim: ``D``.
        segment_lengths: the branches' ``w_i``, positive integers.
        dilation_rates: the branches' ``r_i``, positive integers, as many as ``w_i``.
        value_dim: ``Dv``; ``D`` when ``None``.
        causal: count only keys ``k <= p``.
        offsets: ``"paper"`` or ``"torchscale"`` (SPEC §2).
        batch: the batch size ``B``.

    Returns:
        The FLOPs of ``Q K^T`` and of ``P V`` (the pairs of
        [`attended_pairs`][longnet_ref.complexity.attended_pairs] times ``2 D`` and ``2 Dv``).

    Raises:
        ValueError: bad branch lists or ``offsets``, a negative size, ``D`` or ``Dv < 1`` (SPEC §7).
        InputTypeError: a non-integer size, a non-bool ``causal``.
    """
    _check_sizes(n, num_heads, batch, head_dim, value_dim, causal)
    value_dim = head_dim if value_dim is None else value_dim
    pairs = attended_pairs(n, num_heads, segment_lengths, dilation_rates, causal=causal, offsets=offsets, batch=batch)
    return Flops(qk=2 * head_dim * pairs, pv=2 * value_dim * pairs)


def dense_pairs(n: int, num_heads: int, *, causal: bool = False, batch: int = 1) -> int:
    """Pairs scored by dense attention: ``N^2`` per head, ``N (N + 1) / 2`` causally.

    Args:
        n: the sequence length ``N``.
        num_heads: the number of heads ``H``.
        causal: count only keys ``k <= p``.
        batch: the batch size ``B``.

    Returns:
        ``B H N^2``, or ``B H N (N + 1) / 2`` causally.

    Raises:
        ValueError: a negative size. InputTypeError: a non-integer size, a non-bool ``causal``.
    """
    _check_sizes(n, num_heads, batch, causal=causal)
    return batch * num_heads * (n * (n + 1) // 2 if causal else n * n)


def dense_flops(n: int, num_heads: int, head_dim: int, *, value_dim: int | None = None, causal: bool = False, batch: int = 1) -> Flops:
    """Forward FLOPs of dense attention: ``4 N^2 H D`` for ``D = Dv`` (non-causal).

    Args:
        n: the sequence length ``N``.
        num_heads: the number of heads ``H``.
        head_dim: ``D``.
        value_dim: ``Dv``; ``D`` when ``None``.
        causal: count only keys ``k <= p``.
        batch: the batch size ``B``.

    Returns:
        ``2 D`` and ``2 Dv`` times [`dense_pairs`][longnet_ref.complexity.dense_pairs].

    Raises:
        ValueError: a negative size, ``D`` or ``Dv < 1``. InputTypeError: a non-integer size.
    """
    _check_sizes(n, num_heads, batch, head_dim, value_dim, causal)
    value_dim = head_dim if value_dim is None else value_dim
    pairs = dense_pairs(n, num_heads, causal=causal, batch=batch)
    return Flops(qk=2 * head_dim * pairs, pv=2 * value_dim * pairs)


def closed_form_flops(
    n: int,
    head_dim: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    num_heads: int = 1,
    batch: int = 1,
) -> float:
    """The paper's ``Q K^T`` FLOPs (Eq. 17; Eq. 16 for one branch): ``2 N d sum_i w_i / r_i^2`` per head.

    Exact when every ``w_i`` divides ``N`` and every ``r_i`` divides ``w_i`` (non-causal);
    otherwise an estimate (a segment longer than ``N`` is counted at its full length ``w``).

    Args:
        n: the sequence length ``N``.
        head_dim: ``d``.
        segment_lengths: the branches' ``w_i``, positive integers.
        dilation_rates: the branches' ``r_i``, positive integers, as many as ``w_i``.
        num_heads: ``H``, a factor.
        batch: ``B``, a factor.

    Returns:
        ``B H 2 N d sum_i w_i / r_i^2`` (a float: exact rationals, rounded once).

    Raises:
        ValueError: bad branch lists, a negative size, ``d < 1`` (SPEC §7).
        InputTypeError: a non-integer size.
    """
    _check_sizes(n, num_heads, batch, head_dim)
    branches = validate_branches(segment_lengths, dilation_rates)
    # Exact rationals: the sum of w / r^2 is a whole number of FLOPs only after multiplying by N.
    return float(batch * num_heads * 2 * n * head_dim * sum(Fraction(b.segment_length, b.dilation**2) for b in branches))


def geometric_configuration(n: int, first_segment_length: int, ratio: int) -> tuple[list[int], list[int]]:
    """The paper's geometric branches (Eqs. 11-12): ``w_i = w_0 alpha^i``, ``r_i = alpha^i``.

    Args:
        n: the sequence length ``N``: branches are added up to the first ``w_i >= N``.
        first_segment_length: ``w_0``.
        ratio: ``alpha``, an integer ``>= 2``.

    Returns:
        ``(segment_lengths, dilation_rates)``, lists of ``k = 1 + ceil(log_alpha(N / w_0))``
        integers (one branch when ``w_0 >= N``).

    Raises:
        ValueError: ``n < 1``, ``w_0 < 1`` or ``alpha < 2``. InputTypeError: a non-integer argument.
    """
    check_int(n, "n", minimum=1)
    check_int(first_segment_length, "first_segment_length", minimum=1)
    check_int(ratio, "ratio", minimum=2)
    segment_lengths, dilation_rates = [first_segment_length], [1]
    while segment_lengths[-1] < n:
        segment_lengths.append(segment_lengths[-1] * ratio)
        dilation_rates.append(dilation_rates[-1] * ratio)
    return segment_lengths, dilation_rates


def predicted_path_length(n: int, first_segment_length: int, ratio: int) -> float:
    """Paper Eq. 20: ``l = log_alpha(N (alpha - 1) / w_0)`` layers link any two of ``N`` tokens.

    An estimate, not a bound: ``docs/complexity.md`` gives the conditions and the bound ``2k - 1``.

    Args:
        n: the sequence length ``N``.
        first_segment_length: ``w_0``.
        ratio: ``alpha``.

    Returns:
        ``log_alpha(N (alpha - 1) / w_0)``, a float.

    Raises:
        ValueError: ``n < 1``, ``w_0 < 1`` or ``alpha < 2``. InputTypeError: a non-integer argument.
    """
    check_int(n, "n", minimum=1)
    check_int(first_segment_length, "first_segment_length", minimum=1)
    check_int(ratio, "ratio", minimum=2)
    return math.log(n * (ratio - 1) / first_segment_length, ratio)


def path_length(
    n: int,
    num_heads: int,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    offsets: str = "paper",
    source: int | None = None,
    target: int | None = None,
) -> int | None:
    """Layers of dilated attention after which information has flowed between tokens.

    The attention graph of one layer links key ``k`` to query ``p`` if any head of any branch
    attends ``p -> k`` (``m_h(p, k) > 0``); every token also keeps its own state (the
    residual connection).

    Reachability is a bit matrix ``reach[p, s]`` (packed 8 sources a byte); one layer ORs it
    over the rows of every sparse segment: ``O(N^2 / 8)`` bytes per group per layer.

    Args:
        n: the sequence length ``N``.
        num_heads: the number of heads ``H``.
        segment_lengths: the branches' ``w_i``, positive integers.
        dilation_rates: the branches' ``r_i``, positive integers, as many as ``w_i``.
        causal: information flows only to later positions.
        offsets: ``"paper"`` or ``"torchscale"`` (SPEC §2).
        source: with ``target``: the token whose information must arrive; ``None``: every token.
        target: the token it must reach (``N - 1`` when only ``source`` is given).

    Returns:
        The least number of stacked layers ``L`` such that ``source`` reaches ``target``, or
        (neither given) every token reaches every other (causally: every later one); ``None`` if
        that never happens (causally, for instance, when neighbours ``b - 1, b`` share no
        dilation-1 segment).

    Raises:
        ValueError: ``source`` or ``target`` outside ``[0, N)``, bad branch lists or ``offsets``.
        InputTypeError: a non-integer ``n``, ``num_heads``, ``source`` or ``target``, a non-bool ``causal``.
    """
    _check_sizes(n, num_heads, causal=causal)
    for name, value in (("source", source), ("target", target)):
        if value is not None:
            check_int(value, name)
    branches = validate_branches(segment_lengths, dilation_rates)
    groups = list(sparse_segments(n, num_heads, branches, validate_offset_rule(offsets)))
    sources = np.arange(n) if source is None else np.array([source])
    if np.any((sources < 0) | (sources >= n)) or (target is not None and not 0 <= target < n):
        raise ValueError(f"source and target must lie in [0, {n}), got {source!r} and {target!r}")

    reached = np.zeros((n, sources.size), bool)  # (N, sources) before packing
    reached[sources, np.arange(sources.size)] = True
    if source is not None:
        wanted = np.zeros_like(reached)
        wanted[n - 1 if target is None else target, 0] = True
    elif causal:
        wanted = np.tri(n, n, dtype=bool)  # every p must hear from every s <= p
    else:
        wanted = np.ones((n, n), bool)
    reach, wanted = np.packbits(reached, axis=1), np.packbits(wanted, axis=1)  # (N, W) bytes

    layers = 0
    while not np.array_equal(reach & wanted, wanted):
        new = reach.copy()
        for segments in groups:
            rows = np.where(segments.valid[:, :, None], reach[segments.positions], 0)  # (S, T, W)
            if causal:
                heard = np.bitwise_or.accumulate(rows, axis=1)  # row t hears rows 0..t
            else:
                heard = np.broadcast_to(np.bitwise_or.reduce(rows, axis=1)[:, None], rows.shape)  # every row hears all
            new[segments.positions[segments.valid]] |= heard[segments.valid]
        if np.array_equal(new, reach):
            return None  # nothing new can be reached
        reach, layers = new, layers + 1
    return layers
