"""The definition of dilated attention, forward and exact backward (SPEC §3-5), on any array library.

LongNet (Ding et al., arXiv 2307.02486) §2.2. For every branch ``i = (w_i, r_i)``:

1. sparsify: gather the rows ``I(i, s, h)`` of every segment ``s`` (paper Eqs. 3-5, 13),
2. attend:   dense softmax attention inside each sparse segment, keeping its ``lse_i`` (Eq. 6),
             by [`attention_from_scores`][] (and [`attention_backward_from_scores`][]),
3. scatter:  put every row back at its own position (Eqs. 7-8),

then mix the branches by their softmax denominators (Eqs. 9-10):

    LSE = log sum_i exp(lse_i),   alpha_i = exp(lse_i - LSE),   out = sum_i alpha_i o_i.

This is the readable version every faster backend is tested against. It is written against the
array namespace of its inputs (``xp = array_namespace(q)``, from ``array_api_compat``, which
gives NumPy and CuPy the standard's names), with array API standard calls only: NumPy on the
CPU, CuPy on a GPU (where each sparse segment's attention is a batched cuBLAS GEMM, a softmax
and a GEMM), ``array_api_strict`` in the tests. Index tables (which rows a head sees) are
metadata computed by ``index_sets`` with NumPy and moved to the inputs' device.

One loop, :func:`sparse_segment_results`, walks the branches, the chunks of segments and the
offset groups, gathers the rows and forms the scores for both passes; :func:`forward` and
:func:`backward` differ only in what they do with a sparse segment's scores.

Memory: a branch's sparse segments are processed in chunks of whole segments, so that the ``(T, T)`` score blocks alive at once take at most ``memory_budget`` bytes
(1 GiB by default; a single segment larger than the budget is still processed whole). Besides
that the forward keeps one ``(B, N, H, Dv)`` output and ``(B, N, H)`` lse per branch.

float16 (and bfloat16, where the array library has it) inputs are computed in float32: the
output is returned in the input dtype, ``lse`` in float32 (SPEC §1 asks for float32/float64;
the half types are a GPU extension, see ``docs/gpu.md``).

Docs: ``docs/segments.md``, ``docs/mixture.md``, ``docs/backward.md``, ``docs/gpu.md``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from array_api_compat import array_namespace

from . import index_sets
from .index_sets import Branch, SparseSegments, sparse_segments

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of (T, T) score blocks alive at once: 1 GiB
LIVE_SCORE_BLOCKS = 4  # the backward holds S, P, dP and dS of a chunk at once


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

    A query row without weight (``lse = -inf``: every score ``-inf``) contributes nothing to
    ``dq``, ``dk``, ``dv`` (SPEC §5): it is treated as attending no key, so ``P = dS = 0`` on
    its row and its ``q``, ``dO`` rows (perhaps infinite) are never multiplied by those zeros.
    """
    xp = array_namespace(scores)
    weightless = lse == -xp.inf  # (..., Tq): rows whose every score is -inf
    if bool(xp.any(weightless)):
        attends = ~weightless[..., None]  # (..., Tq, 1)
        attended = attends if attended is None else attended & attends
    lse = xp.where(weightless, xp.inf, lse)  # P = exp(-inf - inf) = 0 on such rows, not NaN
    p = xp.exp(scores - lse[..., None])  # (..., Tq, Tk)
    if attended is not None:  # exp(-inf - NaN) = NaN: a NaN row must not reach keys it does not attend
        p = xp.where(attended, p, 0)
    attended_t = None if attended is None else xp.matrix_transpose(attended)
    dv = attended_product(xp.matrix_transpose(p), attended_t, dout)  # (..., Tk, Dv)
    dp = dout @ xp.matrix_transpose(v)  # (..., Tq, Tk)
    ds = p * (dp - dsum[..., None])  # (..., Tq, Tk)
    if attended is not None:
        ds = xp.where(attended, ds, 0)  # exactly 0 off the pattern, even where dP is NaN
    dq = scale * attended_product(ds, attended, k)  # (..., Tq, D)
    dk = scale * attended_product(xp.matrix_transpose(ds), attended_t, q)  # (..., Tk, D)
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
    pairs = attended & ~xp.matrix_transpose(finite)  # (..., Tq, Tk) attended pairs with such a key
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
    rows = xp.take(xp.concat([*flat, filler], axis=1), xp.asarray(index), axis=1)  # (B, L H, ...)
    return xp.reshape(rows, (batch, stop - first, num_heads, *features))


def attended_pairs(xp, valid, causal):
    """``(S, T, T)`` mask of the (query row, key row) pairs attended (``K_i(p)`` of SPEC §3), or ``None``.

    ``None`` when every pair is (no padding, not causal): the softmax then needs no mask.
    Otherwise the mask of ``index_sets.attended_mask``, built in ``xp`` on the inputs' device.
    """
    if not causal and valid.all():
        return None
    return index_sets.attended_mask(valid, causal, xp)


def segment_scores(qs, ks, attended, scale):
    """``S = scale * Q_s K_s^T`` per sparse segment, ``-inf`` outside ``K_i(p)`` (SPEC §3).

    ``qs, ks: (B, S, Hs, T, D)``, ``attended (S, T, T)`` or ``None`` -> scores
    ``(B, S, Hs, T, T)`` and the pattern broadcast as ``(1, S, 1, T, T)``. The scale multiplies
    ``Q`` (``T x D``) rather than the ``T x T`` scores: the same product, fewer operations.
    """
    xp = array_namespace(qs)
    scores = (qs * scale) @ xp.matrix_transpose(ks)  # (B, S, Hs, T, T)
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


def sparse_segment_results(attend, arrays, fills, branches, causal, scale, offsets, memory_budget=None):
    """The one loop of the reference: ``attend`` on every sparse segment, scattered back, per branch.

    For every branch ``i``, every chunk of its segments (:func:`segment_chunks`) and every
    offset group of the chunk (the heads that share an offset, SPEC §2):

    1. sparsify (paper Eqs. 3-5): gather ``arrays`` (each ``(B, N, H, ...)``, ``q`` and ``k``
       first) at the rows ``P(i, s, h)`` -> ``(B, S, Hs, T, ...)``;
    2. score: ``S = scale Q K^T``, ``-inf`` outside ``K_i(p)`` (:func:`segment_scores`);
    3. ``attend(scores, attended, *gathered)``: the per-segment maths (the forward's softmax or
       the exact backward), a tuple of ``(B, S, Hs, T, ...)`` results;
    4. scatter (paper Eqs. 7-8): every result back to its own position, ``fills[j]`` where the
       branch selects no row.

    ``arrays[0]`` sets the shapes: ``(B, N, H, D)`` with ``N, B, H > 0``. Yields, branch by
    branch, the tuple of scattered results, each ``(B, N, H, ...)``. Every branch yields: head 0
    has offset 0 under both rules, so every branch selects rows when ``N > 0``.
    """
    xp = array_namespace(arrays[0])
    batch, n, num_heads, _ = arrays[0].shape
    itemsize = 8 if arrays[0].dtype == xp.float64 else 4
    segments = sparse_segments(n, num_heads, branches, offsets)
    for _, groups in itertools.groupby(segments, key=lambda g: g.branch):
        groups = list(groups)  # the offset groups of this branch
        w = groups[0].segment_length
        chunks = []  # the branch's results, chunk by chunk along the sequence
        for s0, s1 in segment_chunks(groups, batch, itemsize, memory_budget):
            tables = [(g.positions[s0:s1], g.valid[s0:s1], g.heads) for g in groups]
            parts = []  # per offset group: attend's results (B, S, Hs, T, ...)
            for positions, valid, heads in tables:
                gathered = [gather_rows(x, positions, valid, heads) for x in arrays]
                scores, attended = segment_scores(*gathered[:2], attended_pairs(xp, valid, causal), scale)
                parts.append(attend(scores, attended, *gathered))
            first, stop = s0 * w, min(s1 * w, n)  # the chunk's positions
            index = scatter_index(tables, first, stop, num_heads)
            chunks.append([scatter_rows(list(p), index, first, stop, num_heads, f) for p, f in zip(zip(*parts), fills)])
        yield tuple(xp.concat(list(c), axis=1) for c in zip(*chunks))  # each (B, N, H, ...)


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

    Per branch, each sparse segment's softmax attention (Eq. 6) gives ``o_i, lse_i``; the
    branches are mixed by their softmax denominators (Eqs. 9-10, :func:`mix_branches`).

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)`` -> ``out (B, N, H, Dv)`` in the input dtype,
    ``lse (B, N, H)`` (float32 for half inputs), in the inputs' namespace.
    """
    xp = array_namespace(q)
    batch, n, num_heads, _ = q.shape
    dtype = q.dtype
    real = compute_dtype(xp, dtype)
    q, k, v = (xp.astype(x, real, copy=False) for x in (q, k, v))  # a no-op unless half precision
    if n == 0 or batch == 0 or num_heads == 0:
        return xp.zeros(v.shape, dtype=dtype), xp.zeros((batch, n, num_heads), dtype=real)

    def attend(scores, attended, qs, ks, vs):  # one sparse segment: o_i, lse_i (Eq. 6)
        return attention_from_scores(scores, vs, attended)

    branches_out = sparse_segment_results(attend, (q, k, v), (0, -math.inf), branches, causal, scale, offsets, memory_budget)
    branch_out, branch_lse = zip(*branches_out)  # o_i (B, N, H, Dv), lse_i (B, N, H) per branch
    out, lse = mix_branches(xp.stack(branch_out), xp.stack(branch_lse))
    return xp.astype(out, dtype, copy=False), lse


@np.errstate(invalid="ignore", over="ignore")  # as in forward
def backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    branches: tuple[Branch, ...],
    causal: bool,
    scale: float,
    offsets: str,
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
    dout, q, k, v, out, lse = (xp.astype(x, real, copy=False) for x in (dout, q, k, v, out, lse))
    dsum = xp.sum(dout * out, axis=-1)  # (B, N, H)  Dsum = rowsum(dO * O)
    dq, dk, dv = (xp.zeros(x.shape, dtype=real) for x in (q, k, v))
    if n == 0 or batch == 0 or num_heads == 0:
        return tuple(xp.astype(g, dtype, copy=False) for g in (dq, dk, dv))

    def attend(scores, attended, qs, ks, vs, dout_s, lse_s, dsum_s):  # one sparse segment's share
        return attention_backward_from_scores(scores, attended, lse_s, dsum_s, qs, ks, vs, dout_s, scale)

    arrays = (q, k, v, dout, lse, dsum)
    for dq_i, dk_i, dv_i in sparse_segment_results(attend, arrays, (0, 0, 0), branches, causal, scale, offsets, memory_budget):
        dq, dk, dv = dq + dq_i, dk + dk_i, dv + dv_i  # the branches' shares add up (SPEC §5)
    return tuple(xp.astype(g, dtype, copy=False) for g in (dq, dk, dv))
