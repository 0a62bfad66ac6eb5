"""The NumPy definition of dilated attention, forward and exact backward (SPEC §3-5).

LongNet (Ding et al., arXiv 2307.02486) §2.2. For every branch ``i = (w_i, r_i)``:

1. sparsify: gather the rows ``P(i, s, h)`` of every segment ``s`` (paper Eqs. 3-5, 13),
2. attend:   dense softmax attention inside each sparse segment, keeping its ``lse_i`` (Eq. 6),
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

from .config import Branch, SparseSegments, sparse_segments
from .dense import attention_backward_from_scores, attention_from_scores


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
