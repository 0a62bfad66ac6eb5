"""Rejecting bad input before any computation (SPEC §7).

Every public entry point calls these checks first, so no backend (and no jitted kernel) ever
sees an array of the wrong rank, dtype or shape. Messages name the offending argument.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .index_sets import OFFSET_RULES, Branch

if TYPE_CHECKING:
    import cupy


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type (SPEC §7).

    SPEC §7 asks for ``TypeError`` for a wrong type and lists several type problems (dtype,
    non-integer ``w``) among its ``ValueError`` cases; like NumPy's ``AxisError`` this class is
    both, so either ``except`` clause catches it.
    """

SUPPORTED_DTYPES = ("float32", "float64")
"""The dtypes every public function accepts (SPEC §1): float32 and float64."""
HALF_DTYPES = ("float16", "bfloat16")
"""Accepted on CuPy arrays only: the GPU paths compute them in float32."""
GPU_BACKENDS = ("cupy", "cupy-fused", "cupy-tensor-core")
"""The backends that take CuPy arrays."""


def array_module_name(x: Any) -> str:
    """``"numpy"``, ``"cupy"`` or the top-level module of another array type (``"array_api_strict"``).

    Decided by type, without importing CuPy.

    Args:
        x: Any object.

    Returns:
        ``"numpy"`` for a ``np.ndarray``, otherwise the top-level module of ``x``'s type
        (``"cupy"``, ``"array_api_strict"``, ``"builtins"`` for a list, ...), for the message.
    """
    if isinstance(x, np.ndarray):
        return "numpy"
    return type(x).__module__.split(".")[0]


def dtype_name(dtype) -> str:
    """``"float32"`` for NumPy's, CuPy's and array API libraries' float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def check_array(x: Any, name: str, backend: str, ndim: int) -> None:
    """Check that ``x`` is an ``ndim``-D float array the backend accepts (SPEC §1, §7).

    Args:
        x: The argument to check.
        name: Its name, used in the messages (``"q"``, ``"dout"``, ...).
        backend: ``"reference"`` accepts NumPy or any array API array; ``"cupy"`` and
            ``"cupy-fused"`` ask for a CuPy array; ``"numba"`` for a NumPy array.
        ndim: The required number of dimensions.

    Returns:
        ``None``; ``x`` passed.

    Raises:
        InputTypeError: ``x`` is not an array of the expected library, or its dtype is not
            float32 or float64 (float16/bfloat16 are accepted on CuPy arrays only).
        ValueError: ``x.ndim != ndim``.
    """
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


def lse_dtype_name(dtype: Any) -> str:
    """The dtype of ``lse``: the input dtype, float32 for half inputs (accumulated in float32).

    Args:
        dtype: The inputs' dtype (NumPy, CuPy or array API).

    Returns:
        ``"float32"`` for float16/bfloat16, otherwise the dtype's name.
    """
    return "float32" if dtype_name(dtype) in HALF_DTYPES else dtype_name(dtype)


def check_attention_inputs(q: Any, k: Any, v: Any, backend: str = "numpy") -> tuple[int, int, int, int, int]:
    """Check ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)``, one float dtype; return the sizes (SPEC §1, §7).

    Args:
        q: ``(B, N, H, D)`` queries, float32 or float64 (half precision on CuPy arrays).
        k: ``(B, N, H, D)`` keys, the shape and dtype of ``q``.
        v: ``(B, N, H, Dv)`` values, the dtype of ``q``.
        backend: which arrays are expected, as in [`check_array`][longnet_ref.validation.check_array].

    Returns:
        ``(B, N, H, D, Dv)`` as ``int``s.

    Raises:
        InputTypeError: An argument is not an array the backend accepts, its dtype is not
            supported, or the three dtypes differ.
        ValueError: An argument is not 4-D, ``k.shape != q.shape``, ``v.shape[:3] != q.shape[:3]``,
            or ``D = 0``.
    """
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


def check_gradient_inputs(
    dout: np.ndarray | cupy.ndarray,
    out: np.ndarray | cupy.ndarray,
    lse: np.ndarray | cupy.ndarray,
    q: np.ndarray | cupy.ndarray,
    v: np.ndarray | cupy.ndarray,
    backend: str = "numpy",
) -> None:
    """Check the backward's ``dout, out: (B, N, H, Dv)`` and ``lse: (B, N, H)`` against q, v (SPEC §5, §7).

    Args:
        dout: ``(B, N, H, Dv)`` upstream gradient, the dtype of ``q``.
        out: ``(B, N, H, Dv)`` forward output, the dtype of ``q``.
        lse: ``(B, N, H)`` forward log-sum-exp, the dtype of ``q``.
        q: The (already checked) ``(B, N, H, D)`` queries: the reference dtype.
        v: The (already checked) ``(B, N, H, Dv)`` values: the reference shape.
        backend: ``"cupy"`` asks for CuPy arrays; any other backend for NumPy arrays.

    Returns:
        ``None``; all three passed.

    Raises:
        InputTypeError: An argument is not an array of the backend's library, is not
            float32/float64, or its dtype differs from ``q``'s.
        ValueError: A wrong rank or shape.
    """
    expected_out = tuple(v.shape)
    for name, x, shape in (("dout", dout, expected_out), ("out", out, expected_out), ("lse", lse, expected_out[:3])):
        check_array(x, name, backend, len(shape))
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if name == "lse" and dtype_name(x.dtype) != lse_dtype_name(q.dtype):
            raise InputTypeError(f"lse must have dtype {lse_dtype_name(q.dtype)} (the forward's), got {x.dtype}")
        if name != "lse" and x.dtype != q.dtype:
            raise InputTypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")


def check_flag(value: Any, name: str) -> bool:
    """Check a boolean option such as ``causal`` (SPEC §7): ``0``, ``1`` or ``"yes"`` are refused.

    Args:
        value: The option's value; a Python ``bool`` or ``np.bool_``.
        name: Its name, used in the message.

    Returns:
        ``value`` as a Python ``bool``.

    Raises:
        InputTypeError: ``value`` is not a ``bool`` or ``np.bool_``.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """``scale = 1 / sqrt(D)`` unless given (SPEC §1); a given scale must be a finite real (SPEC §7).

    Args:
        scale: ``None``, or a real number (``int``, ``float``, NumPy scalar; not ``bool``).
        head_dim: ``D >= 1``, used when ``scale`` is ``None``.

    Returns:
        The scale as a Python ``float``.

    Raises:
        InputTypeError: ``scale`` is not ``None`` and not a real number (``bool`` included).
        ValueError: ``scale`` is NaN or infinite.
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise InputTypeError(f"scale must be a real number or None, got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def validate_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[Branch, ...]:
    """Check ``segment_lengths`` and ``dilation_rates`` (SPEC §2, §7) and pair them as branches.

    Branch ``i`` is ``(w_i, r_i) = (segment_lengths[i], dilation_rates[i])``.

    Args:
        segment_lengths: ``w_i`` of every branch: a non-empty sequence (list, tuple or 1-D
            array) of positive integers.
        dilation_rates: ``r_i`` of every branch: as many positive integers.

    Returns:
        One [`Branch`][longnet_ref.index_sets.Branch] per pair, in order, with plain ``int`` fields.

    Raises:
        InputTypeError: Either argument is not a sequence (a string counts as none), or an
            element is not an integer (``bool`` included).
        ValueError: Either sequence is empty, their lengths differ, or an element is ``<= 0``.
    """
    for name, seq in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (Sequence, np.ndarray)):
            raise InputTypeError(f"{name} must be a sequence of positive integers, got {type(seq).__name__}")
    if len(segment_lengths) == 0:
        raise ValueError("segment_lengths must name at least one branch, got an empty list")
    if len(dilation_rates) == 0:
        raise ValueError("dilation_rates must name at least one branch, got an empty list")
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths and dilation_rates must have the same length, "
            f"got {len(segment_lengths)} and {len(dilation_rates)}"
        )
    return tuple(
        Branch(_positive_int(w, f"segment_lengths[{i}]"), _positive_int(r, f"dilation_rates[{i}]"))
        for i, (w, r) in enumerate(zip(segment_lengths, dilation_rates))
    )


def validate_offset_rule(offsets: str) -> str:
    """Check the head-offset rule ``offsets`` (SPEC §2, §7).

    Args:
        offsets: One of [`OFFSET_RULES`][longnet_ref.index_sets.OFFSET_RULES]: ``"paper"`` or
            ``"torchscale"``.

    Returns:
        ``offsets``, unchanged.

    Raises:
        ValueError: ``offsets`` is not one of the rules (any other value or type).
    """
    if not isinstance(offsets, str) or offsets not in OFFSET_RULES:
        raise ValueError(f"offsets must be one of {OFFSET_RULES}, got {offsets!r}")
    return offsets
