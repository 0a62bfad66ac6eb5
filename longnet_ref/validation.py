"""Rejecting bad input before any computation (SPEC §7).

Every public entry point calls these checks first, so no backend (and no jitted kernel) ever
sees an array of the wrong rank, dtype or shape. Messages name the offending argument.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .config import InputTypeError

SUPPORTED_DTYPES = ("float32", "float64")
HALF_DTYPES = ("float16", "bfloat16")  # on CuPy arrays only: the GPU paths compute them in float32
GPU_BACKENDS = ("cupy", "cupy-fused")


def array_module_name(x) -> str:
    """``"numpy"``, ``"cupy"`` or the top-level module of another array type (``"array_api_strict"``)."""
    if isinstance(x, np.ndarray):
        return "numpy"
    return type(x).__module__.split(".")[0]


def dtype_name(dtype) -> str:
    """``"float32"`` for NumPy's, CuPy's and array API libraries' float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def check_array(x, name: str, backend: str, ndim: int):
    kind = array_module_name(x)
    if backend == "reference":  # any array API array: NumPy, CuPy, array_api_strict, ...
        if kind != "numpy" and not hasattr(x, "__array_namespace__"):
            raise InputTypeError(f"{name} must be an array (NumPy, CuPy or array API) for backend='reference', got {type(x).__name__}")
    else:
        expected = "cupy" if backend in GPU_BACKENDS else "numpy"
        if kind != expected:
            raise InputTypeError(
                f"{name} must be a {expected} array for backend={backend!r}, got {type(x).__module__}.{type(x).__name__}"
            )
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    dtype = dtype_name(x.dtype)
    if dtype in HALF_DTYPES and kind != "cupy":
        raise InputTypeError(f"{name} must be float32 or float64, got dtype {dtype} (float16/bfloat16: CuPy arrays only)")
    if dtype not in SUPPORTED_DTYPES + HALF_DTYPES:
        raise InputTypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")


def lse_dtype_name(dtype) -> str:
    """The dtype of ``lse``: the input dtype, float32 for half inputs (accumulated in float32)."""
    return "float32" if dtype_name(dtype) in HALF_DTYPES else dtype_name(dtype)


def check_attention_inputs(q, k, v, backend: str = "numpy") -> tuple[int, int, int, int, int]:
    """Check ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)``, one float dtype; return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_array(x, name, backend, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise InputTypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q (B, N, H, D) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have shape (B, N, H, Dv) with (B, N, H) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    batch, n, num_heads, head_dim = q.shape
    if head_dim == 0:
        raise ValueError("q and k must have a head dimension D >= 1, got D = 0")
    return batch, n, num_heads, head_dim, v.shape[3]


def check_gradient_inputs(dout, out, lse, q, v, backend: str = "numpy") -> None:
    """Check the backward's ``dout, out: (B, N, H, Dv)`` and ``lse: (B, N, H)`` against q, v."""
    expected_out = tuple(v.shape)
    for name, x, shape in (("dout", dout, expected_out), ("out", out, expected_out), ("lse", lse, expected_out[:3])):
        check_array(x, name, backend, len(shape))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if name == "lse" and dtype_name(x.dtype) != lse_dtype_name(q.dtype):
            raise InputTypeError(f"lse must have dtype {lse_dtype_name(q.dtype)} (the forward's), got {x.dtype}")
        if name != "lse" and x.dtype != q.dtype:
            raise InputTypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")


def check_flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def resolve_scale(scale, head_dim: int) -> float:
    """``scale = 1 / sqrt(D)`` unless given (SPEC §1); a given scale must be a finite real."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise InputTypeError(f"scale must be a real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)
