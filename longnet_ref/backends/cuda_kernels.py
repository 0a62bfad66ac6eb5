"""The fused CUDA kernels of dilated attention, written with Numba-CUDA (SPEC §3-5).

Why Numba-CUDA rather than CUDA C in a CuPy ``RawKernel``: the same Python kernel runs on the
GPU (launched directly on CuPy arrays through ``__cuda_array_interface__``) *and* in Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on a machine without a GPU, so CI executes every
line of the kernel logic and compares it with the NumPy reference. Only speed and the real
hardware's behaviour need a GPU run.

Design (one launch per branch and pass, so the rows of one branch are owned by one thread):

- [`forward_branch`][]: a thread block per ``(query block, segment, batch * head)``, a thread
  per query row of the sparse segment. Key/value tiles of ``TILE`` rows are staged in shared
  memory; each thread keeps its query row, its online-softmax state (``m``, ``l``) and its
  accumulator in registers, scores ``CHUNK`` keys at a time, and at the end mixes its branch
  result into ``out``/``lse`` with a running LSE (paper Eq. 10).
- backward, with the global ``LSE`` and ``Dsum``: [`backward_keys_branch`][], compiled twice
  (a thread per key row over query tiles: once for dV, once for dK) and
  [`backward_queries_branch`][] (a thread per query row: dQ over key tiles).
  ``P = exp(scale q.k - LSE)``, ``dS = P (dO.v - Dsum)``. No atomics: deterministic.

**Specialisation.** The kernel bodies below are module-level templates that read the head
dimensions ``DIM`` / ``VALUE_DIM`` and the accumulation type ``REAL`` as *global constants*.
[`specialised`][] compiles a copy of each template per ``(dtype, D, Dv)`` with those globals
bound (Numba freezes globals at compile time), so every
per-row loop has a compile-time trip count: the compiler unrolls it and keeps the row in
registers, and shared tiles are sized exactly. float16 inputs are read as float16 and
accumulated in float32 (``REAL``); ``out`` and ``lse`` are written in ``REAL``. Launch geometry
(threads per block, tile rows, the forward's register cap) was measured on an H200
(``benchmarks/gpu_geometry.py``).

A thread skips the pairs its row does not attend, so a NaN reaches exactly the rows that attend
it (SPEC §7). Head dimensions up to ``MAX_DIM``. The row rules (segment sizes, positions, the
causal bound) are those of ``longnet_ref.index_sets``, wrapped as device functions, not re-derived.
Docs: ``docs/gpu.md``.
"""

from __future__ import annotations

import math
import types
from functools import cache
from typing import NamedTuple

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda <= 0.30 registers an overload for np.row_stack at import, which NumPy 2.5
    # removed (it was an alias of vstack since NumPy 1.x). Restore the alias so numba-cuda
    # imports; no numerical behaviour depends on it.
    np.row_stack = np.vstack

from numba import config as numba_config
from numba import cuda, float32, float64

from .. import index_sets
from ..validation import InputTypeError

BLOCK = 128  # threads (query or key rows) per thread block
CHUNK = 16  # keys (queries, in the keys pass) scored together: independent FMAs per thread
MAX_DIM = 128  # largest D and Dv: rows live in registers

# The scalar index rules of SPEC §2-3, written once in ``index_sets.py``, as device functions.
segment_size = cuda.jit(device=True)(index_sets.segment_size)
segment_position = cuda.jit(device=True)(index_sets.segment_position)
causal_key_count = cuda.jit(device=True)(index_sets.causal_key_count)

# Placeholders for the constants that ``specialised`` binds per (dtype, D, Dv); the
# templates are never compiled with these values.
DIM = VALUE_DIM = 1  # D, Dv
DIM_ALLOC = VALUE_ALLOC = 1  # max(D, 1), max(Dv, 1): array sizes (Dv = 0 is allowed)
TILE = 64  # key (query) rows per shared-memory tile
REAL = float32  # accumulation type: float32 for float16/float32 inputs, float64 for float64
# Shared tiles aligned to 16 bytes let the compiler read 4 floats per instruction
# (ld.shared.v4), a quarter of the shared-memory loads; the simulator does not model alignment.
ALIGNMENT = None if numba_config.ENABLE_CUDASIM else 16
KEY_GRADIENT = "dk"  # which gradient backward_keys_branch accumulates: "dk" or "dv"
GRAD_DIM = GRAD_ALLOC = 1  # D for "dk", Dv for "dv" (and its array size)


def forward_branch(q, k, v, w, r, offsets, causal, scale, out, lse):
    """One branch of the forward (paper Eqs. 6, 9-10), mixed into ``out``/``lse`` in place.

    Thread ``t`` of block ``(x, s, b*H + h)`` owns row ``t = x*BLOCK + threadIdx`` of sparse
    segment ``s`` of head ``h`` (offset ``offsets[h]``). Over key tiles it keeps
    ``m = max_k S``, ``l = sum_k exp(S - m)``, ``acc = sum_k exp(S - m) v_k`` (online softmax),
    then ``lse_i = m + log l``, ``o_i = acc / l`` and mixes them into ``out, lse`` by Eq. 10:
    ``LSE' = logaddexp(LSE, lse_i)``, ``out' = out e^{LSE - LSE'} + o_i e^{lse_i - LSE'}``.

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)`` of the input dtype; ``out (B, N, H, Dv)`` and
    ``lse (B, N, H)`` of ``REAL``, ``lse = -inf`` where no branch covered the row yet.
    """
    n, heads = q.shape[1], q.shape[2]
    s, bh = cuda.blockIdx.y, cuda.blockIdx.z
    b, h = bh // heads, bh % heads
    o = offsets[h]
    size = segment_size(n, w, r, o, s)
    q0 = cuda.blockIdx.x * BLOCK
    if q0 >= size:
        return  # the whole block is past this (short) segment: uniform, no barrier skipped
    t = q0 + cuda.threadIdx.x  # this thread's row of the sparse segment
    k_tile = cuda.shared.array((TILE, DIM_ALLOC), REAL, alignment=ALIGNMENT)
    v_tile = cuda.shared.array((TILE, VALUE_ALLOC), REAL, alignment=ALIGNMENT)
    q_row = cuda.local.array(DIM_ALLOC, REAL)
    acc = cuda.local.array(VALUE_ALLOC, REAL)
    scores = cuda.local.array(CHUNK, REAL)
    partial = cuda.local.array(4, REAL)
    if t < size:
        row = segment_position(w, r, o, s, t)
        for c in range(DIM):
            q_row[c] = REAL(q[b, row, h, c]) * scale  # the scale folded into q once
    for c in range(VALUE_DIM):
        acc[c] = 0.0
    m = REAL(-math.inf)  # REAL throughout: a Python float would promote the row to float64
    l = REAL(0.0)
    # Causal: the block's last row sees keys up to itself; later key tiles are skipped by all.
    k_end = min(size, causal_key_count(q0 + BLOCK - 1)) if causal else size
    for k0 in range(0, k_end, TILE):  # every thread of the block runs the same tiles
        nk = min(TILE, k_end - k0)
        cuda.syncthreads()
        for index in range(cuda.threadIdx.x, nk * DIM, BLOCK):
            j, c = index // DIM, index % DIM
            k_tile[j, c] = REAL(k[b, segment_position(w, r, o, s, k0 + j), h, c])
        for index in range(cuda.threadIdx.x, nk * VALUE_DIM, BLOCK):
            j, c = index // VALUE_DIM, index % VALUE_DIM
            v_tile[j, c] = REAL(v[b, segment_position(w, r, o, s, k0 + j), h, c])
        cuda.syncthreads()
        if t < size:
            last = min(nk, causal_key_count(t) - k0) if causal else nk  # keys k0 + j of row t
            for j0 in range(0, last, CHUNK):
                for j in range(CHUNK):  # c unrolls (DIM is a constant): q_row stays in registers
                    key = min(j0 + j, TILE - 1)  # past `last`: computed, never used
                    for c in range(4):
                        partial[c] = 0.0
                    for c in range(DIM):  # four partial sums: four independent FMA chains, not one
                        partial[c % 4] += q_row[c] * k_tile[key, c]
                    score = (partial[0] + partial[1]) + (partial[2] + partial[3])
                    scores[j] = score
                m_new = m
                for j in range(CHUNK):
                    if j0 + j < last and (scores[j] > m_new or scores[j] != scores[j]):  # a NaN sticks
                        m_new = scores[j]
                if m_new != m:  # rescale only when the max moved (NaN != anything)
                    shift = REAL(0.0) if m_new == -math.inf else m_new
                    correction = math.exp(m - shift) if m != -math.inf else REAL(0.0)
                    l *= correction
                    for c in range(VALUE_DIM):
                        acc[c] *= correction
                    m = m_new
                shift = REAL(0.0) if m == -math.inf else m
                for j in range(CHUNK):
                    if j0 + j < last:  # a key past the tile's end is never read into acc
                        p = math.exp(scores[j] - shift)
                        l += p
                        for c in range(VALUE_DIM):
                            acc[c] += p * v_tile[j0 + j, c]
    if t < size and l != 0.0:  # l = 0: every score -inf, no key (SPEC §3)
        row = segment_position(w, r, o, s, t)
        lse_i = m + math.log(l)
        old = lse[b, row, h]
        if old == -math.inf:
            for c in range(VALUE_DIM):
                out[b, row, h, c] = acc[c] / l
            lse[b, row, h] = lse_i
        else:  # paper Eq. 10 with a running LSE
            new = max(old, lse_i) + math.log1p(math.exp(-abs(old - lse_i)))
            keep, add = math.exp(old - new), math.exp(lse_i - new) / l
            for c in range(VALUE_DIM):
                out[b, row, h, c] = out[b, row, h, c] * keep + acc[c] * add
            lse[b, row, h] = new


def backward_keys_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, grad):
    """dV (``KEY_GRADIENT == "dv"``) or dK (``"dk"``) of one branch (SPEC §5), added into ``grad``.

    Thread ``t`` owns key row ``t`` of a sparse segment and loops over the query tiles that
    attend it (causal: queries ``>= t``), ``CHUNK`` queries at a time: first their weights

        P = exp(scale q.k - LSE)         (dV: the weight is P)
        dS = P (dO.v - Dsum)             (dK: the weight is dS)

    then ``dV += P dO`` or ``dK += dS scale q``. dV and dK are two compilations of this one
    template (two launches): together they would keep four rows per thread (k, v, dK, dV: 256
    values for D = Dv = 64), more than a thread's 255 registers; apart, at most three.
    ``lse = -inf`` (row covered by no branch) is read as ``+inf``, so ``P = 0``, not NaN.
    """
    n, heads = q.shape[1], q.shape[2]
    s, bh = cuda.blockIdx.y, cuda.blockIdx.z
    b, h = bh // heads, bh % heads
    o = offsets[h]
    size = segment_size(n, w, r, o, s)
    k0 = cuda.blockIdx.x * BLOCK
    if k0 >= size:
        return
    t = k0 + cuda.threadIdx.x  # this thread's key row
    q_tile = cuda.shared.array((TILE, DIM_ALLOC), REAL, alignment=ALIGNMENT)
    do_tile = cuda.shared.array((TILE, VALUE_ALLOC), REAL, alignment=ALIGNMENT)
    lse_tile = cuda.shared.array(TILE, REAL)
    dsum_tile = cuda.shared.array(TILE, REAL)
    k_row = cuda.local.array(DIM_ALLOC, REAL)
    v_row = cuda.local.array(VALUE_ALLOC, REAL)
    grad_row = cuda.local.array(GRAD_ALLOC, REAL)
    weights = cuda.local.array(CHUNK, REAL)
    partial = cuda.local.array(4, REAL)
    if t < size:
        row = segment_position(w, r, o, s, t)
        for c in range(DIM):
            k_row[c] = REAL(k[b, row, h, c])
        if KEY_GRADIENT == "dk":
            for c in range(VALUE_DIM):
                v_row[c] = REAL(v[b, row, h, c])
    for c in range(GRAD_DIM):
        grad_row[c] = 0.0
    first = k0 if causal else 0  # earlier queries never see this block's keys
    for q0 in range(first, size, TILE):
        nq = min(TILE, size - q0)
        cuda.syncthreads()
        for index in range(cuda.threadIdx.x, nq * DIM, BLOCK):
            i, c = index // DIM, index % DIM
            q_tile[i, c] = REAL(q[b, segment_position(w, r, o, s, q0 + i), h, c]) * scale
        for index in range(cuda.threadIdx.x, nq * VALUE_DIM, BLOCK):
            i, c = index // VALUE_DIM, index % VALUE_DIM
            do_tile[i, c] = REAL(dout[b, segment_position(w, r, o, s, q0 + i), h, c])
        for i in range(cuda.threadIdx.x, nq, BLOCK):
            row = segment_position(w, r, o, s, q0 + i)
            lse_tile[i] = lse[b, row, h] if lse[b, row, h] != -math.inf else math.inf  # uncovered: P = 0
            dsum_tile[i] = dsum[b, row, h]
        cuda.syncthreads()
        if t < size:
            # causal: query q0 + i attends key t iff t < causal_key_count(q0 + i), i.e. i >= t - q0
            start = max(0, t - q0) if causal else 0
            for i0 in range(start, nq, CHUNK):
                for i in range(CHUNK):  # c loops unroll (constant D, Dv): the rows stay in registers
                    query = i0 + i
                    if query < nq:  # rows past the tile hold stale data: never read
                        for c in range(4):
                            partial[c] = 0.0
                        for c in range(DIM):  # four partial sums: four independent FMA chains, not one
                            partial[c % 4] += q_tile[query, c] * k_row[c]
                        score = (partial[0] + partial[1]) + (partial[2] + partial[3])
                        p = math.exp(score - lse_tile[query])
                        if KEY_GRADIENT == "dk":
                            for c in range(4):
                                partial[c] = 0.0
                            for c in range(VALUE_DIM):  # four partial sums: four independent FMA chains, not one
                                partial[c % 4] += do_tile[query, c] * v_row[c]
                            dp = (partial[0] + partial[1]) + (partial[2] + partial[3])
                            weights[i] = p * (dp - dsum_tile[query])
                        else:
                            weights[i] = p
                for i in range(CHUNK):  # a second pass over the chunk's rows: none kept live
                    if i0 + i < nq:
                        if KEY_GRADIENT == "dk":
                            for c in range(DIM):
                                grad_row[c] += weights[i] * q_tile[i0 + i, c]  # q_tile carries the scale
                        else:
                            for c in range(VALUE_DIM):
                                grad_row[c] += weights[i] * do_tile[i0 + i, c]
    if t < size:
        row = segment_position(w, r, o, s, t)
        for c in range(GRAD_DIM):
            grad[b, row, h, c] += grad_row[c]


def backward_queries_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, dq):
    """dQ of one branch (SPEC §5), added into ``dq`` (``REAL``).

    Thread ``t`` owns query row ``t`` and loops over its key tiles, ``CHUNK`` keys at a time:
    first ``dS = P (dO.v - Dsum)`` with ``P = exp(scale q.k - LSE)``, then ``dQ += scale dS k``.
    """
    n, heads = q.shape[1], q.shape[2]
    s, bh = cuda.blockIdx.y, cuda.blockIdx.z
    b, h = bh // heads, bh % heads
    o = offsets[h]
    size = segment_size(n, w, r, o, s)
    q0 = cuda.blockIdx.x * BLOCK
    if q0 >= size:
        return
    t = q0 + cuda.threadIdx.x  # this thread's query row
    k_tile = cuda.shared.array((TILE, DIM_ALLOC), REAL, alignment=ALIGNMENT)
    v_tile = cuda.shared.array((TILE, VALUE_ALLOC), REAL, alignment=ALIGNMENT)
    q_row = cuda.local.array(DIM_ALLOC, REAL)
    do_row = cuda.local.array(VALUE_ALLOC, REAL)
    dq_row = cuda.local.array(DIM_ALLOC, REAL)
    weights = cuda.local.array(CHUNK, REAL)
    partial = cuda.local.array(4, REAL)
    lse_t = REAL(math.inf)
    dsum_t = REAL(0.0)
    if t < size:
        row = segment_position(w, r, o, s, t)
        for c in range(DIM):
            q_row[c] = REAL(q[b, row, h, c]) * scale
        for c in range(VALUE_DIM):
            do_row[c] = REAL(dout[b, row, h, c])
        lse_t = lse[b, row, h] if lse[b, row, h] != -math.inf else math.inf
        dsum_t = dsum[b, row, h]
    for c in range(DIM):
        dq_row[c] = 0.0
    k_end = min(size, causal_key_count(q0 + BLOCK - 1)) if causal else size
    for k0 in range(0, k_end, TILE):
        nk = min(TILE, k_end - k0)
        cuda.syncthreads()
        for index in range(cuda.threadIdx.x, nk * DIM, BLOCK):
            j, c = index // DIM, index % DIM
            k_tile[j, c] = REAL(k[b, segment_position(w, r, o, s, k0 + j), h, c])
        for index in range(cuda.threadIdx.x, nk * VALUE_DIM, BLOCK):
            j, c = index // VALUE_DIM, index % VALUE_DIM
            v_tile[j, c] = REAL(v[b, segment_position(w, r, o, s, k0 + j), h, c])
        cuda.syncthreads()
        if t < size:
            last = min(nk, causal_key_count(t) - k0) if causal else nk
            for j0 in range(0, last, CHUNK):
                for j in range(CHUNK):  # c loops unroll (constant D, Dv): the rows stay in registers
                    key = j0 + j
                    if key < last:  # keys past `last` are not attended (or stale): never read
                        for c in range(4):
                            partial[c] = 0.0
                        for c in range(DIM):  # four partial sums: four independent FMA chains, not one
                            partial[c % 4] += q_row[c] * k_tile[key, c]
                        score = (partial[0] + partial[1]) + (partial[2] + partial[3])
                        for c in range(4):
                            partial[c] = 0.0
                        for c in range(VALUE_DIM):  # four partial sums: four independent FMA chains, not one
                            partial[c % 4] += do_row[c] * v_tile[key, c]
                        dp = (partial[0] + partial[1]) + (partial[2] + partial[3])
                        weights[j] = math.exp(score - lse_t) * (dp - dsum_t)  # dS
                for j in range(CHUNK):  # a second pass over the chunk's keys: none kept live
                    if j0 + j < last:
                        for c in range(DIM):
                            dq_row[c] += weights[j] * k_tile[j0 + j, c]
    if t < size:
        row = segment_position(w, r, o, s, t)
        for c in range(DIM):
            dq[b, row, h, c] += scale * dq_row[c]


class Kernels(NamedTuple):
    """The four kernels compiled for one ``(dtype, D, Dv)``."""

    forward_branch: object
    backward_values_branch: object  # backward_keys_branch with KEY_GRADIENT = "dv"
    backward_keys_branch: object  # with KEY_GRADIENT = "dk"
    backward_queries_branch: object


def accumulation_dtype(dtype) -> np.dtype:
    """float64 for float64 inputs, float32 otherwise (float16 inputs accumulate in float32)."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


class Geometry(NamedTuple):
    """Threads per block, rows per shared tile and a register cap. ``None``: the defaults.

    Tests in the CUDA simulator pass small values (e.g. ``Geometry(8, 4)``) so that tiny
    problems already span several thread blocks and tiles; ``benchmarks/gpu_geometry.py``
    times alternatives on a GPU. ``max_registers`` caps registers per thread (more resident
    threads, perhaps spills).
    """

    block: int | None = None
    tile: int | None = None
    max_registers: int | None = None


DEFAULT_GEOMETRY = Geometry()


def default_tile(dtype, dim: int, value_dim: int) -> int:
    """Rows per tile: two ``(TILE, max(D, Dv))`` tiles of ``REAL`` within 48 KiB of static shared memory."""
    bits = 64 if accumulation_dtype(dtype) == np.float64 else 32
    widest = max(dim, value_dim, 1)
    return 64 if bits * widest <= 32 * 64 else 32 if bits * widest <= 32 * 128 else 16


def bind_constants(template, dtype, dim: int, value_dim: int, geometry: Geometry = DEFAULT_GEOMETRY, key_gradient="dk"):
    """A copy of the Python function ``template`` whose globals hold the constants of ``(dtype, D, Dv)``.

    ``DIM``, ``VALUE_DIM`` (and their array sizes), ``REAL``, ``BLOCK`` and ``TILE`` replace the
    placeholders; Numba reads globals as compile-time constants, so the per-row loops of the
    compiled kernel have fixed trip counts.
    """
    real = float64 if accumulation_dtype(dtype) == np.float64 else float32
    constants = {"DIM": dim, "VALUE_DIM": value_dim, "DIM_ALLOC": max(dim, 1), "VALUE_ALLOC": max(value_dim, 1)}
    grad_dim = dim if key_gradient == "dk" else value_dim  # the row backward_keys_branch accumulates
    constants.update(
        REAL=real,
        BLOCK=geometry.block or BLOCK,
        TILE=geometry.tile or default_tile(dtype, dim, value_dim),
        KEY_GRADIENT=key_gradient,
        GRAD_DIM=grad_dim,
        GRAD_ALLOC=max(grad_dim, 1),
    )
    function = types.FunctionType(template.__code__, dict(template.__globals__, **constants), template.__name__)
    function.__doc__ = template.__doc__
    return function


# Measured on an H200 (benchmarks/gpu_geometry.py, N = 64K, float32, D = Dv = 64): capping the
# forward at 168 registers lets 3 blocks of 128 threads share an SM instead of 2 (4 bytes spill)
# and makes it 7-8% faster; the backward kernels only get slower under a cap (they spill). Applied
# where it was measured: float32 accumulation and head dims up to 64.
FORWARD_MAX_REGISTERS = 168


def _jit(function, max_registers=None):
    """``cuda.jit`` with a register cap (the simulator has no registers: none there)."""
    if max_registers is None or numba_config.ENABLE_CUDASIM:
        return cuda.jit(function)
    return cuda.jit(function, max_registers=max_registers)


@cache
def specialised(dtype, dim: int, value_dim: int, geometry: Geometry = DEFAULT_GEOMETRY) -> Kernels:
    """The four kernels for one ``(dtype, D, Dv)``, compiled once per process (cached)."""
    dtype = np.dtype(dtype)
    capped = accumulation_dtype(dtype) == np.float32 and max(dim, value_dim) <= 64
    forward_cap = geometry.max_registers or (FORWARD_MAX_REGISTERS if capped else None)
    cap = geometry.max_registers
    return Kernels(
        _jit(bind_constants(forward_branch, dtype, dim, value_dim, geometry), forward_cap),
        _jit(bind_constants(backward_keys_branch, dtype, dim, value_dim, geometry, key_gradient="dv"), cap),
        _jit(bind_constants(backward_keys_branch, dtype, dim, value_dim, geometry, key_gradient="dk"), cap),
        _jit(bind_constants(backward_queries_branch, dtype, dim, value_dim, geometry), cap),
    )


def _grid(n, heads, batch, segment_length, dilation, block):
    segments = -(-n // segment_length)
    rows = -(-min(segment_length, n) // dilation)  # rows of the largest sparse segment
    return (max(1, -(-rows // block)), segments, batch * heads)


KERNEL_DTYPES = ("float16", "float32", "float64")


def check_dims(q, v):
    """The fused kernels' limits: head dims up to ``MAX_DIM``; float16, float32 or float64."""
    if q.shape[3] > MAX_DIM or v.shape[3] > MAX_DIM:
        raise ValueError(
            f"backend='cupy-fused' supports head dimensions up to {MAX_DIM}, got D = {q.shape[3]} and Dv = {v.shape[3]}"
        )
    if str(q.dtype) not in KERNEL_DTYPES:
        raise InputTypeError(
            f"backend='cupy-fused' supports float16, float32 and float64, got {q.dtype}; backend='cupy' takes bfloat16 too"
        )


def _offsets(xp, heads, branch, rule):
    return xp.asarray(index_sets.head_offsets(heads, branch.dilation, rule).astype(np.int64))  # (H,)


def forward(xp, q, k, v, branches, causal, scale, offsets, geometry: Geometry = DEFAULT_GEOMETRY):
    """Launch the forward per branch. ``xp``: ``cupy`` on a GPU, ``numpy`` in the simulator.

    Returns ``out (B, N, H, Dv)`` in the input dtype and ``lse (B, N, H)`` in the accumulation
    dtype (float32 for float16 inputs). ``Dv = 0`` still gives the true ``lse`` (SPEC §1).
    """
    check_dims(q, v)
    batch, n, heads, dim = q.shape
    value_dim = v.shape[3]
    real = accumulation_dtype(q.dtype)
    out = xp.zeros((batch, n, heads, value_dim), real)  # (B, N, H, Dv), mixed across branches
    lse = xp.full((batch, n, heads), -np.inf, real)  # (B, N, H)
    if lse.size == 0:  # N = 0 (or B = 0 or H = 0): nothing to launch
        return out.astype(q.dtype), lse
    forward_branch = specialised(np.dtype(q.dtype), dim, value_dim, geometry).forward_branch
    block = geometry.block or BLOCK
    for branch in branches:
        grid = _grid(n, heads, batch, branch.segment_length, branch.dilation, block)
        o = _offsets(xp, heads, branch, offsets)
        forward_branch[grid, block](q, k, v, branch.segment_length, branch.dilation, o, causal, real.type(scale), out, lse)
    return out.astype(q.dtype, copy=False), lse


def backward(xp, dout, q, k, v, out, lse, branches, causal, scale, offsets, geometry: Geometry = DEFAULT_GEOMETRY):
    """Launch the two backward passes per branch (exact gradient, SPEC §5).

    Gradients accumulate over branches in the accumulation dtype and are returned in the input
    dtype. ``Dv = 0``: the output has no component, so every gradient is exactly 0.
    """
    check_dims(q, v)
    real = accumulation_dtype(q.dtype)
    dq, dk, dv = (xp.zeros(x.shape, real) for x in (q, k, v))
    if q.size == 0 or v.shape[3] == 0:
        return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
    dsum = (dout.astype(real) * out.astype(real)).sum(axis=-1)  # (B, N, H)  Dsum = rowsum(dO * O)
    lse = lse.astype(real, copy=False)
    kernels = specialised(np.dtype(q.dtype), q.shape[3], v.shape[3], geometry)
    block = geometry.block or BLOCK
    batch, n, heads, _ = q.shape
    for branch in branches:
        grid = _grid(n, heads, batch, branch.segment_length, branch.dilation, block)
        o = _offsets(xp, heads, branch, offsets)
        args = (q, k, v, dout, lse, dsum, branch.segment_length, branch.dilation, o, causal, real.type(scale))
        kernels.backward_values_branch[grid, block](*args, dv)
        kernels.backward_keys_branch[grid, block](*args, dk)
        kernels.backward_queries_branch[grid, block](*args, dq)
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
