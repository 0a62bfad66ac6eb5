"""``backend="cupy-tensor-core"``: dilated attention on tensor cores, CUDA C++ kernels compiled by CuPy (SPEC §6).

NOT YET RUN ON A GPU: the kernels compile in CI (NVRTC, ``tests/test_tensor_core_compile.py``)
and their tile loop is emulated in NumPy against the reference; device correctness and speed are
what ``benchmarks/gpu_check.sh`` measures on the next machine with a GPU.

The kernels (``backends/cuda/dilated_attention.cu``, ``nvcuda::wmma``) take float16 or bfloat16
inputs with head dims ``D = Dv`` in ``HEAD_DIMS`` (64, 128), accumulate in float32, round the
softmax weights ``P`` (and in the backward ``dS``) to the input dtype before their tensor-core
products, as FlashAttention does. Per branch: one forward launch writes ``o_i, lse_i`` (float32);
the branches are mixed by the reference's ``mix_branches`` (SPEC §4). The backward takes the
mixed ``out`` and ``LSE`` (``Dsum = rowsum(dout * out)``, SPEC §5) and per branch launches the
dK/dV kernel (a block per key tile) and the dQ kernel (a block per query tile): deterministic,
no atomics. The tiling (grid, shared memory, template names) is ``tensor_core_tiles.py``.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np

try:
    import cupy
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError("backend='cupy-tensor-core' needs CuPy and an NVIDIA GPU: pip install 'longnet-ref[gpu]' (see docs/gpu.md)") from error

from .. import index_sets
from ..reference import mix_branches
from . import tensor_core_tiles as tiles


def check_inputs(q, v):
    """The kernels' head dims, checked before any work: ``D = Dv`` in ``HEAD_DIMS``.

    The dtypes (float16, bfloat16) are the registry's (``backends.BACKENDS``), checked by
    ``longnet_ref.validation`` before this backend is reached.
    """
    dim, value_dim = q.shape[3], v.shape[3]
    if dim != value_dim or dim not in tiles.HEAD_DIMS:
        raise ValueError(f"q, v: backend='cupy-tensor-core' needs head dims D = Dv in {tiles.HEAD_DIMS}, got D = {dim}, Dv = {value_dim}")


def _include_options():
    """``-I`` for the CUDA toolkit's headers (``mma.h`` and its ``crt/mma.h``), where CuPy knows the toolkit.

    CuPy passes its own include folders to NVRTC; naming the toolkit's again is harmless and
    keeps ``#include <mma.h>`` working where CuPy found the toolkit through ``CUDA_PATH`` only.
    """
    root = cupy.cuda.get_cuda_path()
    include = os.path.join(root, "include") if root else None
    return (f"-I{include}",) if include and os.path.isfile(os.path.join(include, "mma.h")) else ()


@cache
def _module():
    """Compile every instantiation once per process (NVRTC through ``cupy.RawModule``)."""
    return cupy.RawModule(
        code=tiles.SOURCE.read_text(),
        options=(*tiles.COMPILE_OPTIONS, *_include_options()),
        name_expressions=tiles.instantiations(),
    )


@cache
def _kernel(name: str, dtype: str, dim: int, itemsize: int):
    shared = tiles.shared_bytes(name, itemsize, dim, dim)
    limit = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
    if shared > limit:  # e.g. sm_86/sm_89 (99 KiB): the D = 128 backward does not fit
        raise ValueError(
            f"q: backend='cupy-tensor-core' needs {shared} bytes of shared memory per block for D = {dim}, this GPU allows {limit}; use backend='cupy-fused'"
        )
    kernel = _module().get_function(tiles.instantiation(name, dtype, dim, dim))
    kernel.max_dynamic_shared_size_bytes = shared  # beyond 48 KiB needs the opt-in attribute
    return kernel, shared


def _launch(name, branch, head_offsets, inputs, outputs, causal, scale):
    """One launch of kernel ``name`` for one branch: ``kernel(*inputs, n, H, w, r, offsets, tiles, causal, scale, *outputs)``."""
    q = inputs[0]
    batch, n, heads, dim = q.shape
    kernel, shared = _kernel(name, str(q.dtype), dim, q.dtype.itemsize)
    grid = tiles.grid(n, heads, batch, branch.segment_length, branch.dilation)
    if grid[1] > 65535:
        raise ValueError(f"q: backend='cupy-tensor-core' supports B * H <= 65535, got {grid[1]}")
    per_segment = tiles.tiles_per_segment(n, branch.segment_length, branch.dilation)
    scalars = (np.int32(n), np.int32(heads), np.int32(branch.segment_length), np.int32(branch.dilation))
    options = (head_offsets, np.int32(per_segment), np.int32(causal), np.float32(scale))
    kernel(grid, (tiles.THREADS,), (*inputs, *scalars, *options, *outputs), shared_mem=shared)


def _offsets(heads, branch, rule):
    return cupy.asarray(index_sets.head_offsets(heads, branch.dilation, rule).astype(np.int32))  # (H,)


def _aligned(*arrays):
    """C-contiguous and 16-byte aligned (the tile loads read 16 bytes at a time)."""
    out = []
    for x in arrays:
        x = cupy.ascontiguousarray(x)
        out.append(x if x.data.ptr % 16 == 0 else x.copy())
    return tuple(out)


def forward(q, k, v, branches, causal, scale, offsets):
    """Dilated attention forward on tensor cores; inputs validated by ``longnet_ref.attention``.

    Returns ``out (B, N, H, Dv)`` in the input dtype and the mixed ``lse (B, N, H)`` in float32.
    """
    check_inputs(q, v)
    q, k, v = _aligned(q, k, v)
    batch, n, heads, dim = q.shape
    branch_out = cupy.zeros((len(branches), batch, n, heads, dim), cupy.float32)  # (k, B, N, H, Dv)  o_i
    branch_lse = cupy.full((len(branches), batch, n, heads), -np.inf, cupy.float32)  # (k, B, N, H)  lse_i
    if q.size:
        for i, branch in enumerate(branches):
            outputs = (branch_out[i], branch_lse[i])
            _launch("forward_branch", branch, _offsets(heads, branch, offsets), (q, k, v), outputs, causal, scale)
    out, lse = mix_branches(branch_out, branch_lse)  # SPEC §4
    return out.astype(q.dtype), lse


def backward(dout, q, k, v, out, lse, branches, causal, scale, offsets):
    """Exact gradient on tensor cores (SPEC §5), in the input dtype.

    ``Dsum = rowsum(dout * out)`` with the mixed ``out``; ``P = exp(scale q.k - LSE)`` with the
    mixed ``LSE``: each branch's FlashAttention-2 backward then gives its exact share.
    """
    check_inputs(q, v)
    dout, q, k, v = _aligned(dout, q, k, v)
    dq, dk, dv = (cupy.zeros(x.shape, cupy.float32) for x in (q, k, v))
    if q.size:
        dsum = cupy.ascontiguousarray((dout.astype(cupy.float32) * out.astype(cupy.float32)).sum(axis=-1))  # (B, N, H)
        lse = cupy.ascontiguousarray(lse, dtype=cupy.float32)
        heads = q.shape[2]
        for branch in branches:
            o = _offsets(heads, branch, offsets)
            inputs = (q, k, v, dout, lse, dsum)
            _launch("backward_keys_branch", branch, o, inputs, (dk, dv), causal, scale)  # dK, dV per key tile
            _launch("backward_queries_branch", branch, o, inputs, (dq,), causal, scale)  # dQ per query tile
    return tuple(g.astype(q.dtype) for g in (dq, dk, dv))
