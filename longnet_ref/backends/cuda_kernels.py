"""CUDA kernels of dilated attention, written with Numba-CUDA (SPEC §3-5).

Why Numba-CUDA rather than CUDA C in a CuPy ``RawKernel``: the same Python kernel runs on the
GPU (launched directly on CuPy arrays through ``__cuda_array_interface__``) *and* in Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on a machine without a GPU, so CI executes every
line of the kernel logic and compares it with the NumPy reference. Only speed and the real
hardware's behaviour need a GPU run.

Design (one launch per branch and pass, so rows of one branch are owned by one thread):

- forward: a thread block per ``(query block, segment, batch * head)``, a thread per query row
  of the sparse segment. Key/value tiles of ``TILE`` rows are staged in shared memory; each
  thread keeps its online-softmax state (``m``, ``l``, accumulator) and at the end mixes its
  branch result into ``out``/``lse`` with a running LSE (paper Eq. 10).
- backward, with the global ``LSE`` and ``Dsum``: a keys kernel (a thread per key row: dK, dV
  over query tiles) and a queries kernel (a thread per query row: dQ over key tiles).
  ``P = exp(scale q.k - LSE)``, ``dS = P (dO.v - Dsum)``. No atomics: deterministic.

A thread skips the pairs its row does not attend, so a NaN reaches exactly the rows that attend
it (SPEC §7). Head dimensions up to ``MAX_DIM`` (per-thread registers / local memory).
Docs: ``docs/gpu.md``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda <= 0.30 registers an overload for np.row_stack at import, which NumPy 2.5
    # removed (it was an alias of vstack since NumPy 1.x). Restore the alias so numba-cuda
    # imports; no numerical behaviour depends on it.
    np.row_stack = np.vstack

from numba import cuda, float32, float64  # noqa: E402

BLOCK = 64  # threads (query or key rows) per thread block
MAX_DIM = 128  # largest D and Dv: per-thread arrays have a fixed size


@cuda.jit(device=True, inline=True)
def segment_size(n, w, r, o, s):
    """Rows of segment ``s`` at offset ``o``: #{t : o + t r < w, s w + o + t r < N} (SPEC §2)."""
    extent = min(w, n - s * w) - o
    return 0 if extent <= 0 else (extent + r - 1) // r


@lru_cache(maxsize=None)
def kernels(dtype):
    """Compile the three kernels for ``float32`` or ``float64`` (shared arrays need a fixed type)."""
    real = float32 if np.dtype(dtype) == np.float32 else float64
    tile = 32 if real == float32 else 16  # 2 tiles of (TILE, MAX_DIM) fit in 48 KiB of shared memory

    @cuda.jit
    def forward_branch(q, k, v, w, r, offsets, causal, scale, out, lse):
        n, heads, dim, value_dim = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        s, bh = cuda.blockIdx.y, cuda.blockIdx.z
        b, h = bh // heads, bh % heads
        o = offsets[h]
        size = segment_size(n, w, r, o, s)
        q0 = cuda.blockIdx.x * BLOCK
        t = q0 + cuda.threadIdx.x  # this thread's row of the sparse segment
        base = s * w + o
        k_tile = cuda.shared.array((tile, MAX_DIM), real)
        v_tile = cuda.shared.array((tile, MAX_DIM), real)
        q_row = cuda.local.array(MAX_DIM, real)
        acc = cuda.local.array(MAX_DIM, real)
        scores = cuda.local.array(tile, real)
        if t < size:
            for c in range(dim):
                q_row[c] = q[b, base + t * r, h, c] * scale
        for c in range(value_dim):
            acc[c] = 0.0
        m = -math.inf
        l = 0.0
        k_end = min(size, q0 + BLOCK) if causal else size  # the block's last attended key
        for k0 in range(0, k_end, tile):  # every thread of the block runs the same tiles
            nk = min(tile, k_end - k0)
            cuda.syncthreads()
            for index in range(cuda.threadIdx.x, nk * max(dim, value_dim), BLOCK):
                j, c = index // max(dim, value_dim), index % max(dim, value_dim)
                row = base + (k0 + j) * r
                if c < dim:
                    k_tile[j, c] = k[b, row, h, c]
                if c < value_dim:
                    v_tile[j, c] = v[b, row, h, c]
            cuda.syncthreads()
            if t < size:
                last = min(nk, t - k0 + 1) if causal else nk  # keys k0 + j <= t
                tile_max = m
                for j in range(last):
                    score = 0.0
                    for c in range(dim):
                        score += q_row[c] * k_tile[j, c]
                    scores[j] = score
                    if score > tile_max or score != score:  # a NaN sticks
                        tile_max = score
                if last > 0:
                    shift = 0.0 if tile_max == -math.inf else tile_max
                    correction = math.exp(m - shift) if m != -math.inf else 0.0
                    l *= correction
                    for c in range(value_dim):
                        acc[c] *= correction
                    for j in range(last):
                        p = math.exp(scores[j] - shift)
                        l += p
                        for c in range(value_dim):
                            acc[c] += p * v_tile[j, c]
                    m = tile_max
        if t < size and l != 0.0:  # l = 0: every score -inf, no key (SPEC §3)
            row = base + t * r
            lse_i = m + math.log(l)
            old = lse[b, row, h]
            if old == -math.inf:
                for c in range(value_dim):
                    out[b, row, h, c] = acc[c] / l
                lse[b, row, h] = lse_i
            else:  # paper Eq. 10 with a running LSE
                new = max(old, lse_i) + math.log1p(math.exp(-abs(old - lse_i)))
                keep, add = math.exp(old - new), math.exp(lse_i - new) / l
                for c in range(value_dim):
                    out[b, row, h, c] = out[b, row, h, c] * keep + acc[c] * add
                lse[b, row, h] = new

    @cuda.jit
    def backward_keys_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, dk, dv):
        n, heads, dim, value_dim = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        s, bh = cuda.blockIdx.y, cuda.blockIdx.z
        b, h = bh // heads, bh % heads
        o = offsets[h]
        size = segment_size(n, w, r, o, s)
        k0 = cuda.blockIdx.x * BLOCK
        t = k0 + cuda.threadIdx.x  # this thread's key row
        base = s * w + o
        q_tile = cuda.shared.array((tile, MAX_DIM), real)
        do_tile = cuda.shared.array((tile, MAX_DIM), real)
        lse_tile = cuda.shared.array(tile, real)
        dsum_tile = cuda.shared.array(tile, real)
        k_row = cuda.local.array(MAX_DIM, real)
        v_row = cuda.local.array(MAX_DIM, real)
        dk_row = cuda.local.array(MAX_DIM, real)
        dv_row = cuda.local.array(MAX_DIM, real)
        if t < size:
            for c in range(dim):
                k_row[c] = k[b, base + t * r, h, c]
            for c in range(value_dim):
                v_row[c] = v[b, base + t * r, h, c]
        for c in range(MAX_DIM):
            dk_row[c] = 0.0
            dv_row[c] = 0.0
        first = k0 if causal else 0  # earlier queries never see this block's keys
        for q0 in range(first, size, tile):
            nq = min(tile, size - q0)
            cuda.syncthreads()
            for index in range(cuda.threadIdx.x, nq * max(dim, value_dim), BLOCK):
                i, c = index // max(dim, value_dim), index % max(dim, value_dim)
                row = base + (q0 + i) * r
                if c < dim:
                    q_tile[i, c] = q[b, row, h, c] * scale
                if c < value_dim:
                    do_tile[i, c] = dout[b, row, h, c]
                if c == 0:
                    lse_tile[i] = lse[b, row, h] if lse[b, row, h] != -math.inf else math.inf  # uncovered: P = 0
                    dsum_tile[i] = dsum[b, row, h]
            cuda.syncthreads()
            if t < size:
                for i in range(max(0, t - q0) if causal else 0, nq):  # queries q0 + i >= t
                    score = 0.0
                    for c in range(dim):
                        score += q_tile[i, c] * k_row[c]
                    p = math.exp(score - lse_tile[i])
                    dp = 0.0
                    for c in range(value_dim):
                        dv_row[c] += p * do_tile[i, c]
                        dp += do_tile[i, c] * v_row[c]
                    ds = p * (dp - dsum_tile[i])
                    for c in range(dim):
                        dk_row[c] += ds * q_tile[i, c]  # q_tile carries the scale
        if t < size:
            row = base + t * r
            for c in range(dim):
                dk[b, row, h, c] += dk_row[c]
            for c in range(value_dim):
                dv[b, row, h, c] += dv_row[c]

    @cuda.jit
    def backward_queries_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, dq):
        n, heads, dim, value_dim = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
        s, bh = cuda.blockIdx.y, cuda.blockIdx.z
        b, h = bh // heads, bh % heads
        o = offsets[h]
        size = segment_size(n, w, r, o, s)
        q0 = cuda.blockIdx.x * BLOCK
        t = q0 + cuda.threadIdx.x  # this thread's query row
        base = s * w + o
        k_tile = cuda.shared.array((tile, MAX_DIM), real)
        v_tile = cuda.shared.array((tile, MAX_DIM), real)
        q_row = cuda.local.array(MAX_DIM, real)
        do_row = cuda.local.array(MAX_DIM, real)
        dq_row = cuda.local.array(MAX_DIM, real)
        lse_t = math.inf
        dsum_t = 0.0
        if t < size:
            row = base + t * r
            for c in range(dim):
                q_row[c] = q[b, row, h, c] * scale
            for c in range(value_dim):
                do_row[c] = dout[b, row, h, c]
            lse_t = lse[b, row, h] if lse[b, row, h] != -math.inf else math.inf
            dsum_t = dsum[b, row, h]
        for c in range(MAX_DIM):
            dq_row[c] = 0.0
        k_end = min(size, q0 + BLOCK) if causal else size
        for k0 in range(0, k_end, tile):
            nk = min(tile, k_end - k0)
            cuda.syncthreads()
            for index in range(cuda.threadIdx.x, nk * max(dim, value_dim), BLOCK):
                j, c = index // max(dim, value_dim), index % max(dim, value_dim)
                row = base + (k0 + j) * r
                if c < dim:
                    k_tile[j, c] = k[b, row, h, c]
                if c < value_dim:
                    v_tile[j, c] = v[b, row, h, c]
            cuda.syncthreads()
            if t < size:
                for j in range(min(nk, t - k0 + 1) if causal else nk):  # keys k0 + j <= t
                    score = 0.0
                    for c in range(dim):
                        score += q_row[c] * k_tile[j, c]
                    p = math.exp(score - lse_t)
                    dp = 0.0
                    for c in range(value_dim):
                        dp += do_row[c] * v_tile[j, c]
                    ds = p * (dp - dsum_t)
                    for c in range(dim):
                        dq_row[c] += ds * k_tile[j, c]
        if t < size:
            row = base + t * r
            for c in range(dim):
                dq[b, row, h, c] += scale * dq_row[c]

    return forward_branch, backward_keys_branch, backward_queries_branch


def _grid(n, heads, batch, segment_length, dilation):
    segments = -(-n // segment_length)
    rows = -(-min(segment_length, n) // dilation)  # rows of the largest sparse segment
    return (max(1, -(-rows // BLOCK)), segments, batch * heads)


def check_dims(q, v):
    if q.shape[3] > MAX_DIM or v.shape[3] > MAX_DIM:
        raise ValueError(
            f"backend='cupy' supports head dimensions up to {MAX_DIM}, got D = {q.shape[3]} and Dv = {v.shape[3]}"
        )


def forward(xp, q, k, v, branches, causal, scale, offsets):
    """Launch the forward per branch. ``xp``: ``cupy`` on a GPU, ``numpy`` in the simulator."""
    from ..config import head_offsets

    check_dims(q, v)
    batch, n, heads, _ = q.shape
    out = xp.zeros((batch, n, heads, v.shape[3]), q.dtype)  # (B, N, H, Dv)
    lse = xp.full((batch, n, heads), -np.inf, q.dtype)  # (B, N, H)
    if out.size == 0 or lse.size == 0:
        return out, lse
    forward_branch = kernels(np.dtype(q.dtype))[0]
    for branch in branches:
        o = xp.asarray(head_offsets(heads, branch.dilation, offsets).astype(np.int64))
        grid = _grid(n, heads, batch, branch.segment_length, branch.dilation)
        forward_branch[grid, BLOCK](q, k, v, branch.segment_length, branch.dilation, o, causal, q.dtype.type(scale), out, lse)
    return out, lse


def backward(xp, dout, q, k, v, out, lse, branches, causal, scale, offsets):
    """Launch the two backward passes per branch (exact gradient, SPEC §5)."""
    from ..config import head_offsets

    check_dims(q, v)
    dq, dk, dv = xp.zeros_like(q), xp.zeros_like(k), xp.zeros_like(v)
    if q.size == 0 or v.size == 0:
        return dq, dk, dv
    dsum = (dout * out).sum(axis=-1)  # (B, N, H)  Dsum = rowsum(dO * O)
    _, keys_branch, queries_branch = kernels(np.dtype(q.dtype))
    batch, n, heads, _ = q.shape
    for branch in branches:
        o = xp.asarray(head_offsets(heads, branch.dilation, offsets).astype(np.int64))
        grid = _grid(n, heads, batch, branch.segment_length, branch.dilation)
        args = (q, k, v, dout, lse, dsum, branch.segment_length, branch.dilation, o, causal, q.dtype.type(scale))
        keys_branch[grid, BLOCK](*args, dk, dv)
        queries_branch[grid, BLOCK](*args, dq)
    return dq, dk, dv
