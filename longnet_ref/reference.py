"""The definition of dilated attention, forward and exact backward (SPEC §3-5), on any array library.

LongNet (Ding et al., arXiv 2307.02486) §2.2. For every branch ``i = (w_i, r_i)``:

1. sparsify: gather the rows ``I(i, s, h)`` of every segment ``s`` (paper Eqs. 3-5, 13),
2. attend:   dense softmax attention inside each sparse segment, keeping its ``lse_i`` (Eq. 6),
             by [`attention_from_scores`][] (and [`attention_backward_from_scores`][]),
3. scatter:  put every row back at its own position (Eqs. 7-8),

then mix the branches by their softmax denominators (Eqs. 9-10):

    LSE = log sum_i exp(lse_i),   alpha_i = exp(lse_i - LSE),   out = sum_i alpha_i o_i.

This is the readable version every faster backend is tested against. It is written against the
array namespace of its inputs (``xp = array_namespace(q)``), with array API standard calls only:
NumPy on the CPU, CuPy on a GPU (where each sparse segment's attention is a batched cuBLAS GEMM,
a softmax and a GEMM), ``array_api_strict`` in the tests. Index tables (which rows a head
sees) are metadata computed by ``config`` with NumPy and moved to the inputs' device.

Memory: a branch's sparse segments are processed in chunks of whole segments, one plain loop,
so that the ``(T, T)`` score blocks alive at once take at most ``memory_budget`` bytes
(1 GiB by default; a single segment larger than the budget is still processed whole). Besides
that the forward keeps one ``(B, N, H, Dv)`` output and ``(B, N, H)`` lse per branch.

float16 (and bfloat16, where the array library has it) inputs are computed in float32: the
output is returned in the input dtype, ``lse`` in float32 (SPEC §1 asks for float32/float64;
the half types are a GPU extension, see ``docs/gpu.md``).

Docs: ``docs/segments.md``, ``docs/mixture.md``, ``docs/backward.md``, ``docs/gpu.md``.
"""

from __future__ import annotations

import math

import numpy as np

from .backends import array_namespace
from .index_sets import Branch, SparseSegments, sparse_segments

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of (T, T) score blocks alive at once: 1 GiB
LIVE_SCORE_BLOCKS = 4  # the backward holds S, P, dP and dS of a chunk at once


def _permute_dims(xp, x, axes):
    # The array API name; CuPy releases before the NumPy 2 aliases spell it ``transpose``.
    return xp.permute_dims(x, axes) if hasattr(xp, "permute_dims") else xp.transpose(x, axes)


def _concat(xp, arrays, axis):
    return xp.concat(arrays, axis=axis) if hasattr(xp, "concat") else xp.concatenate(arrays, axis=axis)


def _astype(xp, x, dtype):
    return xp.astype(x, dtype) if hasattr(xp, "astype") else x.astype(dtype)


def _swap_last(xp, x):
    """``x^T`` of the last two axes (a view where the library allows it)."""
    axes = tuple(range(x.ndim - 2)) + (x.ndim - 1, x.ndim - 2)
    return _permute_dims(xp, x, axes)


def compute_dtype(xp, dtype):
    """float64 for float64 inputs, float32 otherwise (half inputs are computed in float32)."""
    return xp.float64 if dtype == xp.float64 else xp.float32


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
    m = xp.max(scores, axis=-1, keepdims=True)  # (..., Tq, 1)
    m = xp.where(m == -xp.inf, 0, m)  # a row with no key: keep exp(-inf - m) = 0, not NaN
    p = xp.exp(scores - m)  # (..., Tq, Tk) unnormalised probabilities
    l = xp.sum(p, axis=-1, keepdims=True)  # (..., Tq, 1) softmax denominator
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
    the exact gradient. ``attended`` as in [`attention_from_scores`][]. Shapes:
    ``scores (..., Tq, Tk)``, ``lse, dsum (..., Tq)``,
    ``q (..., Tq, D)``, ``k (..., Tk, D)``, ``v (..., Tk, Dv)``, ``dout (..., Tq, Dv)``.
    """
    xp = array_namespace(scores)
    lse = xp.where(lse == -xp.inf, xp.inf, lse)  # a row with no key: P = exp(-inf) = 0, not NaN
    p = xp.exp(scores - lse[..., None])  # (..., Tq, Tk)
    if attended is not None:  # exp(-inf - NaN) = NaN: a NaN row must not reach keys it does not attend
        p = xp.where(attended, p, 0)
    attended_t = None if attended is None else _swap_last(xp, attended)
    dv = attended_product(_swap_last(xp, p), attended_t, dout)  # (..., Tk, Dv)
    dp = dout @ _swap_last(xp, v)  # (..., Tq, Tk)
    ds = p * (dp - dsum[..., None])  # (..., Tq, Tk)
    if attended is not None:
        ds = xp.where(attended, ds, 0)  # exactly 0 off the pattern, even where dP is NaN
    dq = scale * attended_product(ds, attended, k)  # (..., Tq, D)
    dk = scale * attended_product(_swap_last(xp, ds), attended_t, q)  # (..., Tk, D)
    return dq, dk, dv


def attended_product(weights, attended, rows):
    """``weights @ rows`` in which a pair that is not attended contributes exactly nothing.

    ``weights (..., Tq, Tk)`` is 0 wherever ``attended`` is False, but ``0 * NaN = NaN``: a
    plain product would let a NaN or Inf row of ``rows (..., Tk, C)`` reach every output row,
    also the ones that do not attend it (SPEC §7). When such rows exist (rare), the finite rows
    are one matrix product and the others are added pair by pair under the mask, one channel
    at a time (so the extra memory is that of ``weights``). ``attended=None``: every pair.
    """
    xp = array_namespace(weights)
    if attended is None:
        return weights @ rows
    finite = xp.all(xp.isfinite(rows), axis=-1, keepdims=True)  # (..., Tk, 1)
    if bool(xp.all(finite)):
        return weights @ rows
    product = weights @ xp.where(finite, rows, 0)  # the finite rows: (..., Tq, C)
    bad_rows = xp.where(finite, 0, rows)  # (..., Tk, C): only the non-finite rows
    pairs = attended & ~_swap_last(xp, finite)  # (..., Tq, Tk) attended pairs with such a key
    extra = [
        xp.sum(xp.where(pairs, weights * bad_rows[..., None, :, c], 0), axis=-1)  # (..., Tq)
        for c in range(rows.shape[-1])
    ]
    return product + xp.stack(extra, axis=-1) if extra else product


def gather_rows(x, positions, valid, heads):
    """Sparsify (paper Eq. 3-5): ``x (B, N, H, ...)`` -> ``(B, S, Hs, T, ...)``, padding zeroed.

    ``positions, valid (S, T)`` as in ``index_sets.segment_rows`` and ``heads (Hs,)``, all NumPy
    (metadata). The rows are taken from ``x`` viewed as ``(B, N * H, C)`` at ``p * H + h``.
    Padded rows are set to 0 rather than read from anywhere, so a NaN or Inf elsewhere in the
    sequence cannot leak into a segment through them.
    """
    xp = array_namespace(x)
    batch, n, num_heads = x.shape[:3]
    features = x.shape[3:]  # (D,) / (Dv,) for q, k, v; () for lse
    channels = features[0] if features else 1  # C (explicit: a -1 cannot be inferred when Dv = 0)
    flat = xp.reshape(x, (batch, n * num_heads, channels))  # (B, N H, C)
    index = positions[:, None, :] * num_heads + heads[None, :, None]  # (S, Hs, T)
    rows = xp.take(flat, xp.asarray(index.reshape(-1)), axis=1)  # (B, S Hs T, C)
    rows = xp.reshape(rows, (batch, *index.shape, channels))  # (B, S, Hs, T, C)
    keep = xp.asarray(valid[None, :, None, :, None])  # (1, S, 1, T, 1)
    return xp.reshape(xp.where(keep, rows, 0), (batch, *index.shape, *features))


def scatter_index(groups, first, stop, num_heads):
    """Where every ``(position, head)`` of ``first..stop-1`` finds its row among ``groups``' rows.

    ``groups``: ``(positions, valid, heads)`` of one chunk of segments per offset, whose rows
    ``(B, S, Hs, T, C)`` are flattened and concatenated in that order, followed by one filler
    row. Returns ``(stop - first) * H`` indices; a position a head does not select points at
    the filler. Selected positions are distinct within one branch, so every target has at most
    one source: scattering (paper Eqs. 7-8) is a gather by this index.
    """
    index = np.zeros((stop - first, num_heads), np.int64)  # (L, H)
    filled = np.zeros((stop - first, num_heads), bool)
    start = 0
    for positions, valid, heads in groups:
        s, t = np.nonzero(valid)  # (M,) segment and row of every selected position
        rows_per_head = positions.shape[1]  # T
        flat = (s[:, None] * heads.size + np.arange(heads.size)[None, :]) * rows_per_head + t[:, None]  # (M, Hs)
        index[positions[s, t][:, None] - first, heads[None, :]] = start + flat
        filled[positions[s, t][:, None] - first, heads[None, :]] = True
        start += positions.size * heads.size
    return np.where(filled, index, start).reshape(-1)  # start = the filler's index


def scatter_rows(parts, index, first, stop, num_heads, fill):
    """Inverse of [`gather_rows`][] for one chunk: ``(B, L, H, ...)`` with ``fill`` where no row lands.

    ``parts``: the chunk's rows ``(B, S, Hs, T, ...)`` per offset group, in the order of
    [`scatter_index`][], which gave ``index``.
    """
    xp = array_namespace(parts[0])
    batch, features = parts[0].shape[0], parts[0].shape[4:]
    flat = [xp.reshape(p, (batch, math.prod(p.shape[1:4]), *features)) for p in parts]  # (B, S Hs T, ...)
    filler = xp.full((batch, 1, *features), fill, dtype=parts[0].dtype)
    rows = xp.take(_concat(xp, [*flat, filler], axis=1), xp.asarray(index), axis=1)  # (B, L H, ...)
    return xp.reshape(rows, (batch, stop - first, num_heads, *features))


def attended_pairs(xp, valid, causal):
    """``(S, T, T)`` mask of the (query row, key row) pairs attended: ``K_i(p)`` of SPEC §3.

    ``None`` when every pair is (no padding, not causal): the softmax then needs no mask.
    Positions increase with ``t`` inside a segment, so the causal rule ``k <= p`` is ``t_k <= t_q``.
    """
    if not causal and valid.all():
        return None
    valid = xp.asarray(valid)  # (S, T)
    mask = valid[:, :, None] & valid[:, None, :]  # (S, Tq, Tk)
    if causal:
        t = xp.arange(valid.shape[1])
        mask = mask & (t[:, None] >= t[None, :])[None, ...]
    return mask


def segment_scores(qs, ks, attended, scale):
    """``S = scale * Q_s K_s^T`` per sparse segment, ``-inf`` outside ``K_i(p)`` (SPEC §3).

    ``qs, ks: (B, S, Hs, T, D)``, ``attended (S, T, T)`` or ``None`` -> scores
    ``(B, S, Hs, T, T)`` and the pattern broadcast as ``(1, S, 1, T, T)``. The scale multiplies
    ``Q`` (``T x D``) rather than the ``T x T`` scores: the same product, fewer operations.
    """
    xp = array_namespace(qs)
    scores = (qs * scale) @ _swap_last(xp, ks)  # (B, S, Hs, T, T)
    if attended is None:
        return scores, None
    attended = attended[None, :, None, ...]  # (1, S, 1, T, T)
    return xp.where(attended, scores, -xp.inf), attended


def segment_chunks(segments_of_branch: list[SparseSegments], batch, itemsize, memory_budget=None):
    """Split a branch's segments into runs ``[s0, s1)`` whose score blocks fit ``memory_budget``.

    A segment of offset group ``g`` needs ``B * Hs_g * T_g^2`` scores; a chunk holds
    ``LIVE_SCORE_BLOCKS`` such blocks at once for its largest group. At least one segment.
    ``memory_budget=None``: ``DEFAULT_MEMORY_BUDGET`` (read at call time).
    """
    memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    num_segments = segments_of_branch[0].positions.shape[0]
    per_segment = max(batch * g.heads.size * g.positions.shape[1] ** 2 for g in segments_of_branch)
    per_chunk = max(1, memory_budget // (LIVE_SCORE_BLOCKS * itemsize * max(per_segment, 1)))
    return [(s0, min(s0 + per_chunk, num_segments)) for s0 in range(0, num_segments, per_chunk)]


def branch_groups(n, num_heads, branches, offsets):
    """The ``SparseSegments`` of every branch, as one list per branch (empty: covers nothing)."""
    groups = [[] for _ in branches]
    for segments in sparse_segments(n, num_heads, branches, offsets):
        groups[segments.branch].append(segments)
    return groups


def mix_branches(branch_out, branch_lse):
    """The mixture of branches by their softmax denominators (paper Eqs. 9-10; SPEC §4).

        LSE = log sum_i exp(lse_i),  alpha_i = exp(lse_i - LSE),  out = sum_i alpha_i o_i

    ``branch_out (k, B, N, H, Dv)``, ``branch_lse (k, B, N, H)`` with ``lse_i = -inf`` where
    branch ``i`` does not cover the row. A row no branch covers gets ``out = 0, LSE = -inf``.
    """
    xp = array_namespace(branch_lse)
    m = xp.max(branch_lse, axis=0)  # (B, N, H)
    m = xp.where(xp.isfinite(m), m, 0)  # uncovered (-inf) or NaN rows: exp below stays exact
    with np.errstate(divide="ignore"):
        lse = m + xp.log(xp.sum(xp.exp(branch_lse - m), axis=0))  # (B, N, H)  LSE
    # Uncovered row: every lse_i and LSE are -inf; exp(-inf - inf) = 0 keeps alpha finite.
    alpha = xp.exp(branch_lse - xp.where(lse == -xp.inf, xp.inf, lse))  # (k, B, N, H)
    out = xp.sum(alpha[..., None] * branch_out, axis=0)  # (B, N, H, Dv)
    return out, lse


# NaN or Inf in the inputs propagates to the rows that attend it (SPEC §7), by design: the
# RuntimeWarnings NumPy would raise on the way (inf - inf, NaN comparisons) are not news to the
# caller, and the Numba backend raises none.
@np.errstate(invalid="ignore", over="ignore")
def forward(q, k, v, branches: tuple[Branch, ...], causal: bool, scale: float, offsets: str, memory_budget=None):
    """Dilated attention forward (SPEC §3-4). Inputs validated by ``longnet_ref.attention``.

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)`` -> ``out (B, N, H, Dv)`` in the input dtype,
    ``lse (B, N, H)`` (float32 for half inputs), in the inputs' namespace.
    """
    xp = array_namespace(q)
    batch, n, num_heads, _ = q.shape
    value_dim = v.shape[-1]
    dtype = q.dtype
    real = compute_dtype(xp, dtype)
    q, k, v = (_astype(xp, x, real) for x in (q, k, v))  # a no-op unless half precision
    if n == 0 or batch == 0 or num_heads == 0:
        return xp.zeros(v.shape, dtype=dtype), xp.zeros((batch, n, num_heads), dtype=real)
    itemsize = 8 if real == xp.float64 else 4
    branch_out, branch_lse = [], []  # o_i (B, N, H, Dv), lse_i (B, N, H) per branch
    for groups in branch_groups(n, num_heads, branches, offsets):
        if not groups:  # no head of this branch selects a row (every offset >= N)
            branch_out.append(xp.zeros((batch, n, num_heads, value_dim), dtype=real))
            branch_lse.append(xp.full((batch, n, num_heads), -xp.inf, dtype=real))
            continue
        w = groups[0].segment_length
        chunk_out, chunk_lse = [], []
        for s0, s1 in segment_chunks(groups, batch, itemsize, memory_budget):
            tables = [(g.positions[s0:s1], g.valid[s0:s1], g.heads) for g in groups]
            outs, lses = [], []
            for positions, valid, heads in tables:  # one offset group: (B, S, Hs, T, .)
                qs, ks, vs = (gather_rows(x, positions, valid, heads) for x in (q, k, v))
                scores, attended = segment_scores(qs, ks, attended_pairs(xp, valid, causal), scale)
                out_s, lse_s = attention_from_scores(scores, vs, attended)
                outs.append(out_s)
                lses.append(lse_s)
            first, stop = s0 * w, min(s1 * w, n)  # the chunk's positions
            index = scatter_index(tables, first, stop, num_heads)
            chunk_out.append(scatter_rows(outs, index, first, stop, num_heads, 0))
            chunk_lse.append(scatter_rows(lses, index, first, stop, num_heads, -np.inf))
        branch_out.append(_concat(xp, chunk_out, axis=1))
        branch_lse.append(_concat(xp, chunk_lse, axis=1))
    out, lse = mix_branches(xp.stack(branch_out), xp.stack(branch_lse))
    return _astype(xp, out, dtype), lse


@np.errstate(invalid="ignore", over="ignore")  # as in forward
def backward(
    dout, q, k, v, out, lse, branches: tuple[Branch, ...], causal: bool, scale: float, offsets: str,
    memory_budget=None,
):
    """Exact gradient of [`forward`][] w.r.t. ``q, k, v`` (SPEC §5), in the inputs' namespace and dtype.

    The mixture is one softmax over a multiset of keys (SPEC §4), so with the *global*
    ``LSE`` and ``Dsum[p] = sum_c dout[p, c] * out[p, c]`` every branch's FA2 backward on its
    sparse segments gives that branch's share of the exact gradient, including the dependence
    of ``alpha_i`` on the scores; the shares are scattered back and summed. Keys never leave
    their segment, so a chunk of segments owns the gradient rows of its positions.
    """
    xp = array_namespace(q)
    batch, n, num_heads, _ = q.shape
    dtype = q.dtype
    real = compute_dtype(xp, dtype)
    dout, q, k, v, out, lse = (_astype(xp, x, real) for x in (dout, q, k, v, out, lse))
    dsum = xp.sum(dout * out, axis=-1)  # (B, N, H)  D = rowsum(dO * O)
    dq, dk, dv = (xp.zeros(x.shape, dtype=real) for x in (q, k, v))
    itemsize = 8 if real == xp.float64 else 4
    for groups in branch_groups(n, num_heads, branches, offsets) if n and batch and num_heads else ():
        if not groups:
            continue
        w = groups[0].segment_length
        chunks = [], [], []  # the branch's dq, dk, dv, chunk by chunk along the sequence
        for s0, s1 in segment_chunks(groups, batch, itemsize, memory_budget):
            tables = [(g.positions[s0:s1], g.valid[s0:s1], g.heads) for g in groups]
            shares = [], [], []
            for positions, valid, heads in tables:  # one offset group: (B, S, Hs, T, .)
                qs, ks, vs, dout_s, lse_s, dsum_s = (
                    gather_rows(x, positions, valid, heads) for x in (q, k, v, dout, lse, dsum)
                )
                scores, attended = segment_scores(qs, ks, attended_pairs(xp, valid, causal), scale)
                grads = attention_backward_from_scores(scores, attended, lse_s, dsum_s, qs, ks, vs, dout_s, scale)
                for share, grad in zip(shares, grads):
                    share.append(grad)
            first, stop = s0 * w, min(s1 * w, n)
            index = scatter_index(tables, first, stop, num_heads)
            for chunk, share in zip(chunks, shares):
                chunk.append(scatter_rows(share, index, first, stop, num_heads, 0))
        dq, dk, dv = (total + _concat(xp, chunk, axis=1) for total, chunk in zip((dq, dk, dv), chunks))
    return tuple(_astype(xp, g, dtype) for g in (dq, dk, dv))
