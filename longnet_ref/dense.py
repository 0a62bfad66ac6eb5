"""Dense softmax attention: the naive O(N^2) oracle (paper Eqs. 1-2; SPEC §3-5).

The two ``*_from_scores`` functions are the softmax attention of one block of scores, forward
and FlashAttention-2 backward, written once: the dense oracle applies them to the whole
``(N, N)`` score matrix, the dilated reference (``reference.py``) to every sparse segment.

Docs: ``docs/attention.md`` (forward, log-sum-exp) and ``docs/backward.md``.
"""

from __future__ import annotations

import numpy as np

from .backends import array_namespace
from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale


def attention_from_scores(scores, v, attended=None):
    """Stable softmax attention of a block of scores (paper Eq. 1-2; SPEC §3).

        m   = max_k S[q, k]                 (running max; 0 for a row with no key)
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


def _check_bias(bias, batch, num_heads, n, dtype):
    if bias is None:
        return None
    bias = np.asarray(bias)
    if bias.dtype.kind not in "fiu":
        raise ValueError(f"bias must be a real array, got dtype {bias.dtype}")
    try:
        shape = np.broadcast_shapes(bias.shape, (batch, num_heads, n, n))
    except ValueError:
        shape = None
    if shape != (batch, num_heads, n, n):
        raise ValueError(f"bias must broadcast to (B, H, N, N) = {(batch, num_heads, n, n)}, got shape {bias.shape}")
    return bias.astype(dtype, copy=False)


def dense_scores(q, k, scale, causal, bias):
    """``S = scale * Q K^T + bias`` as ``(B, H, N, N)``, ``-inf`` where not attended.

    Also returns the attended pattern (``None`` = every pair): a ``-inf`` bias and the causal
    rule mask their entries outright (the score is not read), so a NaN key that a row does
    not attend never reaches that row.
    """
    n = q.shape[1]
    scores = scale * (q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1))  # (B, H, N, N)
    attended = None
    if bias is not None:
        attended = ~np.isneginf(bias)
        scores = np.where(attended, scores + bias, -np.inf)
    if causal:
        before = np.tri(n, n, dtype=bool)  # key k <= query p
        attended = before if attended is None else attended & before
        scores = np.where(before, scores, -np.inf)
    return scores, attended


def dense_attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
    """Dense softmax attention with an optional additive ``bias`` (SPEC §6).

        out[p] = sum_k softmax_k(scale q_p.k_k + bias[p, k]) v_k,  lse[p] = log sum_k exp(...)

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)``, ``bias`` broadcastable to ``(B, H, N, N)``.
    With ``bias = log(multiplicity)`` this is the oracle of dilated attention (SPEC §4).
    Returns ``out: (B, N, H, Dv)`` (and ``lse: (B, N, H)``).
    """
    batch, n, num_heads, head_dim, value_dim = check_attention_inputs(q, k, v)
    scale = resolve_scale(scale, head_dim)
    causal = check_flag(causal, "causal")
    bias = _check_bias(bias, batch, num_heads, n, q.dtype)
    if n == 0:
        out, lse = np.zeros(v.shape, q.dtype), np.zeros((batch, 0, num_heads), q.dtype)
    else:
        scores, attended = dense_scores(q, k, scale, causal, bias)  # (B, H, N, N)
        out, lse = attention_from_scores(scores, v.transpose(0, 2, 1, 3), attended)  # (B, H, N, Dv), (B, H, N)
        out, lse = out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)  # (B, N, H, Dv), (B, N, H)
    out, lse = np.ascontiguousarray(out, dtype=q.dtype), np.ascontiguousarray(lse, dtype=q.dtype)
    return (out, lse) if return_lse else out


def dense_attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, bias=None):
    """Gradient of :func:`dense_attention` w.r.t. ``q, k, v`` (FA2 formulas; SPEC §5).

    ``Dsum[p] = sum_c dout[p, c] * out[p, c]``; ``P`` is recomputed from the stored ``lse``.
    Returns ``(dq, dk, dv)`` with the shapes of ``(q, k, v)``.
    """
    batch, n, num_heads, head_dim, value_dim = check_attention_inputs(q, k, v)
    check_gradient_inputs(dout, out, lse, q, v)
    scale = resolve_scale(scale, head_dim)
    causal = check_flag(causal, "causal")
    bias = _check_bias(bias, batch, num_heads, n, q.dtype)
    if n == 0:
        return np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dsum = (dout * out).sum(axis=-1)  # (B, N, H)  D = rowsum(dO * O)
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # (B, N, H, .) -> (B, H, N, .)
    dq, dk, dv = attention_backward_from_scores(
        *dense_scores(q, k, scale, causal, bias),
        lse.transpose(0, 2, 1),
        dsum.transpose(0, 2, 1),
        heads_first(q),
        heads_first(k),
        heads_first(v),
        heads_first(dout),
        scale,
    )
    return tuple(np.ascontiguousarray(heads_first(g), dtype=q.dtype) for g in (dq, dk, dv))
