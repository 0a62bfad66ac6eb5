"""``backend="numba"``: fused, parallel CPU kernels for dilated attention (SPEC §3-5).

The same maths as ``longnet_ref.reference``, without materialising any ``(T, T)`` score
matrix: FlashAttention-style tiles over each sparse segment.

Forward, for every branch ``i`` in turn (a parallel loop over work items
``(batch, head, segment, query block)``; each item owns its query rows):

    gather Q_blk (rows s*w + o + t*r), pre-scaled;  m = -inf, l = 0, acc = 0
    for each key block:  S = Q_blk K_blk^T                      (BLAS)
                         m' = max(m, rowmax S);  P = exp(S - m')  (vectorised exp)
                         l = l e^{m - m'} + rowsum P;  acc = acc e^{m - m'} + P V_blk
    o_i = acc / l,  lse_i = m + log l
    mix into the output with a running LSE (paper Eq. 10):
        LSE' = logaddexp(LSE, lse_i),  out = out e^{LSE - LSE'} + o_i e^{lse_i - LSE'}

Backward (exact gradient, SPEC §5) with the global ``LSE`` and ``Dsum = rowsum(dO * O)``,
``P = exp(scale Q K^T - LSE)``, ``dS = P * (dO V^T - Dsum)``; per branch, no two work items
write the same row (deterministic, independent of the thread count):

    >= MIN_SEGMENT_ITEMS segments: one item per (b, h, s) owns the whole sparse segment:
        dV += P^T dO;  dK += scale dS^T Q;  dQ += scale dS K    (5 GEMMs per block pair)
    fewer (long segments, B = H = 1): two passes that split segments into blocks
        keys pass    (b, h, s, key block):   dV, dK
        queries pass (b, h, s, query block): dQ                  (7 GEMMs per block pair)

Extra memory is O(block^2 + block * D) per thread; nothing of size N * w / r. Indices are
computed from ``(w, r, o)`` and validated by the public API before entry; every loop bound is
clipped to the segment and to N, so no input the API accepts can make a kernel read out of
bounds (CI runs these tests with ``NUMBA_BOUNDSCHECK=1``).
Docs: ``docs/numba.md``.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange
from threadpoolctl import threadpool_limits

from ..config import Branch, head_offsets
from .numba_exp import exp_shifted

# Query rows per work item, by the causal flag (a run-time argument of the kernels). Large blocks
# gather each key block once for many queries and give BLAS larger products: 1024 measured best
# for the paper configuration (57 % of the GEMM rate vs 53 % at 512, 43 % at 128), but a causal
# diagonal block also computes its masked upper triangle, so causal runs use 256 (46 % vs 37 %
# at 1024). Measured by interleaving GEMM and kernel runs (docs/numba.md).
QUERY_BLOCK = {False: 1024, True: 256}
BLOCK_K = 128  # key rows per inner step
# The backward runs one item per whole sparse segment (5 GEMMs per block pair) when a branch has
# at least this many segments, else splits them in two passes (7 GEMMs, any parallelism). A
# constant, not the thread count, so results are the same whatever the number of threads.
MIN_SEGMENT_ITEMS = 8


@njit(cache=True, inline="always")
def segment_size(n, w, r, o, s):
    """Rows of segment ``s`` at offset ``o``: #{t : o + t r < w, s w + o + t r < N} (SPEC §2)."""
    extent = min(w, n - s * w) - o
    return 0 if extent <= 0 else (extent + r - 1) // r


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


@njit(cache=True, inline="always")
def block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block):
    """Work item -> ``(b, h, base, t0, count, size)``: the block of sparse rows
    ``base + (t0 + j) r``, ``j < count``, of segment ``s`` for head ``h`` (``base = s w + o``);
    ``count = 0`` when the block starts past the segment's ``size`` rows."""
    b, h, s, index = work_item(item, heads, num_segments, blocks)
    o = offsets[h]
    size = segment_size(n, w, r, o, s)
    t0 = index * block
    return b, h, s * w + o, t0, max(0, min(block, size - t0)), size


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
    fully_attended = (not causal) or (k0 + nk - 1 <= q0)
    if fully_attended or _all_finite(rows):
        if transpose:
            acc += np.dot(weights.T, rows)
        else:
            acc += np.dot(weights, rows)
        return
    for i in range(nq):
        for j in range(min(nk, q0 + i - k0 + 1)):  # key k0 + j <= query q0 + i
            if transpose:
                acc[j] += weights[i, j] * rows[i]
            else:
                acc[i] += weights[i, j] * rows[j]


@njit(cache=True, inline="always")
def mask_future(scores, q0, k0):
    """Causal rule inside a block: key ``k0 + j`` is not attended by query ``q0 + i`` if later."""
    nq, nk = scores.shape
    if k0 + nk - 1 > q0:
        for i in range(nq):
            for j in range(max(0, q0 + i - k0 + 1), nk):
                scores[i, j] = -np.inf


@njit(cache=True, inline="always")
def gather(x, b, h, base, r, t0, count, out, factor):
    """``out[j] = factor * x[b, base + (t0 + j) r, h]``: rows of one sparse segment."""
    for j in range(count):
        row = base + (t0 + j) * r
        for c in range(x.shape[3]):  # element loop: a row expression would allocate a temporary
            out[j, c] = x[b, row, h, c] * factor


@njit(cache=True, fastmath={"nnan"})
def running_max(scores, m, m_new, shift):
    """``m' = max(m, rowmax S)`` and the exp shift (``m'``, or 0 while a row has seen no key).

    ``nnan`` lets LLVM vectorise the reduction; a NaN score does not need to win here, since it
    reaches its row anyway through ``exp(S - m')`` -> ``P`` -> ``l``.
    """
    nq, nk = scores.shape
    for i in range(nq):
        row_max = m[i]
        for j in range(nk):
            row_max = max(row_max, scores[i, j])
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


@njit(cache=True, parallel=True)
def forward_branch(q, k, v, w, r, offsets, causal, scale, int_like, block_q, out, lse):
    """One branch of the forward, mixed into ``out (B, N, H, Dv)``, ``lse (B, N, H)`` in place."""
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, block_q)
    itype = int_like.dtype  # int32 for float32, int64 for float64: the exp's exponent scratch
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, base, q0, nq, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block_q)
        if nq == 0:
            continue
        q_blk = np.empty((nq, dim), q.dtype)
        gather(q, b, h, base, r, q0, nq, q_blk, scale)  # pre-scaled: S = (scale Q) K^T
        k_blk = np.empty((BLOCK_K, dim), q.dtype)
        v_blk = np.empty((BLOCK_K, value_dim), q.dtype)
        scores_buffer = np.empty(nq * BLOCK_K, q.dtype)  # flat: every (nq, nk) view is contiguous
        p_buffer = np.empty(nq * BLOCK_K, q.dtype)
        exponent_buffer = np.empty(nq * BLOCK_K, itype)
        pv = np.empty((nq, value_dim), q.dtype)
        m = np.full(nq, -np.inf, q.dtype)  # running max
        m_new = np.empty(nq, q.dtype)
        shift = np.empty(nq, q.dtype)
        l = np.zeros(nq, q.dtype)  # running softmax denominator
        l_blk = np.empty(nq, q.dtype)
        acc = np.zeros((nq, value_dim), q.dtype)  # running numerator P V
        k_end = min(size, q0 + nq) if causal else size
        for k0 in range(0, k_end, BLOCK_K):
            nk = min(BLOCK_K, k_end - k0)
            gather(k, b, h, base, r, k0, nk, k_blk, one)
            gather(v, b, h, base, r, k0, nk, v_blk, one)
            scores = scores_buffer[: nq * nk].reshape((nq, nk))
            np.dot(q_blk, k_blk[:nk].T, scores)
            if causal:
                mask_future(scores, q0, k0)
            running_max(scores, m, m_new, shift)
            p = p_buffer[: nq * nk].reshape((nq, nk))
            exp_shifted(scores, shift, p, exponent_buffer[: nq * nk].reshape((nq, nk)))
            if causal and k0 + nk - 1 > q0 and not _all_finite(v_blk[:nk]):
                pv[:] = 0.0  # masked pairs must not multiply a NaN/Inf value row (SPEC §7)
                attended_dot_add(pv, p, v_blk[:nk], False, q0, k0, causal)
            else:
                np.dot(p, v_blk[:nk], pv)
            row_sums(p, l_blk)
            for i in range(nq):
                correction = np.exp(m[i] - m_new[i]) if m[i] != -np.inf else 0.0
                m[i] = m_new[i]
                l[i] = l[i] * correction + l_blk[i]
                for c in range(value_dim):
                    acc[i, c] = acc[i, c] * correction + pv[i, c]
        for i in range(nq):
            if l[i] == 0.0:
                continue  # every score -inf: no key, lse_i = -inf, alpha_i = 0 (SPEC §3)
            row = base + (q0 + i) * r
            lse_i = m[i] + np.log(l[i])
            old = lse[b, row, h]
            if old == -np.inf:  # first branch covering this row
                for c in range(value_dim):
                    out[b, row, h, c] = acc[i, c] / l[i]
                lse[b, row, h] = lse_i
            else:  # paper Eq. 10 with a running LSE
                new = np.logaddexp(old, lse_i)
                keep, add = np.exp(old - new), np.exp(lse_i - new) / l[i]
                for c in range(value_dim):
                    out[b, row, h, c] = out[b, row, h, c] * keep + acc[i, c] * add
                lse[b, row, h] = new


@njit(cache=True, inline="always")
def probabilities(q_blk, k_blk, lse_blk, q0, k0, causal, p, exponents):
    """``P = exp(scale Q K^T - LSE)`` for one (query block, key block) pair, masked causally."""
    scores = np.dot(q_blk, k_blk.T)  # q_blk is pre-scaled
    if causal:
        mask_future(scores, q0, k0)
    exp_shifted(scores, lse_blk, p, exponents)


@njit(cache=True, inline="always")
def score_gradient(p, do_blk, v_blk, dsum_blk, q0, k0, causal):
    """``dS = P * (dO V^T - Dsum)``, exactly 0 on unattended pairs (even if dO V^T is NaN)."""
    ds = np.dot(do_blk, v_blk.T)  # dP
    nq, nk = ds.shape
    for i in range(nq):
        limit = nk if not causal else min(nk, max(0, q0 + i - k0 + 1))
        for j in range(limit):
            ds[i, j] = p[i, j] * (ds[i, j] - dsum_blk[i])
        for j in range(limit, nk):
            ds[i, j] = 0.0
    return ds


@njit(cache=True, inline="always")
def gather_row_statistics(lse, dsum, b, h, base, r, q0, nq, lse_blk, dsum_blk):
    """``LSE`` and ``Dsum`` of a query block; an uncovered row (``LSE = -inf``) gets ``+inf``: P = 0."""
    for i in range(nq):
        row = base + (q0 + i) * r
        lse_blk[i] = lse[b, row, h] if lse[b, row, h] != -np.inf else np.inf
        dsum_blk[i] = dsum[b, row, h]


@njit(cache=True, parallel=True)
def backward_segments_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, int_like, block_q, dq, dk, dv):
    """One branch of the backward, one work item per ``(batch, head, segment)`` (FA2 order).

    The item owns every row of its sparse segment for this branch, so it accumulates dQ, dK
    and dV directly: 5 GEMMs per (query block, key block) pair.
    """
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    itype = int_like.dtype
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments):
        # one block per segment, as long as the sequence: the item owns all `size` rows
        b, h, base, _, size, _ = block_of_item(item, n, heads, num_segments, 1, w, r, offsets, n)
        if size == 0:
            continue
        k_blk = np.empty((BLOCK_K, dim), q.dtype)
        v_blk = np.empty((BLOCK_K, value_dim), q.dtype)
        dk_blk = np.empty((BLOCK_K, dim), q.dtype)
        dv_blk = np.empty((BLOCK_K, value_dim), q.dtype)
        q_blk = np.empty((block_q, dim), q.dtype)
        do_blk = np.empty((block_q, value_dim), q.dtype)
        dq_blk = np.empty((block_q, dim), q.dtype)
        lse_blk = np.empty(block_q, q.dtype)
        dsum_blk = np.empty(block_q, q.dtype)
        p_buffer = np.empty(block_q * BLOCK_K, q.dtype)
        exponent_buffer = np.empty(block_q * BLOCK_K, itype)
        for k0 in range(0, size, BLOCK_K):
            nk = min(BLOCK_K, size - k0)
            gather(k, b, h, base, r, k0, nk, k_blk, one)
            gather(v, b, h, base, r, k0, nk, v_blk, one)
            dk_blk[:] = 0.0
            dv_blk[:] = 0.0
            first_query = k0 if causal else 0  # earlier queries never see these keys
            for q0 in range(first_query - first_query % block_q, size, block_q):
                nq = min(block_q, size - q0)
                gather(q, b, h, base, r, q0, nq, q_blk, scale)  # pre-scaled
                gather(dout, b, h, base, r, q0, nq, do_blk, one)
                gather_row_statistics(lse, dsum, b, h, base, r, q0, nq, lse_blk, dsum_blk)
                p = p_buffer[: nq * nk].reshape((nq, nk))
                probabilities(q_blk[:nq], k_blk[:nk], lse_blk[:nq], q0, k0, causal, p, exponent_buffer[: nq * nk].reshape((nq, nk)))
                attended_dot_add(dv_blk[:nk], p, do_blk[:nq], True, q0, k0, causal)  # dV += P^T dO
                ds = score_gradient(p, do_blk[:nq], v_blk[:nk], dsum_blk[:nq], q0, k0, causal)
                attended_dot_add(dk_blk[:nk], ds, q_blk[:nq], True, q0, k0, causal)  # dK += dS^T (scale Q)
                dq_blk[:nq] = 0.0
                attended_dot_add(dq_blk[:nq], ds, k_blk[:nk], False, q0, k0, causal)  # dQ += dS K
                for i in range(nq):
                    row = base + (q0 + i) * r
                    for c in range(dim):
                        dq[b, row, h, c] += scale * dq_blk[i, c]
            for j in range(nk):
                row = base + (k0 + j) * r
                for c in range(dim):
                    dk[b, row, h, c] += dk_blk[j, c]
                for c in range(value_dim):
                    dv[b, row, h, c] += dv_blk[j, c]


@njit(cache=True, parallel=True)
def backward_keys_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, int_like, block_q, dk, dv):
    """Keys pass of one branch: ``dV += P^T dO``, ``dK += scale dS^T Q`` per key block."""
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, BLOCK_K)
    itype = int_like.dtype  # int32 for float32, int64 for float64: the exp's exponent scratch
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, base, k0, nk, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, BLOCK_K)
        if nk == 0:
            continue
        k_blk = np.empty((nk, dim), q.dtype)
        v_blk = np.empty((nk, value_dim), q.dtype)
        gather(k, b, h, base, r, k0, nk, k_blk, one)
        gather(v, b, h, base, r, k0, nk, v_blk, one)
        dk_blk = np.zeros((nk, dim), q.dtype)
        dv_blk = np.zeros((nk, value_dim), q.dtype)
        q_blk = np.empty((block_q, dim), q.dtype)
        do_blk = np.empty((block_q, value_dim), q.dtype)
        lse_blk = np.empty(block_q, q.dtype)
        dsum_blk = np.empty(block_q, q.dtype)
        p = np.empty((block_q, nk), q.dtype)
        exponents = np.empty((block_q, nk), itype)
        first_query = k0 if causal else 0  # earlier queries never see these keys
        for q0 in range(first_query - first_query % block_q, size, block_q):
            nq = min(block_q, size - q0)
            gather(q, b, h, base, r, q0, nq, q_blk, scale)
            gather(dout, b, h, base, r, q0, nq, do_blk, one)
            gather_row_statistics(lse, dsum, b, h, base, r, q0, nq, lse_blk, dsum_blk)
            probabilities(q_blk[:nq], k_blk, lse_blk[:nq], q0, k0, causal, p[:nq], exponents[:nq])
            attended_dot_add(dv_blk, p[:nq], do_blk[:nq], True, q0, k0, causal)
            ds = score_gradient(p[:nq], do_blk[:nq], v_blk, dsum_blk[:nq], q0, k0, causal)
            attended_dot_add(dk_blk, ds, q_blk[:nq], True, q0, k0, causal)  # q_blk carries the scale
        for j in range(nk):
            row = base + (k0 + j) * r
            for c in range(dim):
                dk[b, row, h, c] += dk_blk[j, c]
            for c in range(value_dim):
                dv[b, row, h, c] += dv_blk[j, c]


@njit(cache=True, parallel=True)
def backward_queries_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, int_like, block_q, dq):
    """Queries pass of one branch: ``dQ += scale dS K`` per query block."""
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    num_segments = (n + w - 1) // w
    blocks = blocks_per_segment(n, w, r, block_q)
    itype = int_like.dtype  # int32 for float32, int64 for float64: the exp's exponent scratch
    one = q.dtype.type(1.0)
    for item in prange(batch * heads * num_segments * blocks):
        b, h, base, q0, nq, size = block_of_item(item, n, heads, num_segments, blocks, w, r, offsets, block_q)
        if nq == 0:
            continue
        q_blk = np.empty((nq, dim), q.dtype)
        do_blk = np.empty((nq, value_dim), q.dtype)
        gather(q, b, h, base, r, q0, nq, q_blk, scale)
        gather(dout, b, h, base, r, q0, nq, do_blk, one)
        lse_blk = np.empty(nq, q.dtype)
        dsum_blk = np.empty(nq, q.dtype)
        gather_row_statistics(lse, dsum, b, h, base, r, q0, nq, lse_blk, dsum_blk)
        dq_blk = np.zeros((nq, dim), q.dtype)
        k_blk = np.empty((BLOCK_K, dim), q.dtype)
        v_blk = np.empty((BLOCK_K, value_dim), q.dtype)
        p_buffer = np.empty(nq * BLOCK_K, q.dtype)
        exponent_buffer = np.empty(nq * BLOCK_K, itype)
        k_end = min(size, q0 + nq) if causal else size
        for k0 in range(0, k_end, BLOCK_K):
            nk = min(BLOCK_K, k_end - k0)
            gather(k, b, h, base, r, k0, nk, k_blk, one)
            gather(v, b, h, base, r, k0, nk, v_blk, one)
            p = p_buffer[: nq * nk].reshape((nq, nk))
            probabilities(q_blk, k_blk[:nk], lse_blk, q0, k0, causal, p, exponent_buffer[: nq * nk].reshape((nq, nk)))
            ds = score_gradient(p, do_blk, v_blk[:nk], dsum_blk, q0, k0, causal)
            attended_dot_add(dq_blk, ds, k_blk[:nk], False, q0, k0, causal)
        for i in range(nq):
            row = base + (q0 + i) * r
            for c in range(dim):
                dq[b, row, h, c] += scale * dq_blk[i, c]


def segments_per_branch(batch, n, heads, segment_length):
    """Work items of :func:`backward_segments_branch`: one per (batch, head, segment)."""
    return batch * heads * -(-n // segment_length)


def _contiguous(*arrays):
    return tuple(np.ascontiguousarray(x) for x in arrays)


def _int_like(dtype):
    """A 0-size int array of the float's width: the kernels take its dtype for the exp scratch."""
    return np.empty(0, np.int32 if dtype == np.float32 else np.int64)


def forward(q, k, v, branches, causal, scale, offsets):
    """Dilated attention forward (SPEC §3-4); inputs validated by ``longnet_ref.attention``."""
    q, k, v = _contiguous(q, k, v)
    batch, n, heads, _ = q.shape
    out = np.zeros((batch, n, heads, v.shape[3]), q.dtype)  # (B, N, H, Dv)
    lse = np.full((batch, n, heads), -np.inf, q.dtype)  # (B, N, H)
    if out.size == 0 and lse.size == 0:
        return out, lse
    with threadpool_limits(1, user_api="blas"):  # the parallel loop owns the cores
        for branch in branches:
            o = head_offsets(heads, branch.dilation, offsets).astype(np.int64)
            forward_branch(
                q, k, v, branch.segment_length, branch.dilation, o, causal, q.dtype.type(scale), _int_like(q.dtype),
                QUERY_BLOCK[causal], out, lse,
            )
    return out, lse


def backward(dout, q, k, v, out, lse, branches, causal, scale, offsets):
    """Exact gradient (SPEC §5); inputs validated by ``longnet_ref.attention``."""
    dout, q, k, v, out, lse = _contiguous(dout, q, k, v, out, lse)
    dsum = (dout * out).sum(axis=-1)  # (B, N, H)  Dsum = rowsum(dO * O)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    if q.shape[1] == 0:
        return dq, dk, dv
    with threadpool_limits(1, user_api="blas"):
        for branch in branches:
            o = head_offsets(q.shape[2], branch.dilation, offsets).astype(np.int64)
            args = (
                q, k, v, dout, lse, dsum, branch.segment_length, branch.dilation, o, causal, q.dtype.type(scale),
                _int_like(q.dtype), QUERY_BLOCK[causal],
            )
            if segments_per_branch(q.shape[0], q.shape[1], q.shape[2], branch.segment_length) >= MIN_SEGMENT_ITEMS:
                backward_segments_branch(*args, dq, dk, dv)
            else:  # too few segments to keep every core busy: split segments into blocks
                backward_keys_branch(*args, dk, dv)
                backward_queries_branch(*args, dq)
    return dq, dk, dv


def warm_up(dtype) -> float:
    """Compile (first run) or load from the cache every kernel for ``dtype``; returns the seconds.

    Tiny inputs, but both backward paths: one branch with a single segment (two passes) and one
    with ``MIN_SEGMENT_ITEMS`` segments (one item per segment).
    """
    start = time.perf_counter()
    x = np.zeros((1, 2 * MIN_SEGMENT_ITEMS, 1, 4), dtype)  # (B, N, H, D)
    for branch in (Branch(2 * MIN_SEGMENT_ITEMS, 1), Branch(2, 1)):
        out, lse = forward(x, x, x, (branch,), False, 1.0, "paper")
        backward(out, x, x, x, out, lse, (branch,), False, 1.0, "paper")
    return time.perf_counter() - start
