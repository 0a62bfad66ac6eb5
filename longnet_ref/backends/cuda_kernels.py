"""The fused CUDA kernels of dilated attention, written with Numba-CUDA (SPEC §3-5).

Why Numba-CUDA rather than CUDA C in a CuPy ``RawKernel``: the same Python kernel runs on the
GPU (launched directly on CuPy arrays through ``__cuda_array_interface__``) *and* in Numba's
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on a machine without a GPU, so CI executes every
line of the kernel logic and compares it with the NumPy reference. Only speed and the real
hardware's behaviour need a GPU run.

Design (one launch per branch and pass, so the rows of one branch are owned by one thread):

- ``forward_branch`` (from :func:`forward_branch_kernel`): a thread block per ``(query block,
  segment, batch * head)``, a thread per query row of the sparse segment. Key/value tiles of
  ``tile`` rows are staged in shared memory; each thread keeps its query row, its
  online-softmax state (``m``, ``l``) and its accumulator in registers, scores ``CHUNK`` keys
  at a time, and at the end mixes its branch result into ``out``/``lse`` with a running LSE
  (paper Eq. 10).
- backward, with the global ``LSE`` and ``Dsum``: ``backward_keys_branch``
  (:func:`backward_keys_branch_kernel`, made twice: a thread per key row over query tiles, once
  for dV, once for dK) and ``backward_queries_branch`` (:func:`backward_queries_branch_kernel`,
  a thread per query row: dQ over key tiles). ``P = exp(scale q.k - LSE)``,
  ``dS = P (dO.v - Dsum)``. No atomics: deterministic.

**Specialisation.** Each kernel is made by a *factory*, a function that takes the
:class:`Constants` of one ``(dtype, D, Dv)`` (accumulation type, head dimensions, block and
tile sizes) and returns the kernel as a closure over them; :func:`specialised` compiles the four
once per ``(dtype, D, Dv, geometry)`` (cached). Numba reads a closure's variables as
compile-time constants, so every per-row loop has a fixed trip count: the compiler unrolls it
and keeps the row in registers, and shared tiles are sized exactly. The kernels share their
device helpers (:func:`device_helpers`): the block's rows, the row load, the cooperative tile
load and the four-partial-sum dot product. float16 inputs are read as float16 and accumulated
in float32; ``out`` and ``lse`` are written in the accumulation type. Launch geometry (threads per block, tile rows, the forward's
register cap) was measured on an H200 (``benchmarks/gpu_geometry.py``).

A thread skips the pairs its row does not attend, so a NaN reaches exactly the rows that attend
it (SPEC §7). Head dimensions up to ``MAX_DIM``. The row rules (segment sizes, positions, the
causal bound) are those of ``longnet_ref.index_sets``, wrapped as device functions, not re-derived.
Docs: ``docs/gpu.md``.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache
from typing import NamedTuple

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda <= 0.30 registers an overload for np.row_stack at import, which NumPy 2.5
    # removed (it was an alias of vstack since NumPy 1.x). Restore the alias so numba-cuda
    # imports; no numerical behaviour depends on it.
    np.row_stack = np.vstack  # noqa: NPY201 (the alias numba-cuda still calls)

from numba import config as numba_config
from numba import cuda, float32, float64

from .. import index_sets
from ..validation import InputTypeError

BLOCK = 128  # threads (query or key rows) per thread block
CHUNK = 16  # keys (queries, in the keys pass) scored together: independent FMAs per thread
MAX_DIM = 128  # largest D and Dv: rows live in registers
# Shared tiles aligned to 16 bytes let the compiler read 4 floats per instruction
# (ld.shared.v4), a quarter of the shared-memory loads; the simulator does not model alignment.
ALIGNMENT = None if numba_config.ENABLE_CUDASIM else 16


def _device(function):
    """``cuda.jit(device=True)``, inlined into its callers by NVVM (the simulator has no NVVM)."""
    if numba_config.ENABLE_CUDASIM:
        return cuda.jit(device=True)(function)
    return cuda.jit(device=True, forceinline=True)(function)


# The scalar index rules of SPEC §2-3, written once in ``index_sets.py``, as device functions.
segment_size = _device(index_sets.segment_size)
segment_position = _device(index_sets.segment_position)
causal_key_count = _device(index_sets.causal_key_count)


class Constants(NamedTuple):
    """The compile-time constants of one specialisation of the kernels.

    The kernel factories below close over them; Numba reads a closure's variables as constants,
    so every per-row loop has a fixed trip count (the compiler unrolls it and keeps the row in
    registers) and the shared tiles are sized exactly.
    """

    real: object  # accumulation type: numba float32 (float16, float32 inputs) or float64
    dim: int  # D
    value_dim: int  # Dv
    block: int  # threads per thread block
    tile: int  # key (query) rows per shared-memory tile


@cache
def device_helpers(real, block):
    """The device functions every kernel shares, for accumulation type ``real``:

    - ``block_rows(x, w, r, offsets)``: the rows this thread block owns, ``(b, h, o, s, size,
      first)``: thread block ``(blockIdx.x, s, b*H + h)`` owns rows ``first = blockIdx.x * block``
      on of sparse segment ``s`` (``size`` rows, SPEC §2) of head ``h`` (offset ``o = offsets[h]``)
      in batch ``b``; ``x (B, N, H, .)`` gives ``N`` and ``H``;
    - ``load_row(x_row, x, b, row, h, width, factor)``: this thread's
      ``x_row[c] = factor * x[b, row, h, c]`` for ``c < width``, one row into registers;
    - ``load_tile(tile, x, b, h, w, r, o, s, first, rows, width, factor)``: the thread block
      together stages ``tile[j, c] = factor * x[b, P(s, first + j), h, c]`` for ``j < rows``,
      ``c < width`` (rows of one sparse segment, SPEC §2), thread ``i`` taking elements
      ``i, i + block, ...``: consecutive threads read consecutive elements of a row;
    - ``dot(x, y, length)``: ``x . y`` in four partial sums, four independent FMA chains
      instead of one (the latency of each FMA hides behind the other three).
    """

    @_device
    def block_rows(x, w, r, offsets):
        n, heads = x.shape[1], x.shape[2]
        s, bh = cuda.blockIdx.y, cuda.blockIdx.z
        b, h = bh // heads, bh % heads
        o = offsets[h]
        return b, h, o, s, segment_size(n, w, r, o, s), cuda.blockIdx.x * block

    @_device
    def load_row(x_row, x, b, row, h, width, factor):
        for c in range(width):
            x_row[c] = real(x[b, row, h, c]) * factor

    @_device
    def load_tile(tile, x, b, h, w, r, o, s, first, rows, width, factor):
        for index in range(cuda.threadIdx.x, rows * width, block):
            j, c = index // width, index % width
            tile[j, c] = real(x[b, segment_position(w, r, o, s, first + j), h, c]) * factor

    @_device
    def dot(x, y, length):
        s0 = s1 = s2 = s3 = real(0.0)  # real: a Python float would promote the sum to float64
        full = length - length % 4
        for c in range(0, full, 4):  # element c goes to partial sum c mod 4
            s0 += x[c] * y[c]
            s1 += x[c + 1] * y[c + 1]
            s2 += x[c + 2] * y[c + 2]
            s3 += x[c + 3] * y[c + 3]
        if full < length:
            s0 += x[full] * y[full]
        if full + 1 < length:
            s1 += x[full + 1] * y[full + 1]
        if full + 2 < length:
            s2 += x[full + 2] * y[full + 2]
        return (s0 + s1) + (s2 + s3)

    return block_rows, load_row, load_tile, dot


def forward_branch_kernel(constants: Constants):
    """The forward kernel for ``constants`` (a Python function for ``cuda.jit``)."""
    real, dim, value_dim, block, tile = constants
    dim_alloc, value_alloc = max(dim, 1), max(value_dim, 1)  # array sizes (Dv = 0 is allowed)
    block_rows, load_row, load_tile, dot = device_helpers(real, block)

    def forward_branch(q, k, v, w, r, offsets, causal, scale, out, lse):
        """One branch of the forward (paper Eqs. 6, 9-10), mixed into ``out``/``lse`` in place.

        Thread ``t`` of block ``(x, s, b*H + h)`` owns row ``t = x*block + threadIdx`` of sparse
        segment ``s`` of head ``h`` (offset ``offsets[h]``). Over key tiles it keeps
        ``m = max_k S``, ``l = sum_k exp(S - m)``, ``acc = sum_k exp(S - m) v_k`` (online softmax),
        then ``lse_i = m + log l``, ``o_i = acc / l`` and mixes them into ``out, lse`` by Eq. 10:
        ``LSE' = logaddexp(LSE, lse_i)``, ``out' = out e^{LSE - LSE'} + o_i e^{lse_i - LSE'}``.

        ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)`` of the input dtype; ``out (B, N, H, Dv)`` and
        ``lse (B, N, H)`` of ``real``, ``lse = -inf`` where no branch covered the row yet.
        """
        b, h, o, s, size, q0 = block_rows(q, w, r, offsets)
        if q0 >= size:
            return  # the whole block is past this (short) segment: uniform, no barrier skipped
        k_tile = cuda.shared.array((tile, dim_alloc), real, alignment=ALIGNMENT)
        v_tile = cuda.shared.array((tile, value_alloc), real, alignment=ALIGNMENT)
        q_row = cuda.local.array(dim_alloc, real)
        acc = cuda.local.array(value_alloc, real)
        scores = cuda.local.array(CHUNK, real)
        t = q0 + cuda.threadIdx.x  # this thread's row of the sparse segment
        if t < size:
            row = segment_position(w, r, o, s, t)
            load_row(q_row, q, b, row, h, dim, scale)  # the scale folded into q once
        for c in range(value_dim):
            acc[c] = 0.0
        m = real(-math.inf)  # real throughout: a Python float would promote the row to float64
        l = real(0.0)
        one = real(1.0)
        # Causal: the block's last row sees keys up to itself; later key tiles are skipped by all.
        k_end = min(size, causal_key_count(q0 + block - 1)) if causal else size
        for k0 in range(0, k_end, tile):  # every thread of the block runs the same tiles
            nk = min(tile, k_end - k0)
            cuda.syncthreads()
            load_tile(k_tile, k, b, h, w, r, o, s, k0, nk, dim, one)
            load_tile(v_tile, v, b, h, w, r, o, s, k0, nk, value_dim, one)
            cuda.syncthreads()
            if t < size:
                last = min(nk, causal_key_count(t) - k0) if causal else nk  # keys k0 + j of row t
                for j0 in range(0, last, CHUNK):
                    for j in range(CHUNK):  # the dot unrolls (dim is a constant): q_row stays in registers
                        scores[j] = dot(q_row, k_tile[min(j0 + j, tile - 1)], dim)  # past `last`: never used
                    m_new = m
                    for j in range(CHUNK):
                        if j0 + j < last and (scores[j] > m_new or scores[j] != scores[j]):  # a NaN sticks
                            m_new = scores[j]
                    if m_new != m:  # rescale only when the max moved (NaN != anything)
                        shift = real(0.0) if m_new == -math.inf else m_new
                        correction = math.exp(m - shift) if m != -math.inf else real(0.0)
                        l *= correction
                        for c in range(value_dim):
                            acc[c] *= correction
                        m = m_new
                    shift = real(0.0) if m == -math.inf else m
                    for j in range(CHUNK):
                        if j0 + j < last:  # a key past the tile's end is never read into acc
                            p = math.exp(scores[j] - shift)
                            l += p
                            for c in range(value_dim):
                                acc[c] += p * v_tile[j0 + j, c]
        if t < size and l != 0.0:  # l = 0: every score -inf, no key (SPEC §3)
            row = segment_position(w, r, o, s, t)
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

    return forward_branch


def backward_keys_branch_kernel(constants: Constants, key_gradient: str):
    """The keys-pass kernel for ``constants``, accumulating ``key_gradient``: ``"dk"`` or ``"dv"``."""
    real, dim, value_dim, block, tile = constants
    dim_alloc, value_alloc = max(dim, 1), max(value_dim, 1)
    grad_dim = dim if key_gradient == "dk" else value_dim  # the row this kernel accumulates
    grad_alloc = max(grad_dim, 1)
    with_dk = key_gradient == "dk"
    block_rows, load_row, load_tile, dot = device_helpers(real, block)

    def backward_keys_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, grad):
        """dV (``key_gradient == "dv"``) or dK (``"dk"``) of one branch (SPEC §5), added into ``grad``.

        Thread ``t`` owns key row ``t`` of a sparse segment and loops over the query tiles that
        attend it (causal: queries ``>= t``), ``CHUNK`` queries at a time: first their weights

            P = exp(scale q.k - LSE)         (dV: the weight is P)
            dS = P (dO.v - Dsum)             (dK: the weight is dS)

        then ``dV += P dO`` or ``dK += dS scale q``. dV and dK are two compilations of this one
        kernel (two launches): together they would keep four rows per thread (k, v, dK, dV: 256
        values for D = Dv = 64), more than a thread's 255 registers; apart, at most three.
        A query row without weight (``LSE = -inf``: every score ``-inf``) adds nothing (SPEC §5):
        it is skipped, so its (perhaps infinite) ``q`` and ``dO`` are never multiplied by ``P = 0``.
        """
        b, h, o, s, size, k0 = block_rows(q, w, r, offsets)
        if k0 >= size:
            return
        k_row = cuda.local.array(dim_alloc, real)
        v_row = cuda.local.array(value_alloc, real)
        grad_row = cuda.local.array(grad_alloc, real)
        weights = cuda.local.array(CHUNK, real)
        q_tile = cuda.shared.array((tile, dim_alloc), real, alignment=ALIGNMENT)
        do_tile = cuda.shared.array((tile, value_alloc), real, alignment=ALIGNMENT)
        # One shared array a line: the simulator tells them apart by their line (two on one line alias).
        lse_tile = cuda.shared.array(tile, real)
        dsum_tile = cuda.shared.array(tile, real)
        one = real(1.0)
        t = k0 + cuda.threadIdx.x  # this thread's key row
        if t < size:
            row = segment_position(w, r, o, s, t)
            load_row(k_row, k, b, row, h, dim, one)
            if with_dk:
                load_row(v_row, v, b, row, h, value_dim, one)
        for c in range(grad_dim):
            grad_row[c] = 0.0
        first = k0 if causal else 0  # earlier queries never see this block's keys
        for q0 in range(first, size, tile):
            nq = min(tile, size - q0)
            cuda.syncthreads()
            load_tile(q_tile, q, b, h, w, r, o, s, q0, nq, dim, scale)
            load_tile(do_tile, dout, b, h, w, r, o, s, q0, nq, value_dim, one)
            for i in range(cuda.threadIdx.x, nq, block):
                row = segment_position(w, r, o, s, q0 + i)
                lse_tile[i] = lse[b, row, h] if lse[b, row, h] != -math.inf else math.inf  # no weight: skipped
                dsum_tile[i] = dsum[b, row, h]
            cuda.syncthreads()
            if t < size:
                # causal: query q0 + i attends key t iff t < causal_key_count(q0 + i), i.e. i >= t - q0
                start = max(0, t - q0) if causal else 0
                for i0 in range(start, nq, CHUNK):
                    for i in range(CHUNK):  # the dots unroll (constant D, Dv): the rows stay in registers
                        query = i0 + i
                        if query < nq:  # rows past the tile hold stale data: never read
                            p = math.exp(dot(q_tile[query], k_row, dim) - lse_tile[query])
                            if with_dk:
                                weights[i] = p * (dot(do_tile[query], v_row, value_dim) - dsum_tile[query])
                            else:
                                weights[i] = p
                    for i in range(CHUNK):  # a second pass over the chunk's rows: none kept live
                        if i0 + i < nq and lse_tile[i0 + i] != math.inf:  # a row without weight adds nothing
                            if with_dk:
                                for c in range(dim):
                                    grad_row[c] += weights[i] * q_tile[i0 + i, c]  # q_tile carries the scale
                            else:
                                for c in range(value_dim):
                                    grad_row[c] += weights[i] * do_tile[i0 + i, c]
        if t < size:
            row = segment_position(w, r, o, s, t)
            for c in range(grad_dim):
                grad[b, row, h, c] += grad_row[c]

    return backward_keys_branch


def backward_queries_branch_kernel(constants: Constants):
    """The queries-pass kernel (dQ) for ``constants``."""
    real, dim, value_dim, block, tile = constants
    dim_alloc, value_alloc = max(dim, 1), max(value_dim, 1)
    block_rows, load_row, load_tile, dot = device_helpers(real, block)

    def backward_queries_branch(q, k, v, dout, lse, dsum, w, r, offsets, causal, scale, dq):
        """dQ of one branch (SPEC §5), added into ``dq`` (``real``).

        Thread ``t`` owns query row ``t`` and loops over its key tiles, ``CHUNK`` keys at a time:
        first ``dS = P (dO.v - Dsum)`` with ``P = exp(scale q.k - LSE)``, then ``dQ += scale dS k``.
        A row without weight (``LSE = -inf``) has ``dQ = 0`` (SPEC §5): it attends no key here.
        """
        b, h, o, s, size, q0 = block_rows(q, w, r, offsets)
        if q0 >= size:
            return
        k_tile = cuda.shared.array((tile, dim_alloc), real, alignment=ALIGNMENT)
        v_tile = cuda.shared.array((tile, value_alloc), real, alignment=ALIGNMENT)
        q_row = cuda.local.array(dim_alloc, real)
        do_row = cuda.local.array(value_alloc, real)
        dq_row = cuda.local.array(dim_alloc, real)
        weights = cuda.local.array(CHUNK, real)
        lse_t = real(math.inf)
        dsum_t = real(0.0)
        weighted = False  # whether this thread's row has weight (a covered row whose LSE > -inf)
        one = real(1.0)
        t = q0 + cuda.threadIdx.x  # this thread's query row
        if t < size:
            row = segment_position(w, r, o, s, t)
            load_row(q_row, q, b, row, h, dim, scale)
            load_row(do_row, dout, b, row, h, value_dim, one)
            lse_t = lse[b, row, h]
            dsum_t = dsum[b, row, h]
            weighted = lse_t != -math.inf
        for c in range(dim):
            dq_row[c] = 0.0
        k_end = min(size, causal_key_count(q0 + block - 1)) if causal else size
        for k0 in range(0, k_end, tile):
            nk = min(tile, k_end - k0)
            cuda.syncthreads()
            load_tile(k_tile, k, b, h, w, r, o, s, k0, nk, dim, one)
            load_tile(v_tile, v, b, h, w, r, o, s, k0, nk, value_dim, one)
            cuda.syncthreads()
            if weighted:  # every thread still reaches both barriers above
                last = min(nk, causal_key_count(t) - k0) if causal else nk
                for j0 in range(0, last, CHUNK):
                    for j in range(CHUNK):  # the dots unroll (constant D, Dv): the rows stay in registers
                        key = j0 + j
                        if key < last:  # keys past `last` are not attended (or stale): never read
                            p = math.exp(dot(q_row, k_tile[key], dim) - lse_t)
                            weights[j] = p * (dot(do_row, v_tile[key], value_dim) - dsum_t)  # dS
                    for j in range(CHUNK):  # a second pass over the chunk's keys: none kept live
                        if j0 + j < last:
                            for c in range(dim):
                                dq_row[c] += weights[j] * k_tile[j0 + j, c]
        if t < size:
            row = segment_position(w, r, o, s, t)
            for c in range(dim):
                dq[b, row, h, c] += scale * dq_row[c]

    return backward_queries_branch


class Kernels(NamedTuple):
    """The four kernels of one ``(dtype, D, Dv)``: the factories' functions, or their compilations."""

    forward_branch: object
    backward_values_branch: object  # the keys-pass kernel accumulating dV
    backward_keys_branch: object  # the keys-pass kernel accumulating dK
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
    """Rows per tile: two ``(tile, max(D, Dv))`` tiles of the accumulation type within 48 KiB of static shared memory."""
    bits = 64 if accumulation_dtype(dtype) == np.float64 else 32
    widest = max(dim, value_dim, 1)
    return 64 if bits * widest <= 32 * 64 else 32 if bits * widest <= 32 * 128 else 16


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


def kernel_functions(dtype, dim: int, value_dim: int, geometry: Geometry = DEFAULT_GEOMETRY) -> Kernels:
    """The four kernels of one ``(dtype, D, Dv)`` as Python functions (not compiled), from the factories."""
    dtype = np.dtype(dtype)
    constants = Constants(
        real=float64 if accumulation_dtype(dtype) == np.float64 else float32,
        dim=dim,
        value_dim=value_dim,
        block=geometry.block or BLOCK,
        tile=geometry.tile or default_tile(dtype, dim, value_dim),
    )
    return Kernels(
        forward_branch_kernel(constants),
        backward_keys_branch_kernel(constants, "dv"),
        backward_keys_branch_kernel(constants, "dk"),
        backward_queries_branch_kernel(constants),
    )


@lru_cache(maxsize=None)
def specialised(dtype, dim: int, value_dim: int, geometry: Geometry = DEFAULT_GEOMETRY) -> Kernels:
    """The four kernels for one ``(dtype, D, Dv)``, compiled once per process (cached)."""
    dtype = np.dtype(dtype)
    capped = accumulation_dtype(dtype) == np.float32 and max(dim, value_dim) <= 64
    forward_cap = geometry.max_registers or (FORWARD_MAX_REGISTERS if capped else None)
    cap = geometry.max_registers
    functions = kernel_functions(dtype, dim, value_dim, geometry)
    return Kernels(
        _jit(functions.forward_branch, forward_cap),
        *(_jit(function, cap) for function in functions[1:]),
    )


def _grid(n, heads, batch, segment_length, dilation, block):
    segments = -(-n // segment_length)
    rows = -(-min(segment_length, n) // dilation)  # rows of the largest sparse segment
    return (max(1, -(-rows // block)), segments, batch * heads)


KERNEL_DTYPES = ("float16", "float32", "float64")


def check_dims(q, v):
    """The fused kernels' limits: head dims up to ``MAX_DIM``; float16, float32 or float64."""
    if q.shape[3] > MAX_DIM or v.shape[3] > MAX_DIM:
        raise ValueError(f"backend='cupy-fused' supports head dimensions up to {MAX_DIM}, got D = {q.shape[3]} and Dv = {v.shape[3]}")
    if str(q.dtype) not in KERNEL_DTYPES:
        raise InputTypeError(f"backend='cupy-fused' supports float16, float32 and float64, got {q.dtype}; backend='cupy' takes bfloat16 too")


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
