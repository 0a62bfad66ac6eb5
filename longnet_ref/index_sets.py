"""Branches, segments, dilation and head offsets: the index sets of dilated attention.

LongNet (Ding et al., arXiv 2307.02486, §2.2-2.3; SPEC §2). This module is the *only* place
that knows which rows head ``h`` of branch ``i`` sees. The reference, the kernels, the
multiplicity matrix, the complexity counts and the distributed code all ask it.

For branch ``i`` with segment length ``w`` and dilation ``r``, head ``h`` keeps, in segment ``s``,

    I(i, s, h) = { s*w + o + t*r : t >= 0, o + t*r < w, s*w + o + t*r < N },  o = offset(h, r)

(the selection never leaves its segment; a short last segment simply has fewer rows).

Docs: ``docs/segments.md`` and ``docs/offsets.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

OFFSET_RULES = ("paper", "torchscale")
"""The accepted values of ``offsets``: the head-offset rules of [`head_offsets`][longnet_ref.index_sets.head_offsets]."""


@dataclass(frozen=True)
class Branch:
    """One ``(w, r)`` branch of the mixture (paper Eq. 9; SPEC §2).

    Built by [`validate_branches`][longnet_ref.validation.validate_branches], which checks both
    fields; constructing one directly checks nothing.

    Attributes:
        segment_length: ``w``, rows per segment, a positive ``int``.
        dilation: ``r``, the step between selected rows of a segment, a positive ``int``.
    """

    segment_length: int  # w
    dilation: int  # r


def head_offsets(num_heads: int, dilation: int, rule: str = "paper") -> np.ndarray:
    """The offset ``o`` of every head for dilation ``r`` (paper Eq. 13; SPEC §2).

        "paper":       o(h) = h mod r
        "torchscale":  o(h) = h // (Hp / r),  Hp = ceil(H / r) * r  (contiguous blocks of heads)

    Args:
        num_heads: ``H``, a positive ``int`` (not checked here).
        dilation: ``r``, a positive ``int`` (not checked here).
        rule: The offset rule, ``"paper"`` or ``"torchscale"``.

    Returns:
        ``o (H,)``, integer (``np.intp``): the offset of head ``h`` at index ``h``, in ``[0, r)``.

    Raises:
        ValueError: ``rule`` is not one of [`OFFSET_RULES`][longnet_ref.index_sets.OFFSET_RULES].
    """
    h = np.arange(num_heads)  # (H,)
    if rule == "paper":
        return h % dilation
    if rule == "torchscale":
        heads_per_offset = math.ceil(num_heads / dilation)  # Hp / r
        return h // heads_per_offset
    raise ValueError(f"offsets must be one of {OFFSET_RULES}, got {rule!r}")


# The scalar index rules. Plain Python on integers, so that the Numba kernels wrap them with
# ``njit(inline="always")`` and the CUDA kernels with ``cuda.jit(device=True)``: the rule that
# picks rows is written once, here, and ``segment_rows`` below is tied to it by a test.


def segment_size(n: int, w: int, r: int, o: int, s: int) -> int:
    """Rows of segment ``s`` that offset ``o`` selects: #{t : o + t r < w, s w + o + t r < N} (SPEC §2).

    Scalar and plain Python, so that the Numba and CUDA kernels compile this same rule.

    Args:
        n: ``N``, the sequence length.
        w: The segment length.
        r: The dilation.
        o: The head's offset, ``0 <= o < r``.
        s: The segment index, ``0 <= s < ceil(N / w)``.

    Returns:
        ``T_s >= 0``, the number of selected rows (0 when ``o`` lies beyond a short last segment).

    Raises:
        ZeroDivisionError: ``r == 0``; inputs are validated before any caller reaches this rule.
    """
    extent = min(w, n - s * w) - o  # rows of the segment at or after the offset
    return 0 if extent <= 0 else (extent + r - 1) // r


def segment_position(w: int, r: int, o: int, s: int, t: int) -> int:
    """Position of the ``t``-th selected row of segment ``s``: ``s w + o + t r`` (SPEC §2).

    Args:
        w: The segment length.
        r: The dilation.
        o: The head's offset.
        s: The segment index.
        t: The index of the row within the sparse segment, ``0 <= t < segment_size(...)``.

    Returns:
        The global row position ``p`` in ``[0, N)`` (for ``t`` in range; not checked).
    """
    return s * w + o + t * r


def causal_key_count(t: int) -> int:
    """Keys the ``t``-th selected row attends under ``causal=True``: rows ``0..t`` of its segment.

    Positions increase with ``t`` inside a sparse segment, so ``k <= p`` is ``t_k <= t`` (SPEC §3).

    Args:
        t: The query's index within its sparse segment, ``t >= 0``.

    Returns:
        ``t + 1``, the number of keys attended.
    """
    return t + 1


def causal_pairs(query_t, key_t):
    """Whether the query at row ``query_t`` of a sparse segment attends its key at row ``key_t`` under ``causal=True``.

    The table form of :func:`causal_key_count`: key ``t_k`` is attended iff
    ``t_k < causal_key_count(t_q)``, i.e. ``k <= p`` (SPEC §3). The one causal mask of the
    array code (the reference, the distributed backend); the kernels compile the scalar rule.

    Args:
        query_t: ``(Tq,)`` integer array (NumPy or another array API library): rows of the queries.
        key_t: ``(Tk,)`` integer array of the same library: rows of the keys.

    Returns:
        ``(Tq, Tk)`` bool array of that library.
    """
    return key_t[None, :] < causal_key_count(query_t)[:, None]


def attended_mask(valid, causal: bool, xp=np):
    """``(S, T, T)`` mask of the (query row, key row) pairs of each sparse segment: ``K_i(p)`` of SPEC §3.

    Args:
        valid: ``(S, T)`` bool (NumPy), from :func:`segment_rows`: which rows are selected.
        causal: Whether a query attends only keys at positions ``<=`` its own.
        xp: The array library to build the mask in (the inputs' namespace: the mask is built
            on their device; only ``valid`` is copied there).

    Returns:
        ``(S, Tq, Tk)`` bool: ``True`` where both rows are valid (and, if causal,
        :func:`causal_pairs`).
    """
    valid = xp.asarray(valid)  # (S, T)
    mask = valid[:, :, None] & valid[:, None, :]  # (S, Tq, Tk)
    if causal:
        t = xp.arange(valid.shape[1])  # (T,) row index within the segment
        mask = mask & causal_pairs(t, t)[None, ...]
    return mask


def segment_rows(n: int, segment_length: int, dilation: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions ``I(i, s, h)`` of every segment as a padded ``(S, T)`` table (SPEC §2).

    Row ``s`` holds ``s*w + o + t*r`` for ``t = 0..T-1``; ``valid[s, t]`` says whether that
    position is selected (``o + t*r < w`` and ``< N``). Padded entries hold position 0 and must
    never be read: every consumer masks them with ``valid``.

    Args:
        n: ``N``, the sequence length, ``>= 0``.
        segment_length: ``w``, a positive ``int``.
        dilation: ``r``, a positive ``int``.
        offset: ``o``, ``0 <= o < r``.

    Returns:
        ``(positions, valid)``: ``positions (S, T)`` integer (``np.intp``) and ``valid (S, T)``
        bool, with ``S = ceil(N / w)`` segments and ``T = ceil((min(w, N) - o) / r)`` (0 if
        negative) rows per full segment.

    Raises:
        ZeroDivisionError: ``segment_length`` or ``dilation`` is 0 (validated before any caller
            reaches this function).
    """
    w, r, o = segment_length, dilation, offset
    num_segments = -(-n // w)  # S = ceil(N / w)
    rows_per_segment = max(0, -(-(min(w, n) - o) // r))  # T: rows of offset o in a full segment
    s = np.arange(num_segments)[:, None]  # (S, 1)
    t = np.arange(rows_per_segment)[None, :]  # (1, T)
    within = o + t * r  # (1, T) distance from the segment start
    positions = s * w + within  # (S, T)
    valid = (within < w) & (positions < n)  # (S, T)
    return np.where(valid, positions, 0), valid


@dataclass(frozen=True)
class SparseSegments:
    """All segments of one branch seen by the heads that share one offset (SPEC §2).

    ``positions`` and ``valid`` are the ``(S, T)`` table of
    [`segment_rows`][longnet_ref.index_sets.segment_rows]; ``heads`` the heads with this offset.
    Within one ``SparseSegments`` every valid position occurs once, so a scatter by fancy
    indexing never writes the same row twice.

    Attributes:
        branch: The branch index ``i`` in the caller's list of branches.
        segment_length: ``w`` of that branch.
        dilation: ``r`` of that branch.
        offset: ``o``, shared by every head in ``heads``.
        heads: ``(Hs,)`` integer: the heads whose offset is ``o``.
        positions: ``(S, T)`` integer: ``s*w + o + t*r``, 0 where not ``valid``.
        valid: ``(S, T)`` bool: whether ``positions[s, t]`` is a selected row.
    """

    branch: int
    segment_length: int
    dilation: int
    offset: int
    heads: np.ndarray  # (Hs,)
    positions: np.ndarray  # (S, T)
    valid: np.ndarray  # (S, T)

    def attended(self, causal: bool) -> np.ndarray:
        """``(S, T, T)`` mask of the (query row, key row) pairs attended: ``K_i(p)`` of SPEC §3.

        Args:
            causal: Whether a query attends only keys at positions ``<=`` its own.

        Returns:
            ``(S, Tq, Tk)`` bool: ``True`` where both rows are valid (and, if causal, ``k <= q``),
            as [`attended_mask`][longnet_ref.index_sets.attended_mask] gives it.
        """
        return attended_mask(self.valid, causal)


def sparse_segments(n: int, num_heads: int, branches: Sequence[Branch], offsets: str = "paper") -> Iterator[SparseSegments]:
    """Every (branch, offset) group of sparse segments ``I(i, s, h)``, the unit all backends iterate over (SPEC §2).

    Args:
        n: ``N``, the sequence length.
        num_heads: ``H``, a positive ``int``.
        branches: The validated branches (from
            [`validate_branches`][longnet_ref.validation.validate_branches]).
        offsets: The head-offset rule, ``"paper"`` or ``"torchscale"``.

    Returns:
        An iterator of [`SparseSegments`][longnet_ref.index_sets.SparseSegments], branch by branch
        and, within a branch, by increasing offset; offsets that select no row are skipped.

    Raises:
        ValueError: ``offsets`` is not a known rule (raised when the iterator is first advanced).
    """
    for i, branch in enumerate(branches):
        per_head = head_offsets(num_heads, branch.dilation, offsets)  # (H,)
        for o in np.unique(per_head):
            positions, valid = segment_rows(n, branch.segment_length, branch.dilation, int(o))
            if not valid.any():
                continue  # offset beyond the segment (o >= min(w, N)): this head sees no row
            yield SparseSegments(
                branch=i,
                segment_length=branch.segment_length,
                dilation=branch.dilation,
                offset=int(o),
                heads=np.flatnonzero(per_head == o),
                positions=positions,
                valid=valid,
            )
