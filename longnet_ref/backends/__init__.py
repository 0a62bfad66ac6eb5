"""The one dispatch point: ``backend=`` name -> the module that computes dilated attention.

Every backend module provides

    forward(q, k, v, branches, causal, scale, offsets) -> (out, lse)
    backward(dout, q, k, v, out, lse, branches, causal, scale, offsets) -> (dq, dk, dv)

on inputs already validated by ``longnet_ref.attention``. The NumPy reference
(``longnet_ref.reference``) defines the semantics; every other backend is tested against it.
"""

from __future__ import annotations

import importlib

import numpy as np

BACKENDS = {
    "numpy": "longnet_ref.reference",
    "numba": "longnet_ref.backends.numba_cpu",
    "cupy": "longnet_ref.backends.cupy_gpu",
}


def array_namespace(x):
    """``numpy`` for NumPy arrays, ``cupy`` for CuPy arrays (the same code serves both)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")


def get_backend(name):
    """Import and return the backend module called ``name`` (SPEC §6)."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return importlib.import_module(BACKENDS[name])
