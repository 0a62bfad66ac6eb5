"""Rejecting bad input before any computation (SPEC §7): every check lives here.

Every public entry point calls these checks first, so no backend (and no jitted kernel) ever
sees an array of the wrong rank, dtype or shape. Messages name the offending argument.

The exception rule (SPEC §7): a value of the wrong *type* (a float or a bool where an integer is
asked, a non-bool flag, an array of an unsupported dtype, an object that is not an array) raises
[`InputTypeError`][longnet_ref.validation.InputTypeError]; a value of the right type that is
wrong (out of range, a shape that does not fit, a name that is not one of the choices) raises
``ValueError``. ``InputTypeError`` is a ``ValueError`` too, so ``except ValueError`` catches every
bad input.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np
from array_api_compat import is_array_api_obj, is_cupy_array, is_numpy_array

from .backends import backend_spec
from .index_sets import OFFSET_RULES, Branch


class InputTypeError(TypeError, ValueError):
    """An argument of the wrong type (SPEC §7).

    SPEC §7 asks for ``TypeError`` for a wrong type and ``ValueError`` for a wrong value; like
    NumPy's ``AxisError`` this class is both, so ``except ValueError`` catches every bad input
    and ``except TypeError`` the wrong types.
    """


MAX_INDEX = 2**62
"""The largest ``w`` or ``r``: positions are int64 in the kernels and index sets."""
SUPPORTED_DTYPES = ("float32", "float64")
"""The dtypes every public function accepts (SPEC §1): float32 and float64."""
HALF_DTYPES = ("float16", "bfloat16")
"""Accepted on CuPy arrays only, by the backends whose registry entry lists them: the GPU
paths compute them in float32."""


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(value: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """Check an integer argument such as ``num_heads`` (SPEC §7); return it as a Python ``int``.

    Python and NumPy integers are integers; ``bool`` is not (``True`` is no head count), nor is
    a whole float (``2.0``).

    Args:
        value: The argument.
        name: Its name, used in the message.
        minimum: The smallest accepted value, or ``None`` for no lower bound.
        maximum: The largest accepted value, or ``None`` for no upper bound.

    Returns:
        ``int(value)``.

    Raises:
        InputTypeError: ``value`` is not an integer: ``"num_heads must be an integer >= 1, got 2.5 (float)"``.
        ValueError: ``value < minimum`` or ``value > maximum``: ``"num_heads must be an integer >= 1, got 0"``.
    """
    wanted = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    wanted += (" and" if minimum is not None else "") + f" <= {maximum}" if maximum is not None else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{name} must be {wanted}, got {value!r} ({_type_name(value)})")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return int(value)


def check_real(value: Any, name: str, *, minimum: float | None = None, above: float | None = None, finite: bool = True) -> float:
    """Check a real-number argument such as ``temperature`` or ``lr`` (SPEC §7); return it as a ``float``.

    Args:
        value: The argument: ``int``, ``float`` or a NumPy real scalar (not ``bool``).
        name: Its name, used in the message.
        minimum: The smallest accepted value (inclusive), or ``None``.
        above: A bound the value must exceed (exclusive), or ``None``.
        finite: Refuse infinities (NaN is always refused).

    Returns:
        ``float(value)``.

    Raises:
        InputTypeError: ``value`` is not a real number (``bool``, a string, ``None``, a complex).
        ValueError: NaN, an infinity with ``finite=True``, or a value below ``minimum`` / not above ``above``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be a real number, got {value!r} ({_type_name(value)})")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    return value


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, or ``None`` where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, an array larger than this machine's physical memory.

    Args:
        nbytes: The bytes the allocation needs.
        what: What needs them and why, for the message: ``"multiplicity(n=100000, num_heads=8):
            4 H N^2"``.

    Raises:
        ValueError: ``nbytes`` exceeds the physical memory; the message gives both numbers.
    """
    memory = physical_memory()
    if memory is not None and nbytes > memory:
        raise ValueError(f"{what} needs {nbytes:,} bytes ({nbytes / 2**30:,.1f} GiB), more than this machine's {memory:,} bytes of memory")


def check_rng(value: Any, name: str = "rng") -> np.random.Generator:
    """Check a random generator argument: a ``np.random.Generator`` (``np.random.default_rng(seed)``).

    Raises:
        InputTypeError: ``value`` is not a ``np.random.Generator``.
    """
    if not isinstance(value, np.random.Generator):
        raise InputTypeError(f"{name} must be a numpy.random.Generator (np.random.default_rng(seed)), got {_type_name(value)}")
    return value


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
        raise InputTypeError(f"{name} must be a bool, got {value!r} ({_type_name(value)})")
    return bool(value)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check a named option such as ``kind`` against its choices (SPEC §7).

    Args:
        value: The option's value.
        name: Its name, used in the message.
        choices: The accepted strings.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: ``value`` is not one of ``choices`` (any other value or type), listing them.
    """
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_dtype(value: Any, name: str = "dtype", allowed: Sequence[str] = SUPPORTED_DTYPES) -> np.dtype:
    """Check a ``dtype=`` argument (``np.float32``, ``"float64"``, ...); return it as a ``np.dtype``.

    Args:
        value: Anything ``np.dtype`` understands.
        name: Its name, used in the message.
        allowed: The accepted dtype names.

    Returns:
        ``np.dtype(value)``.

    Raises:
        InputTypeError: ``value`` is no dtype, or not one of ``allowed`` (a dtype is a type).
    """
    wanted = " or ".join(allowed)
    if value is None:  # np.dtype(None) would be float64
        raise InputTypeError(f"{name} must be {wanted}, got None")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError):
        raise InputTypeError(f"{name} must be {wanted}, got {value!r}") from None
    if dtype.name not in allowed:
        raise InputTypeError(f"{name} must be {wanted}, got {dtype.name}")
    return dtype


def check_tokens(tokens: Any, vocab_size: int, name: str = "tokens", *, ndim: int | None = 2) -> np.ndarray:
    """Check token ids: an integer array of rank ``ndim`` with every id in ``[0, vocab_size)``.

    Args:
        tokens: An integer NumPy array, or a (nested) list of ints.
        vocab_size: ``V``; ids must lie in ``[0, V)``.
        name: The argument's name, used in the messages (``"tokens"``, ``"targets"``, ...).
        ndim: The required rank (``2``: ``(B, N)``), or ``None`` for any.

    Returns:
        ``tokens`` as a NumPy array.

    Raises:
        InputTypeError: Not an integer array (floats, bools, strings, objects).
        ValueError: A ragged list, the wrong rank, or an id outside ``[0, vocab_size)``.
    """
    try:
        array = np.asarray(tokens)
    except ValueError:
        raise ValueError(f"{name} must be a rectangular integer array, got a ragged {_type_name(tokens)}") from None
    if array.dtype.kind not in "iu":
        raise InputTypeError(f"{name} must be integers, got dtype {array.dtype} ({_type_name(tokens)})")
    if ndim is not None and array.ndim != ndim:
        layout = " (batch, sequence)" if ndim == 2 else ""
        raise ValueError(f"{name} must be {ndim}-D{layout}, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got values in [{array.min()}, {array.max()}]")
    return array


def check_state_dict(
    state: Any, shapes: Mapping[str, tuple[int, ...]], dtype: Any = None, *, name: str = "params", convert: bool = False
) -> dict[str, np.ndarray]:
    """Check a dict of parameters against the expected names and shapes (and dtype).

    Args:
        state: The mapping to check.
        shapes: Every expected name -> its shape.
        dtype: The required dtype of every value (``None``: any). With ``convert=True`` the
            values are converted to it instead.
        name: The argument's name, used in the messages (``"params"``, ``"state_dict"``).
        convert: Accept anything ``np.asarray`` turns into an array of the right shape (a
            PyTorch tensor's ``.numpy()``, a list) and return copies in ``dtype``.

    Returns:
        A new dict, in the order of ``shapes``: the given arrays, or their converted copies.

    Raises:
        InputTypeError: ``state`` is not a mapping; a value is not a NumPy array (or, with
            ``convert``, cannot be converted); a value's dtype is not ``dtype``.
        ValueError: A missing or an unexpected name; a value of the wrong shape.
    """
    if not isinstance(state, Mapping):
        raise InputTypeError(f"{name} must be a mapping of names to arrays, got {_type_name(state)}")
    missing = [key for key in shapes if key not in state]
    extra = [key for key in state if key not in shapes]
    if missing or extra:
        raise ValueError(f"{name} does not match the expected names: missing {missing}, unexpected {extra}")
    checked = {}
    for key, shape in shapes.items():
        value = state[key]
        if convert:
            try:
                value = np.array(value, dtype=dtype)  # a copy, whatever the source
            except (TypeError, ValueError):
                raise InputTypeError(f"{name}[{key!r}] must be an array, got {_type_name(state[key])}") from None
        elif not isinstance(value, np.ndarray):
            raise InputTypeError(f"{name}[{key!r}] must be a numpy array, got {_type_name(value)}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{name}[{key!r}] must have shape {tuple(shape)}, got {tuple(value.shape)}")
        if dtype is not None and value.dtype != np.dtype(dtype):
            raise InputTypeError(f"{name}[{key!r}] must have dtype {np.dtype(dtype)}, got {value.dtype}")
        checked[key] = value
    return checked


def dtype_name(dtype) -> str:
    """``"float32"`` for NumPy's, CuPy's and array API libraries' float32 alike."""
    return str(dtype).rsplit(".", 1)[-1]


def _array_library(x: Any) -> str | None:
    """``"numpy"``, ``"cupy"``, ``"array API"`` for another array API array, ``None`` for no array."""
    if is_numpy_array(x):
        return "numpy"
    if is_cupy_array(x):
        return "cupy"
    return "array API" if is_array_api_obj(x) else None


def check_array(x: Any, name: str, ndim: int, backend: str | None = None) -> None:
    """Check that ``x`` is an ``ndim``-D float array the backend accepts (SPEC §1, §7).

    Which arrays and dtypes a backend accepts is its entry in the registry
    ([`BACKENDS`][longnet_ref.backends.BACKENDS]): ``arrays`` and ``dtypes``.

    Args:
        x: The argument to check.
        name: Its name, used in the messages (``"q"``, ``"dout"``, ...).
        ndim: The required number of dimensions.
        backend: A registered backend name, or ``None`` for the NumPy-only functions (dense
            attention, the KV caches, the distributed code): a NumPy float32/float64 array.

    Returns:
        ``None``; ``x`` passed.

    Raises:
        InputTypeError: ``x`` is not an array of the expected library, or its dtype is not one
            the backend accepts (float16/bfloat16 only on CuPy arrays).
        ValueError: ``x.ndim != ndim``, or an unknown ``backend``.
    """
    spec = None if backend is None else backend_spec(backend)
    arrays = "numpy" if spec is None else spec.arrays
    library = _array_library(x)
    where = "" if backend is None else f" for backend={backend!r}"
    if arrays == "any" and library is None:
        raise InputTypeError(f"{name} must be an array (NumPy, CuPy or array API){where}, got {_type_name(x)}")
    if arrays != "any" and library != arrays:
        raise InputTypeError(f"{name} must be a {arrays} array{where}, got {type(x).__module__}.{_type_name(x)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    dtype = dtype_name(x.dtype)
    accepted = SUPPORTED_DTYPES if spec is None else spec.dtypes
    on_this_array = accepted if library == "cupy" else tuple(d for d in accepted if d not in HALF_DTYPES)
    if dtype in on_this_array:
        return
    note = " (float16/bfloat16: CuPy arrays only)" if dtype in HALF_DTYPES and dtype in accepted else ""
    wanted = ", ".join(on_this_array[:-1]) + " or " + on_this_array[-1]  # "float32 or float64"
    raise InputTypeError(f"{name} must be {wanted}{where}, got dtype {dtype}{note}")


def lse_dtype_name(dtype: Any) -> str:
    """The dtype of ``lse``: the input dtype, float32 for half inputs (accumulated in float32).

    Args:
        dtype: The inputs' dtype (NumPy, CuPy or array API).

    Returns:
        ``"float32"`` for float16/bfloat16, otherwise the dtype's name.
    """
    return "float32" if dtype_name(dtype) in HALF_DTYPES else dtype_name(dtype)


def check_attention_inputs(q: Any, k: Any, v: Any, backend: str | None = None) -> tuple[int, int, int, int, int]:
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
        check_array(x, name, 4, backend)
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
    dout: Any,
    out: Any,
    lse: Any,
    q: Any,
    v: Any,
    backend: str | None = None,
) -> None:
    """Check the backward's ``dout, out: (B, N, H, Dv)`` and ``lse: (B, N, H)`` against q, v (SPEC §5, §7).

    Args:
        dout: ``(B, N, H, Dv)`` upstream gradient, the dtype of ``q``.
        out: ``(B, N, H, Dv)`` forward output, the dtype of ``q``.
        lse: ``(B, N, H)`` forward log-sum-exp, the dtype of ``q``.
        q: The (already checked) ``(B, N, H, D)`` queries: the reference dtype.
        v: The (already checked) ``(B, N, H, Dv)`` values: the reference shape.
        backend: which arrays are expected, as in [`check_array`][longnet_ref.validation.check_array].

    Returns:
        ``None``; all three passed.

    Raises:
        InputTypeError: An argument is not an array of the backend's library, is not
            float32/float64, or its dtype differs from ``q``'s.
        ValueError: A wrong rank or shape.
    """
    expected_out = tuple(v.shape)
    for name, x, shape in (("dout", dout, expected_out), ("out", out, expected_out), ("lse", lse, expected_out[:3])):
        check_array(x, name, len(shape), backend)
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if name == "lse" and dtype_name(x.dtype) != lse_dtype_name(q.dtype):
            raise InputTypeError(f"lse must have dtype {lse_dtype_name(q.dtype)} (the forward's), got {x.dtype}")
        if name != "lse" and x.dtype != q.dtype:
            raise InputTypeError(f"{name} must have the dtype of q ({q.dtype}), got {x.dtype}")


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
    return check_real(scale, "scale")


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
        raise ValueError(f"segment_lengths and dilation_rates must have the same length, got {len(segment_lengths)} and {len(dilation_rates)}")
    return tuple(
        Branch(
            check_int(w, f"segment_lengths[{i}]", minimum=1, maximum=MAX_INDEX),
            check_int(r, f"dilation_rates[{i}]", minimum=1, maximum=MAX_INDEX),
        )
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
    return check_choice(offsets, "offsets", OFFSET_RULES)
