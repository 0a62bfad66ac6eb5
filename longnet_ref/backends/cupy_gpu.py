"""``backend="cupy-fused"``: dilated attention on an NVIDIA GPU by fused Numba-CUDA kernels (SPEC §6).

Inputs and outputs are CuPy arrays; nothing is copied to the host. The work is done by the
kernels of ``cuda_kernels.py`` (one launch per branch and pass, specialised per dtype and head
dimensions), launched on the CuPy arrays' device memory. float16 inputs are accumulated in
float32; ``lse`` is float32 for them. ``backend="cupy"`` is the other GPU path: the reference
itself on CuPy arrays (cuBLAS). Install with ``pip install "longnet-ref[gpu]"`` (from a clone:
``pip install ".[gpu]"``); see ``docs/gpu.md`` for which path to choose.
"""

from __future__ import annotations

from . import install_hint

try:
    import cupy
except ImportError as error:  # pragma: no cover - depends on the machine
    raise ImportError(f"backend='cupy-fused' needs CuPy and an NVIDIA GPU: {install_hint('gpu')}") from error

from . import cuda_kernels


def _contiguous(*arrays):
    return tuple(cupy.ascontiguousarray(x) for x in arrays)


def forward(q, k, v, branches, causal, scale, offsets):
    """Dilated attention forward on the GPU; inputs validated by ``longnet_ref.attention``."""
    return cuda_kernels.forward(cupy, *_contiguous(q, k, v), branches, causal, scale, offsets)


def backward(dout, q, k, v, out, lse, branches, causal, scale, offsets):
    """Exact gradient on the GPU (SPEC §5)."""
    return cuda_kernels.backward(cupy, *_contiguous(dout, q, k, v, out, lse), branches, causal, scale, offsets)
