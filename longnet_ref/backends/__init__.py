"""The one dispatch point: ``backend=`` name -> the module that computes dilated attention.

Every backend module provides

    forward(q, k, v, branches, causal, scale, offsets) -> (out, lse)
    backward(dout, q, k, v, out, lse, branches, causal, scale, offsets) -> (dq, dk, dv)

on inputs already validated by ``longnet_ref.attention``. The reference
(``longnet_ref.reference``) defines the semantics; every other backend is tested against it.

| backend | arrays | module |
| --- | --- | --- |
| ``"reference"`` (alias ``"numpy"``) | NumPy, CuPy or any array API library | ``longnet_ref.reference`` |
| ``"numba"`` | NumPy | ``longnet_ref.backends.numba_cpu`` |
| ``"cupy"`` | CuPy | ``longnet_ref.reference`` on CuPy (cuBLAS GEMMs per sparse segment) |
| ``"cupy-fused"`` | CuPy | ``longnet_ref.backends.cupy_gpu`` (fused Numba-CUDA kernels) |
| ``"cupy-tensor-core"`` | CuPy, float16/bfloat16 | ``longnet_ref.backends.tensor_core`` (CUDA C++ wmma kernels; not yet run on a GPU) |
"""

from __future__ import annotations

import importlib

import numpy as np

BACKENDS = {
    "reference": "longnet_ref.reference",
    "numpy": "longnet_ref.reference",
    "numba": "longnet_ref.backends.numba_cpu",
    "cupy": "longnet_ref.reference",
    "cupy-fused": "longnet_ref.backends.cupy_gpu",
    "cupy-tensor-core": "longnet_ref.backends.tensor_core",
}
GPU_BACKENDS = ("cupy", "cupy-fused", "cupy-tensor-core")


def array_namespace(x):
    """The array library of ``x``: ``numpy``, ``cupy``, or the ``__array_namespace__()`` of an array API array."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    if hasattr(x, "__array_namespace__"):
        return x.__array_namespace__()
    raise TypeError(f"expected a NumPy, CuPy or array API array, got {type(x).__name__}")


def get_backend(name):
    """Import and return the backend module called ``name`` (SPEC §6).

    The GPU backends need CuPy: without it they fail here, naming the extra to install, before
    any work (``"cupy"`` runs the reference, which itself would import without CuPy).
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}")
    if name in GPU_BACKENDS:
        try:
            import cupy  # noqa: F401
        except ImportError as error:
            raise ImportError(
                f"backend={name!r} needs CuPy and an NVIDIA GPU: pip install 'longnet-ref[gpu]' (see docs/gpu.md)"
            ) from error
    return importlib.import_module(BACKENDS[name])
