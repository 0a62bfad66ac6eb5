"""Implementations of dilated attention for the conformance kit's own tests (tests/test_conformance.py).

``loop_forward`` is correct and slow: plain loops over branches, heads and segments. Each other
function makes ONE classic mistake, named in its docstring with the SPEC section the kit must
report it in. They share a small branch-by-branch skeleton, :func:`branches_forward`, whose
keyword arguments switch one mistake on at a time.
"""

from __future__ import annotations

import math

import numpy as np

from longnet_ref import dilated_attention


def kept_rows(n, num_heads, h, w, r, rule="paper"):
    """The rows head ``h`` keeps in each segment of branch ``(w, r)`` (SPEC §2), one array per segment."""
    offset = h % r if rule == "paper" else h // math.ceil(num_heads / r)
    for start in range(0, n, w):
        rows = np.arange(start + offset, min(start + w, n), r)
        if len(rows):
            yield rows


def segment_attention(q, k, v, scale, causal, *, diagonal=True, padding=0, top=None):
    """Softmax attention inside one segment: ``q, k (T, D)``, ``v (T, Dv)`` -> ``o (T, Dv)``, ``lse (T,)``."""
    if padding:  # MISTAKE (padding): zero keys and values appended, and let into the softmax
        k = np.concatenate([k, np.zeros((padding, k.shape[1]))])
        v = np.concatenate([v, np.zeros((padding, v.shape[1]))])
    s = scale * q @ k.T  # (T, T + padding)
    if causal:
        t = np.arange(len(q))
        allowed = t[None, :] <= t[:, None] if diagonal else t[None, :] < t[:, None]  # MISTAKE when not diagonal
        s = np.where(allowed, s, -np.inf)
    m = s.max(axis=1, keepdims=True) if top is None else top  # MISTAKE (top given): a max over more than the row
    with np.errstate(invalid="ignore", divide="ignore"):
        e = np.exp(s - np.where(np.isneginf(m), 0, m))
        denominator = e.sum(axis=1, keepdims=True)
        o = np.where(np.isneginf(m), 0, e @ v / denominator)  # a row without keys: out 0, lse -inf
        lse = np.log(denominator[:, 0]) + np.where(np.isneginf(m[:, 0]), 0, m[:, 0])
    return o, lse


def branches_forward(q, k, v, segment_lengths, dilation_rates, *, causal, rule="paper", scale=None, diagonal=True, pad=False, mix="lse", global_max=False):
    """Each branch by segments, then the mixture ``sum_i exp(lse_i - LSE) o_i`` (SPEC §3-§4)."""
    batch, n, num_heads, head_dim = q.shape
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        o = np.zeros(v.shape)  # (B, N, H, Dv)
        lse = np.full((batch, n, num_heads), -np.inf)
        for b in range(batch):
            for h in range(num_heads):
                top = None
                if global_max:  # MISTAKE: stabilise with the max over every score of the head
                    top = np.max(scale * q[b, :, h] @ k[b, :, h].T)
                for rows in kept_rows(n, num_heads, h, w, r, rule):
                    padding = (math.ceil(min(w, n) / r) - len(rows)) if pad and not causal else 0
                    o[b, rows, h], lse[b, rows, h] = segment_attention(
                        q[b, rows, h],
                        k[b, rows, h],
                        v[b, rows, h],
                        scale,
                        causal,
                        diagonal=diagonal,
                        padding=padding,
                        top=None if top is None else np.full((len(rows), 1), top),
                    )
        outs.append(o)
        lses.append(lse)
    lses = np.stack(lses)  # (branches, B, N, H)
    if mix == "mean":  # MISTAKE: the covering branches averaged
        covered = np.isfinite(lses)
        weights = covered / np.maximum(covered.sum(axis=0), 1)
    else:
        top = np.max(lses, axis=0)
        with np.errstate(invalid="ignore"):
            e = np.where(np.isfinite(lses), np.exp(lses - np.where(np.isfinite(top), top, 0)), 0)
            weights = e / np.where(e.sum(axis=0) > 0, e.sum(axis=0), 1)
    return sum(wt[..., None] * o for wt, o in zip(weights, outs)).astype(q.dtype)


def loop_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """Correct and slow: one query row at a time, its keys gathered branch by branch, Eq. 10."""
    batch, n, num_heads, head_dim = q.shape
    out = np.zeros(v.shape, dtype=np.float64)
    for b in range(batch):
        for h in range(num_heads):
            for p in range(n):
                logits, values = [], []
                for w, r in zip(segment_lengths, dilation_rates):
                    for rows in kept_rows(n, num_heads, h, w, r):
                        if p in rows:
                            for key in rows:
                                if not causal or key <= p:
                                    logits.append(q[b, p, h] @ k[b, key, h] / math.sqrt(head_dim))
                                    values.append(v[b, key, h])
                if logits:
                    a = np.exp(np.array(logits) - max(logits))
                    out[b, p, h] = a @ np.array(values) / a.sum()
    return out.astype(q.dtype)


def union_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§4): a key that several branches give is counted once (the union of the keys)."""
    batch, n, num_heads, head_dim = q.shape
    mask = np.zeros((num_heads, n, n), dtype=bool)
    for h in range(num_heads):
        for w, r in zip(segment_lengths, dilation_rates):
            for rows in kept_rows(n, num_heads, h, w, r):
                mask[h, rows[:, None], rows[None, :]] = True
    if causal:
        mask &= np.tril(np.ones((n, n), dtype=bool))
    s = np.einsum("bphd,bkhd->bhpk", q, k) / math.sqrt(head_dim)
    s = np.where(mask[None], s, -np.inf)
    top = s.max(axis=-1, keepdims=True)
    e = np.where(mask[None], np.exp(s - np.where(np.isneginf(top), 0, top)), 0)
    a = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-300)
    return np.einsum("bhpk,bkhd->bphd", a, v).astype(q.dtype)


def no_diagonal_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§3): the causal mask keeps keys k < p, dropping the diagonal k = p."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, diagonal=False)


def other_offsets_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§2 under offsets="paper"): head offsets by torchscale's contiguous blocks."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, rule="torchscale")


def scale_one_over_d_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§1): scores scaled by 1/D instead of 1/sqrt(D)."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, scale=1 / q.shape[-1])


def padded_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§3): short segments are zero-padded and the padding keys enter the softmax (ragged N)."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, pad=True)


def averaged_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§4): the branches averaged instead of weighted by their softmax denominators."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, mix="mean")


def nan_spreading_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§7): the softmax is stabilised with the max over all of a head's scores, so a NaN
    in one key reaches every row of that head."""
    return branches_forward(q, k, v, segment_lengths, dilation_rates, causal=causal, global_max=True)


def library_forward(q, k, v, segment_lengths, dilation_rates, *, causal):
    return dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=causal)


def detached_weights_backward(dout, q, k, v, segment_lengths, dilation_rates, *, causal):
    """MISTAKE (§5): the gradient of ``sum_i alpha_i o_i`` with the mixture weights ``alpha_i``
    held constant (torchscale's ``no_grad``): each branch's softmax backward, weighted by alpha_i."""
    batch, n, num_heads, head_dim = q.shape
    scale = 1 / math.sqrt(head_dim)
    branches = list(zip(segment_lengths, dilation_rates))
    per_branch = []
    for w, r in branches:  # each branch's (o, lse) by rows
        lse = np.full((batch, n, num_heads), -np.inf)
        for b in range(batch):
            for h in range(num_heads):
                for rows in kept_rows(n, num_heads, h, w, r):
                    lse[b, rows, h] = segment_attention(q[b, rows, h], k[b, rows, h], v[b, rows, h], scale, causal)[1]
        per_branch.append(lse)
    lses = np.stack(per_branch)
    top = np.max(lses, axis=0)
    e = np.where(np.isfinite(lses), np.exp(lses - np.where(np.isfinite(top), top, 0)), 0)
    alpha = e / np.where(e.sum(axis=0) > 0, e.sum(axis=0), 1)  # (branches, B, N, H), constants
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for (w, r), a in zip(branches, alpha):
        for b in range(batch):
            for h in range(num_heads):
                for rows in kept_rows(n, num_heads, h, w, r):
                    qs, ks, vs = q[b, rows, h], k[b, rows, h], v[b, rows, h]
                    s = scale * qs @ ks.T
                    if causal:
                        s = np.where(np.tril(np.ones(s.shape, dtype=bool)), s, -np.inf)
                    p = np.exp(s - s.max(axis=1, keepdims=True))
                    p /= p.sum(axis=1, keepdims=True)
                    g = a[b, rows, h][:, None] * dout[b, rows, h]  # upstream of o_i: alpha_i dout
                    dv[b, rows, h] += p.T @ g
                    dp = g @ vs.T
                    ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
                    dq[b, rows, h] += scale * ds @ ks
                    dk[b, rows, h] += scale * ds.T @ qs
    return tuple(x.astype(q.dtype) for x in (dq, dk, dv))
