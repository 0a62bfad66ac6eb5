"""``backend="numba"``: fused, parallel CPU kernels for dilated attention (SPEC §3-5).

The same maths as ``longnet_ref.reference``, without materialising any ``(T, T)`` score
matrix: FlashAttention-style tiles over each sparse segment.

Forward, for every branch ``i`` in turn (a parallel loop over work items
``(batch, head, segment, query block)``; each item owns its query rows):

    gather Q_blk (rows s*w + o + t*r), pre-scaled;  m = -inf, l = 0, acc = 0
    for each key block:  S = Q_blk K_blk^T                      (BLAS; causally only the rows
                                                                  that attend the block)
                         m' = max(m, rowmax S);  P = exp(S - m')  (single-pass vectorised exp)
                         l = l e^{m - m'} + rowsum P;  acc = acc e^{m - m'} + P V_blk
    o_i = acc / l,  lse_i = m + log l
    mix into the output with a running LSE (paper Eq. 10):
        LSE' = logaddexp(LSE, lse_i),  out = out e^{LSE - LSE'} + o_i e^{lse_i - LSE'}

Backward (exact gradient, SPEC §5) with the global ``LSE`` and ``Dsum = rowsum(dO * O)``,
``P = exp(scale Q K^T - LSE)``, ``dS = P * (dO V^T - Dsum)``; per branch, no two work items
write the same row (deterministic, independent of the thread count):

    >= MIN_SEGMENT_ITEMS segments: one item per (b, h, s) owns the whole sparse segment,
    gathered once into contiguous buffers and scattered once at the end:
        dV += P^T dO;  dK += scale dS^T Q;  dQ += scale dS K    (5 GEMMs per block pair)
    fewer (long segments, B = H = 1): two passes that split segments into blocks
        keys pass    (b, h, s, key block):   dV, dK
        queries pass (b, h, s, query block): dQ                  (7 GEMMs per block pair)

Extra memory is O(block^2 + block * D) per thread; nothing of size N * w / r. Indices are
computed from ``(w, r, o)`` and validated by the public API before entry; every loop bound is
clipped to the segment and to N, so no input the API accepts can make a kernel read out of
bounds (CI runs these tests with ``NUMBA_BOUNDSCHECK=1``). Inputs are made C-contiguous and
writeable before entry (one compiled specialisation per dtype), and BLAS is single-threaded
inside the parallel loops from the first call on. ``segment_forward`` / ``segment_backward``
serve the distributed backend's gathered segments. Docs: ``docs/numba.md``.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS the kernels call: loaded now, see below)
from numba import njit, prange
from threadpoolctl import threadpool_limits

from .. import index_sets
from ..index_sets import Branch, head_offsets
from .numba_exp import exp_shifted_block

# Numba's ``np.dot`` calls SciPy's BLAS (``scipy.linalg.cython_blas``), which Numba would load
# lazily inside the first kernel call, *after* ``threadpool_limits`` has listed the loaded
# libraries: the first call then ran multi-threaded BLAS inside the parallel loop (2.5-60x
# slower). Importing it above, with this module, puts it under every limit we apply.

# Query rows per work item, by the causal flag (a run-time argument of the kernels). Large blocks
# gather each key block once for many queries and give BLAS larger products: 1024 measured best
# for the paper configuration (57 % of the GEMM rate vs 53 % at 512, 43 % at 128). Causal blocks
# skip the rows before each key block (first_attending_row), so they can be larger than the 256
# they needed when whole diagonal blocks were computed and masked: 512 measured best, N = 16K,
# forward 42 % vs 36 % (256) and 41 % (1024), fwd+bwd 50 % vs 49 % and 47 %, under load.
# Measured by interleaving GEMM and kernel runs (docs/numba.md).
QUERY_BLOCK = {False: 1024, True: 512}
BLOCK_K = 128  # key rows per inner step
# The backward runs one item per whole sparse segment (5 GEMMs per block pair) when a branch has
# at least this many segments, else splits them in two passes (7 GEMMs, any parallelism). A
# constant, not the thread count, so results are the same whatever the number of threads.
MIN_SEGMENT_ITEMS = 8


# The index rules of SPEC §2-3, written once in ``config`` and compiled into the kernels.
segment_size = njit(cache=True, inline="always")(index_sets.segment_size)
segment_position = njit(cache=True, inline="always")(index_sets.segment_position)
causal_key_count = njit(cache=True, inline="always")(index_sets.causal_key_count)


@njit(cache=True, inline="always")
def work_item(item, heads, num_segments, blocks):
    """``item`` -> ``(batch, head, segment, block)``; int64 throughout (prange's index is unsigned)."""
    item = np.int64(item)
    block = item % blocks
    item //= blocks
    segment = item % num_segments
    item //= num_segments
    return item // heads, item % heads, segment, block


@njit(cache=True, inline="always")
def blocks_per_segment(n, w, r, block):
    """Blocks of ``block`` rows in the largest sparse segment of a branch (offset 0)."""
    return ((min(w, n) + r - 1) // r + block - 1) // block


class Segment(NamedTuple):
    """Sparse segment ``s`` of a branch ``(w, r)`` at head offset ``o`` (SPEC §2).

    A named tuple, not a plain one: Numba's array analysis mistakes a tuple of integers for an
    array shape inside parallel loops.
    """

    w: int
    r: int
    o: int
    s: int


@njit(cache=True, inline="always")
def row_of(segment, t):
    """Sequence position of the ``t``-th selected row of ``segment`` (SPEC §2)."""
    return segment_position(segment.w, segment.r, segment.o, segment.s, t)


@njit(cache=True, inline="always")
def block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block):
    """Work item -> ``(b, h, o, s, t0, count, size)``: rows ``t0 .. t0 + count - 1`` of the
    sparse segment ``Segment(w, r, o, s)`` of head ``h``, which has ``size`` rows;
    ``count = 0`` when the block starts past the segment's last row."""
    b, h, s, index = work_item(item, heads, num_segments, blocks)
    o = np.int64(offsets[h])
    size = segment_size(n, w, r, o, s)
    t0 = index * block
    return b, h, o, s, t0, max(0, min(block, size - t0)), size


@njit(cache=True, inline="always")
def first_attending_row(q0, k0, causal):
    """First row ``i`` of a query block starting at ``q0`` that attends key ``k0`` or later.

    Causally, query ``t`` attends keys ``k < causal_key_count(t) = t + 1``: rows before
    ``k0 - q0`` see none of a key block starting at ``k0``, so they are skipped rather than
    computed and masked (the diagonal block's masked rows cost nothing).
    """
    return max(0, k0 - q0) if causal else 0


@njit(cache=True)
def _all_finite(x):
    for value in x.ravel():
        if not np.isfinite(value):
            return False
    return True


@njit(cache=True)
def attended_dot_add(acc, weights, rows, transpose, q0, k0, causal):
    """``acc += weights @ rows`` (``weights^T @ rows`` if ``transpose``) over attended pairs only.

    ``weights`` is ``(nq, nk)`` indexed (query q0 + i, key k0 + j). Unattended (causal) pairs
    have weight 0, but 0 * NaN = NaN: when ``rows`` holds a NaN/Inf and the block has masked
    pairs, multiply pair by pair so the bad row reaches only rows that attend it (SPEC §7).
    """
    nq, nk = weights.shape
    fully_attended = (not causal) or (k0 + nk <= causal_key_count(q0))
    if fully_attended or _all_finite(rows):
        if transpose:
            acc += np.dot(weights.T, rows)
        else:
            acc += np.dot(weights, rows)
        return
    for i in range(nq):
        for j in range(min(nk, causal_key_count(q0 + i) - k0)):
            if transpose:
                acc[j] += weights[i, j] * rows[i]
            else:
                acc[i] += weights[i, j] * rows[j]


@njit(cache=True)
def mask_future(scores, q0, k0, value):
    """Causal rule inside a block: query ``q0 + i`` attends key ``k0 + j`` iff ``k0 + j <
    causal_key_count(q0 + i)``; the others are set to ``value``."""
    nq, nk = scores.shape
    for i in range(nq):
        for j in range(max(0, causal_key_count(q0 + i) - k0), nk):
            scores[i, j] = value


@njit(cache=True)
def gather(x, b, h, segment, t0, count, out, factor):
    """``out[j] = factor * x[b, row_of(segment, t0 + j), h]``: rows of one sparse segment."""
    for j in range(count):
        row = row_of(segment, t0 + j)
        for c in range(x.shape[3]):  # element loop: a row expression would allocate a temporary
            out[j, c] = x[b, row, h, c] * factor


@njit(cache=True)
def scatter_add(x, b, h, segment, t0, count, rows, factor):
    """``x[b, row_of(segment, t0 + j), h] += factor * rows[j]``: the inverse of [`gather`][]."""
    for j in range(count):
        row = row_of(segment, t0 + j)
        for c in range(x.shape[3]):
            x[b, row, h, c] += factor * rows[j, c]


MAX_LANES = 16  # independent maxima per row in running_max


@njit(cache=True, fastmath={"nnan", "nsz"})
def running_max(scores, m, m_new, shift):
    """``m' = max(m, rowmax S)`` and the exp shift (``m'``, or 0 while a row has seen no key).

    16 independent maxima per row (``MAX_LANES``), merged at the end: LLVM does not vectorise a
    single max-reduction chain (measured 2x faster on 1024 x 128 blocks). ``nnan``: a NaN score
    need not win here, since it reaches its row anyway through ``exp(S - m')`` -> ``P`` -> ``l``.
    """
    nq, nk = scores.shape
    lanes = np.empty(MAX_LANES, scores.dtype)
    full = nk - nk % MAX_LANES
    for i in range(nq):
        lanes[:] = m[i]
        for j0 in range(0, full, MAX_LANES):
            for u in range(MAX_LANES):
                x = scores[i, j0 + u]
                lanes[u] = x if x > lanes[u] else lanes[u]  # noqa: FURB136 (a select LLVM vectorises)
        row_max = m[i]
        for u in range(MAX_LANES):
            row_max = lanes[u] if lanes[u] > row_max else row_max  # noqa: FURB136
        for j in range(full, nk):  # the ragged end of the block
            row_max = scores[i, j] if scores[i, j] > row_max else row_max  # noqa: FURB136
        m_new[i] = row_max
        shift[i] = 0.0 if row_max == -np.inf else row_max


@njit(cache=True, fastmath={"reassoc"})
def row_sums(p, out):
    """``out[i] = sum_j p[i, j]``; ``reassoc`` lets LLVM vectorise the sum (NaN still propagates)."""
    nq, nk = p.shape
    for i in range(nq):
        total = p.dtype.type(0.0)
        for j in range(nk):
            total += p[i, j]
        out[i] = total


@njit(cache=True)
def online_softmax_step(scores, v_blk, m, l, acc, q0, k0, causal, p_flat, pv_flat):
    """One key block of the online softmax for the rows of ``scores`` (queries ``q0 + i``):
    ``m' = max(m, rowmax S)``, ``P = exp(S - m')``, ``l = l e^{m - m'} + rowsum P``,
    ``acc = acc e^{m - m'} + P V``. ``p_flat``, ``pv_flat``: scratch for ``P`` and ``P V``."""
    nq, nk = scores.shape
    m_new, shift, l_blk = np.empty(nq, m.dtype), np.empty(nq, m.dtype), np.empty(nq, m.dtype)
    if causal:
        mask_future(scores, q0, k0, -np.inf)
    running_max(scores, m, m_new, shift)
    p = p_flat[: nq * nk].reshape((nq, nk))
    exp_shifted_block(scores, shift, p)
    pv = pv_flat[: nq * acc.shape[1]].reshape((nq, acc.shape[1]))
    if causal and k0 + nk > causal_key_count(q0) and not _all_finite(v_blk):
        pv[:] = 0.0  # masked pairs must not multiply a NaN/Inf value row (SPEC §7)
        attended_dot_add(pv, p, v_blk, False, q0, k0, causal)
    else:
        np.dot(p, v_blk, pv)
    row_sums(p, l_blk)
    for i in range(nq):
        correction = np.exp(m[i] - m_new[i]) if m[i] != -np.inf else 0.0
        m[i] = m_new[i]
        l[i] = l[i] * correction + l_blk[i]
        for c in range(acc.shape[1]):
            acc[i, c] = acc[i, c] * correction + pv[i, c]


@njit(cache=True)
def mix_into_output(out, lse, b, h, segment, q0, m, l, acc):
    """``o_i = acc / l``, ``lse_i = m + log l``, mixed into ``out``/``lse`` by paper Eq. 10."""
    for i in range(acc.shape[0]):
        if l[i] == 0.0:
            continue  # every score -inf: no key, lse_i = -inf, alpha_i = 0 (SPEC §3)
        row = row_of(segment, q0 + i)
        lse_i = m[i] + np.log(l[i])
        old = lse[b, row, h]
        if old == -np.inf:  # first branch covering this row
            for c in range(acc.shape[1]):
                out[b, row, h, c] = acc[i, c] / l[i]
            lse[b, row, h] = lse_i
        else:  # paper Eq. 10 with a running LSE
            new = np.logaddexp(old, lse_i)
            keep, add = np.exp(old - new), np.exp(lse_i - new) / l[i]
            for c in range(acc.shape[1]):
                out[b, row, h, c] = out[b, row, h, c] * keep + acc[i, c] * add
            lse[b, row, h] = new


@njit(cache=True)
def attend_query_block(q_blk, k, v, b, h, segment, size, q0, causal):
    """Online softmax of one query block against the keys it attends in its sparse segment (SPEC §3).

    ``q_blk (nq, D)``: rows ``q0 .. q0 + nq - 1`` of ``segment``, pre-scaled; ``k, v (B, N, H, .)``
    read at ``row_of(segment, t)`` for ``t < size`` (all of them, or causally those up to the
    block's last row), key block by key block:

        S = Q_blk K_blk^T,  m' = max(m, rowmax S),  P = exp(S - m'),
        l = l e^{m - m'} + rowsum P,  acc = acc e^{m - m'} + P V_blk

    Returns ``m, l (nq,)`` and ``acc (nq, Dv)``: ``o_i = acc / l``, ``lse_i = m + log l``.
    The query-block body of both forward kernels, :func:`forward_branch` and
    :func:`gathered_forward`.
    """
    nq, dim = q_blk.shape
    value_dim = v.shape[3]
    one = q_blk.dtype.type(1.0)
    k_blk = np.empty((BLOCK_K, dim), q_blk.dtype)
    v_blk = np.empty((BLOCK_K, value_dim), q_blk.dtype)
    scores_flat = np.empty(nq * BLOCK_K, q_blk.dtype)  # flat: every (rows, nk) view is contiguous
    p_flat, pv_flat = np.empty(nq * BLOCK_K, q_blk.dtype), np.empty(nq * value_dim, q_blk.dtype)
    m = np.full(nq, -np.inf, q_blk.dtype)  # max so far
    l = np.zeros(nq, q_blk.dtype)  # softmax denominator so far
    acc = np.zeros((nq, value_dim), q_blk.dtype)  # numerator P V so far
    k_end = min(size, causal_key_count(q0 + nq - 1)) if causal else size
    for k0 in range(0, k_end, BLOCK_K):
        nk = min(BLOCK_K, k_end - k0)
        gather(k, b, h, segment, k0, nk, k_blk, one)
        gather(v, b, h, segment, k0, nk, v_blk, one)
        i0 = first_attending_row(q0, k0, causal)  # causal diagonal: skip rows that see no key
        scores = scores_flat[: (nq - i0) * nk].reshape((nq - i0, nk))
        np.dot(q_blk[i0:], k_blk[:nk].T, scores)
        online_softmax_step(scores, v_blk[:nk], m[i0:], l[i0:], acc[i0:], q0 + i0, k0, causal, p_flat, pv_flat)
    return m, l, acc


@njit(cache=True, parallel=True)
def forward_branch(q, k, v, w, r, offsets, causal, scale, block_q, out, lse):
    """One branch of the forward, mixed into ``out (B, N, H, Dv)``, ``lse (B, N, H)`` in place."""
    batch, n, heads, dim = q.shape
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, block_q)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, o, s, q0, nq, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block_q)
        segment = Segment(w, r, o, s)
        if nq == 0:
            continue
        q_blk = np.empty((nq, dim), q.dtype)
        gather(q, b, h, segment, q0, nq, q_blk, scale)  # pre-scaled: S = (scale Q) K^T
        m, l, acc = attend_query_block(q_blk, k, v, b, h, segment, size, q0, causal)
        mix_into_output(out, lse, b, h, segment, q0, m, l, acc)


@njit(cache=True)
def probabilities(q_blk, k_blk, lse_blk, q0, k0, causal, scores, p):
    """``P = exp(scale Q K^T - LSE)`` for one (query block, key block) pair, exactly 0 on the pairs
    the causal rule excludes (even in a row whose LSE is NaN: its NaN must not reach other keys).

    ``scores`` and ``p`` are distinct buffers: an in-place exp would defeat LLVM's vectoriser.
    """
    np.dot(q_blk, k_blk.T, scores)  # q_blk is pre-scaled
    exp_shifted_block(scores, lse_blk, p)
    if causal:  # after the exp: exp(-inf - LSE) would be NaN for a row whose LSE is NaN (SPEC §7)
        mask_future(p, q0, k0, 0.0)
    for i in range(p.shape[0]):
        if lse_blk[i] == np.inf:  # a row without weight (see backward_lse): P = 0, even
            p[i, :] = 0.0  # where its zeroed q meets an infinite key (0 * inf = NaN)


@njit(cache=True)
def score_gradient(p, do_blk, v_blk, lse_blk, dsum_blk, q0, k0, causal):
    """``dS = P * (dO V^T - Dsum)``, exactly 0 on unattended pairs (even if dO V^T is NaN) and on
    the rows without weight (``lse_blk = +inf``, see :func:`backward_lse`)."""
    ds = np.dot(do_blk, v_blk.T)  # dP
    nq, nk = ds.shape
    for i in range(nq):
        limit = nk if not causal else min(nk, max(0, causal_key_count(q0 + i) - k0))
        if lse_blk[i] == np.inf:
            limit = 0  # attends no key: its dP may be 0 * inf = NaN
        for j in range(limit):
            ds[i, j] = p[i, j] * (ds[i, j] - dsum_blk[i])
        for j in range(limit, nk):
            ds[i, j] = 0.0
    return ds


@njit(cache=True, inline="always")
def backward_lse(lse):
    """The ``LSE`` the backward uses for a query row: ``+inf`` for a row without weight (SPEC §5).

    Such a row (``LSE = -inf``: every score ``-inf``) contributes nothing: with ``+inf``,
    ``P = exp(S - LSE) = 0`` on its row (with ``-inf`` it would be ``exp(S + inf) = inf``), and
    :func:`probabilities` and :func:`score_gradient` keep its ``P`` and ``dS`` exactly 0. Its
    ``q`` and ``dO`` rows enter the kernels as 0 (:func:`_clear_rows_without_weight`).
    """
    return np.inf if lse == -np.inf else lse


@njit(cache=True)
def gather_row_statistics(lse, dsum, b, h, segment, q0, nq, lse_blk, dsum_blk):
    """``LSE`` (by :func:`backward_lse`) and ``Dsum`` of a query block."""
    for i in range(nq):
        row = row_of(segment, q0 + i)
        lse_blk[i] = backward_lse(lse[b, row, h])
        dsum_blk[i] = dsum[b, row, h]


@njit(cache=True)
def block_pair_backward(q_blk, do_blk, k_blk, v_blk, lse_blk, dsum_blk, q0, k0, causal, scores, p, dq_blk, dk_blk, dv_blk):
    """One (query block, key block) pair of the FA2 backward, accumulating into the three
    gradient blocks (``dq_blk``: ``dS K`` without the scale; ``dk_blk`` gets it from ``q_blk``)."""
    probabilities(q_blk, k_blk, lse_blk, q0, k0, causal, scores, p)
    attended_dot_add(dv_blk, p, do_blk, True, q0, k0, causal)  # dV += P^T dO
    ds = score_gradient(p, do_blk, v_blk, lse_blk, dsum_blk, q0, k0, causal)
    attended_dot_add(dk_blk, ds, q_blk, True, q0, k0, causal)  # dK += dS^T (scale Q)
    attended_dot_add(dq_blk, ds, k_blk, False, q0, k0, causal)  # dQ += dS K


@njit(cache=True, parallel=True)
def backward_segments_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, block_q, dq, dk, dv):
    """One branch of the backward, one work item per ``(batch, head, segment)`` (FA2 order).

    The item owns every row of its sparse segment for this branch: it gathers the segment's
    Q, dO, K, V, LSE and Dsum once into contiguous buffers, runs 5 GEMMs per (query block, key
    block) pair on views of them, and scatters dQ, dK, dV once at the end.
    """
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments):
        # one block per segment, as long as the sequence: the item owns all `size` rows
        b, h, o, s, _, size, _ = block_of_item(item, n, heads, num_segments, 1, w, r, offsets, n)
        segment = Segment(w, r, o, s)
        if size == 0:
            continue
        q_seg, k_seg = np.empty((size, dim), q.dtype), np.empty((size, dim), q.dtype)
        v_seg, do_seg = np.empty((size, value_dim), q.dtype), np.empty((size, value_dim), q.dtype)
        gather(q, b, h, segment, 0, size, q_seg, scale)  # pre-scaled
        gather(k, b, h, segment, 0, size, k_seg, one)
        gather(v, b, h, segment, 0, size, v_seg, one)
        gather(dout, b, h, segment, 0, size, do_seg, one)
        lse_seg, dsum_seg = np.empty(size, q.dtype), np.empty(size, q.dtype)
        gather_row_statistics(lse, dsum, b, h, segment, 0, size, lse_seg, dsum_seg)
        dq_seg, dk_seg = np.zeros((size, dim), q.dtype), np.zeros((size, dim), q.dtype)
        dv_seg = np.zeros((size, value_dim), q.dtype)
        scores_flat, p_flat = np.empty(block_q * BLOCK_K, q.dtype), np.empty(block_q * BLOCK_K, q.dtype)
        for k0 in range(0, size, BLOCK_K):
            nk = min(BLOCK_K, size - k0)
            k1 = k0 + nk
            # causally, queries before k0 never see these keys: start the query blocks at k0
            for q0 in range(k0 if causal else 0, size, block_q):
                q1 = min(size, q0 + block_q)
                scores = scores_flat[: (q1 - q0) * nk].reshape((q1 - q0, nk))
                p = p_flat[: (q1 - q0) * nk].reshape((q1 - q0, nk))
                block_pair_backward(
                    q_seg[q0:q1],
                    do_seg[q0:q1],
                    k_seg[k0:k1],
                    v_seg[k0:k1],
                    lse_seg[q0:q1],
                    dsum_seg[q0:q1],
                    q0,
                    k0,
                    causal,
                    scores,
                    p,
                    dq_seg[q0:q1],
                    dk_seg[k0:k1],
                    dv_seg[k0:k1],
                )
        scatter_add(dq, b, h, segment, 0, size, dq_seg, scale)
        scatter_add(dk, b, h, segment, 0, size, dk_seg, one)
        scatter_add(dv, b, h, segment, 0, size, dv_seg, one)


@njit(cache=True, parallel=True)
def backward_keys_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, block_q, dk, dv):
    """Keys pass of one branch: ``dV += P^T dO``, ``dK += scale dS^T Q`` per key block."""
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, BLOCK_K)
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, o, s, k0, nk, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, BLOCK_K)
        segment = Segment(w, r, o, s)
        if nk == 0:
            continue
        k_blk = np.empty((nk, dim), q.dtype)
        v_blk = np.empty((nk, value_dim), q.dtype)
        gather(k, b, h, segment, k0, nk, k_blk, one)
        gather(v, b, h, segment, k0, nk, v_blk, one)
        dk_blk = np.zeros((nk, dim), q.dtype)
        dv_blk = np.zeros((nk, value_dim), q.dtype)
        q_blk = np.empty((block_q, dim), q.dtype)
        do_blk = np.empty((block_q, value_dim), q.dtype)
        lse_blk = np.empty(block_q, q.dtype)
        dsum_blk = np.empty(block_q, q.dtype)
        scores, p = np.empty((block_q, nk), q.dtype), np.empty((block_q, nk), q.dtype)
        for q0 in range(k0 if causal else 0, size, block_q):  # causally, earlier queries never see these keys
            nq = min(block_q, size - q0)
            gather(q, b, h, segment, q0, nq, q_blk, scale)
            gather(dout, b, h, segment, q0, nq, do_blk, one)
            gather_row_statistics(lse, dsum, b, h, segment, q0, nq, lse_blk, dsum_blk)
            probabilities(q_blk[:nq], k_blk, lse_blk[:nq], q0, k0, causal, scores[:nq], p[:nq])
            attended_dot_add(dv_blk, p[:nq], do_blk[:nq], True, q0, k0, causal)
            ds = score_gradient(p[:nq], do_blk[:nq], v_blk, lse_blk[:nq], dsum_blk[:nq], q0, k0, causal)
            attended_dot_add(dk_blk, ds, q_blk[:nq], True, q0, k0, causal)  # q_blk carries the scale
        scatter_add(dk, b, h, segment, k0, nk, dk_blk, one)
        scatter_add(dv, b, h, segment, k0, nk, dv_blk, one)


@njit(cache=True, parallel=True)
def backward_queries_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, block_q, dq):
    """Queries pass of one branch: ``dQ += scale dS K`` per query block."""
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, block_q)
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, o, s, q0, nq, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block_q)
        segment = Segment(w, r, o, s)
        if nq == 0:
            continue
        q_blk = np.empty((nq, dim), q.dtype)
        do_blk = np.empty((nq, value_dim), q.dtype)
        gather(q, b, h, segment, q0, nq, q_blk, scale)
        gather(dout, b, h, segment, q0, nq, do_blk, one)
        lse_blk = np.empty(nq, q.dtype)
        dsum_blk = np.empty(nq, q.dtype)
        gather_row_statistics(lse, dsum, b, h, segment, q0, nq, lse_blk, dsum_blk)
        dq_blk = np.zeros((nq, dim), q.dtype)
        k_blk = np.empty((BLOCK_K, dim), q.dtype)
        v_blk = np.empty((BLOCK_K, value_dim), q.dtype)
        scores_flat, p_flat = np.empty(nq * BLOCK_K, q.dtype), np.empty(nq * BLOCK_K, q.dtype)
        k_end = min(size, causal_key_count(q0 + nq - 1)) if causal else size
        for k0 in range(0, k_end, BLOCK_K):
            nk = min(BLOCK_K, k_end - k0)
            gather(k, b, h, segment, k0, nk, k_blk, one)
            gather(v, b, h, segment, k0, nk, v_blk, one)
            i0 = first_attending_row(q0, k0, causal)  # causal diagonal: skip rows that see no key
            scores = scores_flat[: (nq - i0) * nk].reshape((nq - i0, nk))
            p = p_flat[: (nq - i0) * nk].reshape((nq - i0, nk))
            probabilities(q_blk[i0:], k_blk[:nk], lse_blk[i0:], q0 + i0, k0, causal, scores, p)
            ds = score_gradient(p, do_blk[i0:], v_blk[:nk], lse_blk[i0:], dsum_blk[i0:], q0 + i0, k0, causal)
            attended_dot_add(dq_blk[i0:], ds, k_blk[:nk], False, q0 + i0, k0, causal)
        scatter_add(dq, b, h, segment, q0, nq, dq_blk, scale)


# Gathered sparse segments: the distributed backend's shared branches (``longnet_ref.distributed``)
# gather a segment's K, V rows from several ranks; each rank attends its own run of query rows
# ``first_query .. first_query + nq - 1`` of the segment. The same block helpers as above, on
# arrays that are already contiguous ``(B, Hs, rows, D)``: no gather, no mixing.


@njit(cache=True, parallel=True)
def gathered_forward(q_rows, keys, values, first_query, causal, scale, block_q, out, lse):
    """``out (B, Hs, nq, Dv)``, ``lse (B, Hs, nq)`` of queries ``q_rows (B, Hs, nq, D)`` (segment
    rows ``first_query + i``) against a whole sparse segment ``keys``, ``values (B, T, Hs, .)``
    (rows first: the layout :func:`attend_query_block` reads, with ``Segment(T, 1, 0, 0)``
    mapping segment row ``t`` to row ``t``)."""
    batch, heads, nq_all, dim = q_rows.shape
    size = keys.shape[1]
    segment = Segment(size, 1, 0, 0)  # the gathered rows are the segment itself
    blocks = (nq_all + block_q - 1) // block_q
    for item in prange(batch * heads * blocks):
        b, h, _, index = work_item(item, heads, 1, blocks)
        i_start = index * block_q
        nq = min(block_q, nq_all - i_start)
        q0 = first_query + i_start  # segment row of the block's first query
        q_blk = np.empty((nq, dim), q_rows.dtype)
        for i in range(nq):
            for c in range(dim):
                q_blk[i, c] = q_rows[b, h, i_start + i, c] * scale  # pre-scaled: S = (scale Q) K^T
        m, l, acc = attend_query_block(q_blk, keys, values, b, h, segment, size, q0, causal)
        for i in range(nq):
            if l[i] == 0.0:
                continue  # no key attended: out 0, lse -inf (SPEC §3), as initialised
            lse[b, h, i_start + i] = m[i] + np.log(l[i])
            for c in range(acc.shape[1]):
                out[b, h, i_start + i, c] = acc[i, c] / l[i]


@njit(cache=True, parallel=True)
def gathered_backward(q_rows, keys, values, dout_rows, lse_rows, dsum_rows, first_query, causal, scale, block_q, dq, dk, dv):
    """Exact gradient of [`gathered_forward`][] with the global ``LSE`` and ``Dsum`` of the
    query rows: ``dq (B, Hs, nq, D)`` and the partial ``dk``, ``dv (B, Hs, T, .)`` of every row of
    the segment. One item per ``(b, h)``: it owns all three for its head."""
    batch, heads, nq_all, dim = q_rows.shape
    size = keys.shape[2]
    for item in prange(batch * heads):
        b, h, _, _ = work_item(item, heads, 1, 1)
        q_seg = np.empty((nq_all, dim), q_rows.dtype)
        for i in range(nq_all):
            for c in range(dim):
                q_seg[i, c] = q_rows[b, h, i, c] * scale  # pre-scaled
        lse_seg = np.empty(nq_all, q_rows.dtype)
        for i in range(nq_all):
            lse_seg[i] = backward_lse(lse_rows[b, h, i])
        scores_flat, p_flat = np.empty(block_q * BLOCK_K, q_rows.dtype), np.empty(block_q * BLOCK_K, q_rows.dtype)
        dq_seg = np.zeros((nq_all, dim), q_rows.dtype)
        for k0 in range(0, size, BLOCK_K):
            k1 = min(size, k0 + BLOCK_K)
            # causally, queries before key k0 never see it: start at the first that does
            for i_start in range(max(0, k0 - first_query) if causal else 0, nq_all, block_q):
                i_end = min(nq_all, i_start + block_q)
                rows = (i_end - i_start) * (k1 - k0)
                block_pair_backward(
                    q_seg[i_start:i_end],
                    dout_rows[b, h, i_start:i_end],
                    keys[b, h, k0:k1],
                    values[b, h, k0:k1],
                    lse_seg[i_start:i_end],
                    dsum_rows[b, h, i_start:i_end],
                    first_query + i_start,
                    k0,
                    causal,
                    scores_flat[:rows].reshape((i_end - i_start, k1 - k0)),
                    p_flat[:rows].reshape((i_end - i_start, k1 - k0)),
                    dq_seg[i_start:i_end],
                    dk[b, h, k0:k1],
                    dv[b, h, k0:k1],
                )
        for i in range(nq_all):
            for c in range(dim):
                dq[b, h, i, c] = scale * dq_seg[i, c]


def segment_forward(q_rows, keys, values, first_query, causal, scale):
    """Attention of query rows ``first_query ..`` of one sparse segment against all its keys.

    ``q_rows (B, Hs, nq, D)``, ``keys (B, Hs, T, D)``, ``values (B, Hs, T, Dv)`` ->
    ``(out (B, Hs, nq, Dv), lse (B, Hs, nq))``: the branch's ``o_i`` and ``lse_i`` of SPEC §3.
    """
    q_rows = _kernel_input(q_rows)
    keys, values = (_kernel_input(x.transpose(0, 2, 1, 3)) for x in (keys, values))  # (B, T, Hs, .): rows first
    batch, heads, nq, _ = q_rows.shape
    out = np.zeros((batch, heads, nq, values.shape[3]), q_rows.dtype)
    lse = np.full((batch, heads, nq), -np.inf, q_rows.dtype)
    if out.size or lse.size:
        with threadpool_limits(1, user_api="blas"):
            gathered_forward(
                q_rows,
                keys,
                values,
                int(first_query),
                bool(causal),
                q_rows.dtype.type(scale),
                QUERY_BLOCK[causal],
                out,
                lse,
            )
    return out, lse


def segment_backward(q_rows, keys, values, dout_rows, lse_rows, dsum_rows, first_query, causal, scale):
    """Exact gradient of [`segment_forward`][] given the global ``LSE`` and ``Dsum`` of the query
    rows (SPEC §5): ``dq (B, Hs, nq, D)``, partial ``dk (B, Hs, T, D)`` and ``dv (B, Hs, T, Dv)``."""
    arrays = (q_rows, keys, values, dout_rows, lse_rows, dsum_rows)
    q_rows, keys, values, dout_rows, lse_rows, dsum_rows = (_kernel_input(x) for x in arrays)
    weightless, q_rows, dout_rows = _clear_rows_without_weight(lse_rows, q_rows, dout_rows)
    dq, dk, dv = np.zeros_like(q_rows), np.zeros_like(keys), np.zeros_like(values)
    if q_rows.shape[2] and keys.shape[2]:
        with threadpool_limits(1, user_api="blas"):
            gathered_backward(
                q_rows,
                keys,
                values,
                dout_rows,
                lse_rows,
                dsum_rows,
                int(first_query),
                bool(causal),
                q_rows.dtype.type(scale),
                QUERY_BLOCK[causal],
                dq,
                dk,
                dv,
            )
    if weightless is not None:
        dq[weightless] = 0.0  # a row without weight has no gradient, even against an infinite key
    return dq, dk, dv


def _clear_rows_without_weight(lse, q, dout):
    """SPEC §5: a query row without weight (``LSE = -inf``: every score ``-inf``) contributes 0.

    Its ``q`` and ``dO`` rows (``-inf``, perhaps NaN) enter the kernels as 0, so the zeros of
    ``P`` and ``dS`` on that row (:func:`backward_lse`) never multiply an infinity.
    ``lse (..., L)``, ``q (..., L, D)``, ``dout (..., L, Dv)``, with the same leading axes.
    Returns ``(weightless (..., L) or None, q, dout)``; the inputs when there is no such row.
    """
    weightless = lse == -np.inf
    if not weightless.any():
        return None, q, dout
    keep = ~weightless[..., None]
    return weightless, np.where(keep, q, 0), np.where(keep, dout, 0)


def segments_per_branch(batch, n, heads, segment_length):
    """Work items of [`backward_segments_branch`][]: one per (batch, head, segment)."""
    return batch * heads * -(-n // segment_length)


def _kernel_input(x):
    """``x`` as a C-contiguous, aligned, writeable array of its own dtype.

    Numba compiles one specialisation per array layout and read-only flag: without this, a
    read-only (``np.broadcast_to``, a memory map) or strided input would compile every kernel
    again (20-40 s each). A copy is made only when ``x`` is not already such an array.
    """
    return np.require(x, requirements=("C", "A", "W"))


def forward(q, k, v, branches, causal, scale, offsets):
    """Dilated attention forward (SPEC §3-4); inputs validated by ``longnet_ref.attention``."""
    q, k, v = (_kernel_input(x) for x in (q, k, v))
    batch, n, heads, _ = q.shape
    out = np.zeros((batch, n, heads, v.shape[3]), q.dtype)  # (B, N, H, Dv)
    lse = np.full((batch, n, heads), -np.inf, q.dtype)  # (B, N, H)
    if out.size == 0 and lse.size == 0:
        return out, lse
    with threadpool_limits(1, user_api="blas"):  # the parallel loop owns the cores
        for branch in branches:
            o = head_offsets(heads, branch.dilation, offsets).astype(np.int64)
            forward_branch(
                q,
                k,
                v,
                branch.segment_length,
                branch.dilation,
                o,
                bool(causal),
                q.dtype.type(scale),
                QUERY_BLOCK[causal],
                out,
                lse,
            )
    return out, lse


def backward(dout, q, k, v, out, lse, branches, causal, scale, offsets):
    """Exact gradient (SPEC §5); inputs validated by ``longnet_ref.attention``."""
    dout, q, k, v, out, lse = (_kernel_input(x) for x in (dout, q, k, v, out, lse))
    weightless, q, dout = _clear_rows_without_weight(lse, q, dout)
    dsum = (dout * out).sum(axis=-1)  # (B, N, H)  Dsum = rowsum(dO * O)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if q.shape[1] == 0:
        return dq, dk, dv
    with threadpool_limits(1, user_api="blas"):
        for branch in branches:
            o = head_offsets(q.shape[2], branch.dilation, offsets).astype(np.int64)
            args = (
                q,
                k,
                v,
                dout,
                lse,
                dsum,
                branch.segment_length,
                branch.dilation,
                o,
                bool(causal),
                q.dtype.type(scale),
                QUERY_BLOCK[causal],
            )
            if segments_per_branch(q.shape[0], q.shape[1], q.shape[2], branch.segment_length) >= MIN_SEGMENT_ITEMS:
                backward_segments_branch(*args, dq, dk, dv)
            else:  # too few segments to keep every core busy: split segments into blocks
                backward_keys_branch(*args, dk, dv)
                backward_queries_branch(*args, dq)
    if weightless is not None:
        dq[weightless] = 0.0  # a row without weight has no gradient, even against an infinite key
    return dq, dk, dv


KERNELS = ("forward_branch", "backward_segments_branch", "backward_keys_branch", "backward_queries_branch")


def warm_up(dtypes=(np.float32, np.float64)) -> float:
    """Compile (first run in an installation) or load from the cache every kernel; returns seconds.

    Compiles the four parallel kernels of ``KERNELS`` (the forward and both backward paths)
    for each dtype in ``dtypes`` (a dtype or a sequence; default float32 and float64), with the
    argument types every later call uses (inputs are made C-contiguous and writeable first, so
    no input layout compiles again). Tiny inputs: one branch with a single segment (the two-pass
    backward) and one with ``MIN_SEGMENT_ITEMS`` segments (one item per segment).
    """
    dtypes = (dtypes,) if isinstance(dtypes, (type, np.dtype, str)) else tuple(dtypes)
    start = time.perf_counter()
    for dtype in dtypes:
        x = np.zeros((1, 2 * MIN_SEGMENT_ITEMS, 1, 4), dtype)  # (B, N, H, D)
        for branch in (Branch(2 * MIN_SEGMENT_ITEMS, 1), Branch(2, 1)):
            out, lse = forward(x, x, x, (branch,), False, 1.0, "paper")
            backward(out, x, x, x, out, lse, (branch,), False, 1.0, "paper")
    return time.perf_counter() - start
