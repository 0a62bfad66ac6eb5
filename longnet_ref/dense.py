"""Dense softmax attention: the naive O(N^2) oracle (paper Eqs. 1-2; SPEC §3-5).

Written out the obvious way, on the whole ``(N, N)`` score matrix and sharing nothing with the
dilated implementations: scores, mask, stable softmax, product; the backward by the plain
softmax formulas. With ``bias = log(multiplicity)`` it is the oracle of dilated attention
(SPEC §4). The tests check it in turn against a brute-force loop oracle (``tests/oracle.py``).

Non-finite values: a ``-inf`` bias or the causal rule masks a pair outright (its score is not
read), so in the forward a NaN or Inf in ``q`` or ``k`` reaches only the rows that attend it.
The products (``P V``, and every product of the backward) are plain matrix products, so a NaN
or Inf in ``v``, or any non-finite input of the backward, also reaches rows that do not attend
it, through ``0 * NaN = NaN``. The dilated implementations confine it to the rows that attend it
(SPEC §7); the tests check that against the loop oracle, which sums attended pairs only.

Docs: ``docs/attention.md`` (forward, log-sum-exp) and ``docs/backward.md``.
"""

from __future__ import annotations

import numpy as np

from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale


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


def _heads_first(x):
    return x.transpose(0, 2, 1, 3)  # (B, N, H, .) -> (B, H, N, .)


def dense_scores(q, k, scale, causal, bias):
    """``S = scale * Q K^T + bias`` as ``(B, H, N, N)``, ``-inf`` where a pair is masked.

    A ``-inf`` bias and the causal rule (key ``k <= `` query ``p``) replace the score outright,
    so a NaN score of a masked pair is never read.
    """
    n = q.shape[1]
    scores = scale * (_heads_first(q) @ k.transpose(0, 2, 3, 1))  # (B, H, N, N)
    if bias is not None:
        scores = np.where(np.isneginf(bias), -np.inf, scores + bias)
    if causal:
        scores = np.where(np.tri(n, n, dtype=bool), scores, -np.inf)
    return scores


def dense_attention(q, k, v, *, causal=False, scale=None, bias=None, return_lse=False):
    """Dense softmax attention with an optional additive ``bias`` (SPEC §6).

        S = scale Q K^T + bias,   m = max_k S,   lse = m + log sum_k exp(S - m),
        out = sum_k exp(S - lse) V

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)``, ``bias`` broadcastable to ``(B, H, N, N)``.
    A row with every key masked gets ``out = 0`` and ``lse = -inf``.
    Returns ``out: (B, N, H, Dv)`` (and ``lse: (B, N, H)``).
    """
    batch, n, num_heads, head_dim, _ = check_attention_inputs(q, k, v)
    scale = resolve_scale(scale, head_dim)
    causal = check_flag(causal, "causal")
    bias = _check_bias(bias, batch, num_heads, n, q.dtype)
    scores = dense_scores(q, k, scale, causal, bias)  # (B, H, N, N)
    m = scores.max(axis=-1, keepdims=True, initial=-np.inf)  # (B, H, N, 1) the row max
    m = np.where(m == -np.inf, 0, m)  # a row with no key: exp(-inf - 0) = 0 rather than NaN
    p = np.exp(scores - m)  # (B, H, N, N) unnormalised probabilities
    l = p.sum(axis=-1, keepdims=True)  # (B, H, N, 1) softmax denominator
    out = (p @ _heads_first(v)) / np.where(l == 0, 1, l)  # (B, H, N, Dv)
    with np.errstate(divide="ignore"):
        lse = (np.log(l) + m)[..., 0]  # (B, H, N); log(0) = -inf for a row with no key
    out = np.ascontiguousarray(_heads_first(out), dtype=q.dtype)  # (B, N, H, Dv)
    lse = np.ascontiguousarray(lse.transpose(0, 2, 1), dtype=q.dtype)  # (B, N, H)
    return (out, lse) if return_lse else out


def dense_attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, bias=None):
    """Gradient of :func:`dense_attention` w.r.t. ``q, k, v`` (SPEC §5).

        P  = exp(S - lse)        dV = P^T dO              dP = dO V^T
        Dsum = rowsum(dO * O)    dS = P * (dP - Dsum)     dQ = scale dS K,  dK = scale dS^T Q

    ``P`` is recomputed from the stored ``lse``. Returns ``(dq, dk, dv)`` with the shapes of
    ``(q, k, v)``.
    """
    batch, n, num_heads, head_dim, _ = check_attention_inputs(q, k, v)
    check_gradient_inputs(dout, out, lse, q, v)
    scale = resolve_scale(scale, head_dim)
    causal = check_flag(causal, "causal")
    bias = _check_bias(bias, batch, num_heads, n, q.dtype)
    scores = dense_scores(q, k, scale, causal, bias)  # (B, H, N, N)
    lse = lse.transpose(0, 2, 1)[..., None]  # (B, H, N, 1)
    p = np.exp(scores - np.where(lse == -np.inf, np.inf, lse))  # (B, H, N, N); 0 for a row with no key
    q, k, v, dout, out = (_heads_first(x) for x in (q, k, v, dout, out))  # (B, H, N, .)
    dv = np.swapaxes(p, -1, -2) @ dout  # (B, H, N, Dv)
    dp = dout @ np.swapaxes(v, -1, -2)  # (B, H, N, N)
    dsum = (dout * out).sum(axis=-1, keepdims=True)  # (B, H, N, 1)
    ds = p * (dp - dsum)  # (B, H, N, N)
    dq = scale * (ds @ k)  # (B, H, N, D)
    dk = scale * (np.swapaxes(ds, -1, -2) @ q)  # (B, H, N, D)
    return tuple(np.ascontiguousarray(_heads_first(g), dtype=q.dtype) for g in (dq, dk, dv))
