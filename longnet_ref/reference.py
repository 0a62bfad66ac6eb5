"""The NumPy definition of dilated attention, forward and exact backward (SPEC §3-5).

LongNet (Ding et al., arXiv 2307.02486) §2.2. For every branch ``i = (w_i, r_i)``:

1. sparsify: gather the rows ``P(i, s, h)`` of every segment ``s`` (paper Eqs. 3-5, 13),
2. attend:   dense softmax attention inside each sparse segment, keeping its ``lse_i`` (Eq. 6),
             by :func:`attention_from_scores` (and :func:`attention_backward_from_scores`),
3. scatter:  put every row back at its own position (Eqs. 7-8),

then mix the branches by their softmax denominators (Eqs. 9-10):

    LSE = log sum_i exp(lse_i),   alpha_i = exp(lse_i - LSE),   out = sum_i alpha_i o_i.

This is the readable version every faster backend is tested against. It is vectorised over
batch, segments and the heads that share an offset; it materialises each segment's
``(T, T)`` scores, so its memory is ``O(B * H * N * w / r)`` per branch.

Docs: ``docs/segments.md``, ``docs/mixture.md``, ``docs/backward.md``.
"""

from __future__ import annotations

import numpy as np

from .backends import array_namespace
from .config import Branch, SparseSegments, sparse_segments


def attention_from_scores(scores, v, attended=None):
    """Stable softmax attention of a block of scores (paper Eq. 1-2; SPEC §3).

        m   = max_k S[q, k]                 (the row max; 0 for a row with no key)
        lse = m + log sum_k exp(S[q, k] - m)
        out = sum_k exp(S[q, k] - lse) v[k]

    ``scores``: ``(..., Tq, Tk)`` with ``-inf`` for keys not attended; ``v``: ``(..., Tk, Dv)``;
    ``attended``: the structural mask of attended pairs (broadcastable bool, ``None`` = all).
    Returns ``out: (..., Tq, Dv)`` and ``lse: (..., Tq)``. A row with no key gets ``out = 0``
    and ``lse = -inf``; a NaN score makes its own row NaN and nothing else.
    """
    xp = array_namespace(scores)
    m = scores.max(axis=-1, keepdims=True)  # (..., Tq, 1)
    m = xp.where(m == -xp.inf, 0, m)  # a row with no key: keep exp(-inf - m) = 0, not NaN
    p = xp.exp(scores - m)  # (..., Tq, Tk) unnormalised probabilities
    l = p.sum(axis=-1, keepdims=True)  # (..., Tq, 1) softmax denominator
    out = attended_product(p, attended, v) / xp.where(l == 0, 1, l)  # (..., Tq, Dv)
    with np.errstate(divide="ignore"):
        lse = (xp.log(l) + m)[..., 0]  # (..., Tq); log(0) = -inf for a row with no key
    return out, lse


def attention_backward_from_scores(scores, attended, lse, dsum, q, k, v, dout, scale):
    """FlashAttention-2 backward of one block, given the row statistics (SPEC §5).

        P  = exp(S - lse)          dV = P^T dO          dP = dO V^T
        dS = P * (dP - Dsum)       dQ = scale dS K      dK = scale dS^T Q

    ``lse`` and ``Dsum = rowsum(dO * O)`` are those of the *final* output of each query row, so
    when a query's keys are split over several blocks (branches) the blocks' gradients add up to
    the exact gradient. ``attended`` as in :func:`attention_from_scores`. Shapes:
    ``scores (..., Tq, Tk)``, ``lse, dsum (..., Tq)``,
    ``q (..., Tq, D)``, ``k (..., Tk, D)``, ``v (..., Tk, Dv)``, ``dout (..., Tq, Dv)``.
    """
    xp = array_namespace(scores)
    lse = xp.where(lse == -xp.inf, xp.inf, lse)  # a row with no key: P = exp(-inf) = 0, not NaN
    p = xp.exp(scores - lse[..., None])  # (..., Tq, Tk)
    transpose = lambda x: None if x is None else xp.swapaxes(x, -1, -2)
    attended_t = transpose(attended)
    dv = attended_product(transpose(p), attended_t, dout)  # (..., Tk, Dv)
    dp = dout @ transpose(v)  # (..., Tq, Tk)
    ds = p * (dp - dsum[..., None])  # (..., Tq, Tk)
    if attended is not None:
        ds = xp.where(attended, ds, 0)  # exactly 0 off the pattern, even where dP is NaN
    dq = scale * attended_product(ds, attended, k)  # (..., Tq, D)
    dk = scale * attended_product(transpose(ds), attended_t, q)  # (..., Tk, D)
    return dq, dk, dv


def attended_product(weights, attended, rows):
    """``weights @ rows`` in which a pair that is not attended contributes exactly nothing.

    ``weights (..., Tq, Tk)`` is 0 wherever ``attended`` is False, but ``0 * NaN = NaN``: a
    plain product would let a NaN or Inf row of ``rows (..., Tk, C)`` reach every output row,
    also the ones that do not attend it (SPEC §7). When such rows exist (rare), their columns
    are multiplied pair by pair under the mask; the finite part is one matrix product.
    ``attended=None`` means every pair is attended.
    """
    xp = array_namespace(weights)
    if attended is None:
        return weights @ rows
    bad = ~xp.isfinite(rows).all(axis=-1)  # (..., Tk)
    if not bad.any():
        return weights @ rows
    attended = xp.broadcast_to(attended, weights.shape)
    cols = xp.flatnonzero(bad.reshape(-1, bad.shape[-1]).any(axis=0))  # keys non-finite anywhere
    clean = rows.copy()
    clean[..., cols, :] = 0
    pairs = weights[..., :, cols, None] * rows[..., None, cols, :]  # (..., Tq, Kb, C)
    return weights @ clean + xp.where(attended[..., :, cols, None], pairs, 0).sum(axis=-2)


def gather_rows(x, segments: SparseSegments):
    """Sparsify (paper Eq. 3-5): ``x (B, N, H, ...)`` -> ``(B, S, Hs, T, ...)``, padding zeroed.

    Padded rows are set to 0 rather than read from anywhere, so a NaN or Inf elsewhere in the
    sequence cannot leak into a segment through them.
    """
    rows = x[:, segments.positions[:, :, None], segments.heads[None, None, :]]  # (B, S, T, Hs, ...)
    rows = np.moveaxis(rows, 3, 2)  # (B, S, Hs, T, ...)
    feature_axes = (None,) * (x.ndim - 3)  # D or Dv for q, k, v; none for lse
    valid = segments.valid[(slice(None), None, slice(None)) + feature_axes]  # (S, 1, T, ...)
    return np.where(valid, rows, 0)


def scatter_rows(dst, rows, segments: SparseSegments, accumulate: bool = False):
    """Inverse of :func:`gather_rows` (paper Eqs. 7-8): every selected row lands at its own position.

    ``rows (B, S, Hs, T, ...)`` into ``dst (B, N, H, ...)``. Positions are distinct within one
    ``SparseSegments``, so plain fancy-index assignment (or ``+=``) never collides.
    """
    rows = np.moveaxis(rows, 2, 3)[:, segments.valid]  # (B, M, Hs, ...)
    where = (slice(None), segments.positions[segments.valid][:, None], segments.heads[None, :])
    if accumulate:
        dst[where] += rows
    else:
        dst[where] = rows


def segment_scores(qs, ks, segments: SparseSegments, causal: bool, scale: float):
    """``S = scale * Q_s K_s^T`` per sparse segment, ``-inf`` outside ``K_i(p)`` (SPEC §3).

    ``qs, ks: (B, S, Hs, T, D)`` -> scores ``(B, S, Hs, T, T)`` and the attended pattern
    ``(1, S, 1, T, T)``.
    """
    scores = scale * (qs @ np.swapaxes(ks, -1, -2))  # (B, S, Hs, T, T)
    attended = segments.attended(causal)[None, :, None]  # (1, S, 1, T, T)
    return np.where(attended, scores, -np.inf), attended


def sparse_segment_attention(q, k, v, segments: SparseSegments, causal: bool, scale: float):
    """One branch on the heads of one offset (paper Eq. 6): ``(o_i, lse_i)`` per sparse segment.

    Returns ``out (B, S, Hs, T, Dv)`` and ``lse (B, S, Hs, T)``.
    """
    qs, ks, vs = (gather_rows(x, segments) for x in (q, k, v))  # (B, S, Hs, T, .)
    scores, attended = segment_scores(qs, ks, segments, causal, scale)
    return attention_from_scores(scores, vs, attended)


def mix_branches(branch_out, branch_lse):
    """The mixture of branches by their softmax denominators (paper Eqs. 9-10; SPEC §4).

        LSE = log sum_i exp(lse_i),  alpha_i = exp(lse_i - LSE),  out = sum_i alpha_i o_i

    ``branch_out (k, B, N, H, Dv)``, ``branch_lse (k, B, N, H)`` with ``lse_i = -inf`` where
    branch ``i`` does not cover the row. A row no branch covers gets ``out = 0, LSE = -inf``.
    """
    lse = np.logaddexp.reduce(branch_lse, axis=0)  # (B, N, H)  LSE
    # Uncovered row: every lse_i and LSE are -inf; exp(-inf - inf) = 0 keeps alpha finite.
    alpha = np.exp(branch_lse - np.where(lse == -np.inf, np.inf, lse))  # (k, B, N, H)
    out = (alpha[..., None] * branch_out).sum(axis=0)  # (B, N, H, Dv)
    return out, lse


def forward(q, k, v, branches: tuple[Branch, ...], causal: bool, scale: float, offsets: str):
    """Dilated attention forward (SPEC §3-4). Inputs validated by ``longnet_ref.attention``.

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)`` -> ``out (B, N, H, Dv)``, ``lse (B, N, H)``.
    """
    batch, n, num_heads, _ = q.shape
    value_dim = v.shape[-1]
    branch_out = np.zeros((len(branches), batch, n, num_heads, value_dim), q.dtype)  # o_i
    branch_lse = np.full((len(branches), batch, n, num_heads), -np.inf, q.dtype)  # lse_i
    for segments in sparse_segments(n, num_heads, branches, offsets):
        out_s, lse_s = sparse_segment_attention(q, k, v, segments, causal, scale)
        scatter_rows(branch_out[segments.branch], out_s, segments)
        scatter_rows(branch_lse[segments.branch], lse_s, segments)
    return mix_branches(branch_out, branch_lse)


def backward(dout, q, k, v, out, lse, branches: tuple[Branch, ...], causal: bool, scale: float, offsets: str):
    """Exact gradient of :func:`forward` w.r.t. ``q, k, v`` (SPEC §5).

    The mixture is one softmax over a multiset of keys (SPEC §4), so with the *global*
    ``LSE`` and ``Dsum[p] = sum_c dout[p, c] * out[p, c]`` every branch's FA2 backward on its
    sparse segments gives that branch's share of the exact gradient, including the dependence
    of ``alpha_i`` on the scores; the shares are scattered back and summed.
    """
    dsum = (dout * out).sum(axis=-1)  # (B, N, H)  D = rowsum(dO * O)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for segments in sparse_segments(q.shape[1], q.shape[2], branches, offsets):
        qs, ks, vs, dout_s = (gather_rows(x, segments) for x in (q, k, v, dout))  # (B, S, Hs, T, .)
        lse_s, dsum_s = gather_rows(lse, segments), gather_rows(dsum, segments)  # (B, S, Hs, T)
        scores, attended = segment_scores(qs, ks, segments, causal, scale)  # (B, S, Hs, T, T)
        grads = attention_backward_from_scores(scores, attended, lse_s, dsum_s, qs, ks, vs, dout_s, scale)
        for total, share in zip((dq, dk, dv), grads):
            scatter_rows(total, share, segments, accumulate=True)
    return dq, dk, dv
