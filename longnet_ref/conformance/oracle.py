"""The kit's own brute force: SPEC §2-§5 as loops over query rows, in float64.

It shares no code with the library it ships in (not ``longnet_ref.index_sets``, not the
reference, not the dense oracle): the kit judges other implementations, and the library's tests
judge the kit by comparing this module with ``tests/oracle.py`` and with ``longnet_ref.reference``,
so no function is ever compared with itself.

- The rows a head keeps in a segment are found by testing every position of the segment
  (SPEC §2); the ``"torchscale"`` offsets by padding the heads to a multiple of ``r`` and cutting
  them into ``r`` contiguous blocks.
- The output is written with the multiplicity ``m(p, k)`` (SPEC §4): dense softmax over the
  keys with ``m > 0``, each weighted by ``m``: a key two branches give is counted twice.
- The gradient is the chain rule through that softmax (its Jacobian ``diag(a) - a a^T``), so it
  includes the mixture weights' dependence on the scores (SPEC §5).

Only attended pairs enter a sum, so a NaN reaches exactly the rows that attend it (SPEC §7). A
row no branch covers has ``out = 0`` and gradient 0. Cost: ``O(B H N^2)`` Python steps; the kit
keeps ``N`` to a few dozen.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np


def head_offset(h: int, r: int, num_heads: int, rule: str) -> int:
    """SPEC §2: the first row of each segment that head ``h`` keeps under dilation ``r``."""
    if rule == "paper":
        return h % r  # paper §2.3
    heads_per_block = math.ceil(num_heads / r)  # torchscale: H padded to ceil(H/r) r, r blocks
    return h // heads_per_block


def kept_rows(segment_start: int, w: int, r: int, o: int, n: int) -> list[int]:
    """``P(i, s, h)`` of SPEC §2: every position of the segment, kept when it is ``o + t r``."""
    return [x for x in range(segment_start, min(segment_start + w, n)) if (x - segment_start) >= o and (x - segment_start - o) % r == 0]


def branch_keys(p: int, h: int, n: int, num_heads: int, w: int, r: int, rule: str, causal: bool) -> list[int]:
    """``K_i(p)`` of SPEC §3 for head ``h``; empty when branch ``(w, r)`` does not keep row ``p``."""
    rows = kept_rows(p - p % w, w, r, head_offset(h, r, num_heads, rule), n)
    if p not in rows:
        return []
    return [x for x in rows if not causal or x <= p]


@lru_cache(maxsize=256)
def multiplicity(n: int, num_heads: int, segment_lengths: tuple, dilation_rates: tuple, causal: bool, rule: str) -> np.ndarray:
    """``m[h, p, k]``: in how many branches head ``h``'s row ``p`` attends key ``k`` (SPEC §4)."""
    m = np.zeros((num_heads, n, n), dtype=np.int64)
    for h in range(num_heads):
        for p in range(n):
            for w, r in zip(segment_lengths, dilation_rates):
                for key in branch_keys(p, h, n, num_heads, w, r, rule, causal):
                    m[h, p, key] += 1
    m.setflags(write=False)
    return m


def _row_weights(q_p, keys_k, counts, scale):
    """Softmax weights of one row over its attended keys, each key weighted by its count."""
    logits = scale * (keys_k @ q_p) + np.log(counts)  # (K,)
    top = np.max(logits)
    if not np.isfinite(top):  # NaN/Inf reach the row: the row is NaN, as in dense attention
        return np.full(len(counts), np.nan) if np.isnan(top) or top > 0 else np.zeros(len(counts))
    e = np.exp(logits - top)
    return e / np.sum(e)


def _attended_rows(batch: int, m):
    """Every ``(b, h, p)`` whose row attends a key, with those keys ``{k : m[h, p, k] > 0}``: the
    rows both :func:`forward` and :func:`gradients` walk (a row that attends nothing is skipped: 0)."""
    num_heads, n, _ = m.shape
    for b in range(batch):
        for h in range(num_heads):
            for p in range(n):
                keys = np.flatnonzero(m[h, p])
                if len(keys):
                    yield b, h, p, keys


def forward(q, k, v, m, scale):
    """``out (B, N, H, Dv)`` of SPEC §4 from the multiplicity ``m (H, N, N)``, in float64.

    ``out(p) = sum_k m(p,k) e^{S_pk} v_k / sum_k m(p,k) e^{S_pk}``, ``S_pk = scale q_p . k_k``.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    out = np.zeros(v.shape)  # (B, N, H, Dv); uncovered rows stay 0
    for b, h, p, keys in _attended_rows(q.shape[0], m):
        a = _row_weights(q[b, p, h], k[b, keys, h], m[h, p, keys], scale)  # (K,)
        out[b, p, h] = a @ v[b, keys, h]
    return out


def gradients(dout, q, k, v, m, scale):
    """``d/d(q, k, v)`` of ``sum(dout * out)`` for :func:`forward` (SPEC §5), by the chain rule.

    Per row: ``dv_j += a_j dout_p``; ``g_j = dout_p . v_j``; ``dz = (diag(a) - a a^T) g``;
    ``dq_p += scale sum_j dz_j k_j``; ``dk_j += scale dz_j q_p``.
    """
    dout, q, k, v = (np.asarray(x, dtype=np.float64) for x in (dout, q, k, v))
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b, h, p, keys in _attended_rows(q.shape[0], m):
        a = _row_weights(q[b, p, h], k[b, keys, h], m[h, p, keys], scale)  # (K,)
        g = v[b, keys, h] @ dout[b, p, h]  # d loss / d a, (K,)
        dz = a * g - a * (a @ g)  # (diag(a) - a a^T) g
        dv[b, keys, h] += a[:, None] * dout[b, p, h][None, :]
        dq[b, p, h] += scale * (dz @ k[b, keys, h])
        dk[b, keys, h] += scale * dz[:, None] * q[b, p, h][None, :]
    return dq, dk, dv
