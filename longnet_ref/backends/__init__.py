"""The backend registry: ``backend=`` name -> what computes dilated attention, and on which arrays.

Every backend module provides

    forward(q, k, v, branches, causal, scale, offsets) -> (out, lse)
    backward(dout, q, k, v, out, lse, branches, causal, scale, offsets) -> (dq, dk, dv)

on inputs already validated by ``longnet_ref.attention``. The reference
(``longnet_ref.reference``) defines the semantics; every other backend is tested against it.

| backend | arrays | device | dtypes | distributed | module |
| --- | --- | --- | --- | --- | --- |
| ``"reference"`` (alias ``"numpy"``) | NumPy, CuPy or any array API library | the arrays' | float32, float64 (half on CuPy arrays) | yes | ``longnet_ref.reference`` |
| ``"numba"`` | NumPy | CPU | float32, float64 | yes | ``longnet_ref.backends.numba_cpu`` |
| ``"cupy"`` | CuPy | GPU | float32, float64, float16, bfloat16 | no | ``longnet_ref.reference`` on CuPy (cuBLAS GEMMs) |
| ``"cupy-fused"`` | CuPy | GPU | float32, float64, float16 | no | ``longnet_ref.backends.cupy_gpu`` (fused Numba-CUDA kernels) |
| ``"cupy-tensor-core"`` | CuPy | GPU | float16, bfloat16 (``D = Dv`` in 64, 128) | no | ``longnet_ref.backends.tensor_core`` (CUDA C++ wmma kernels; not yet run on a GPU) |

This table is [`BACKENDS`][longnet_ref.backends.BACKENDS]; every other module reads it (the checks in
``longnet_ref.validation``, the layer's array conversion in ``longnet_ref.nn``, the backends
``longnet_ref.distributed`` accepts, the CLI's ``--backend`` choices), so a backend is added here
and nowhere else. This module imports nothing from the package: everything may import it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
from array_api_compat import array_namespace, to_device  # noqa: F401 (array_namespace: re-exported for reference.py)

__all__ = [
    "BACKENDS",
    "BackendSpec",
    "backend_names",
    "backend_spec",
    "get_backend",
    "install_hint",
    "to_backend_arrays",
    "to_numpy",
]
# array_namespace is array_api_compat's, imported here for longnet_ref.reference (xp = array_namespace(q)).
# Its lookup costs ~5 us a call, under 3 % of a decoding step (benchmarks/results/decode.json): no fast path.


@dataclass(frozen=True)
class BackendSpec:
    """What one backend is: its module, the arrays it takes, where it runs, what it needs.

    Attributes:
        name: The canonical name (an alias such as ``"numpy"`` maps to the spec of ``"reference"``).
        module: The module that provides ``forward`` and ``backward``.
        arrays: The array library of its inputs and outputs: ``"numpy"``, ``"cupy"``, or ``"any"``
            (NumPy, CuPy or any array API library; results in the inputs' library).
        device: ``"cpu"`` or ``"gpu"``: where it runs on the arrays the layer and the model give it
            (NumPy arrays for ``arrays="numpy"`` or ``"any"``).
        dtypes: The input dtypes it accepts. float16/bfloat16 are accepted on CuPy arrays only
            (they are computed in float32 on the GPU).
        distributed: Whether ``longnet_ref.distributed`` may use it for a rank's local branches
            (the distributed code exchanges NumPy arrays over MPI: CPU backends only).
        requires: The top-level modules it imports beyond the base install.
        extra: The pip extra of ``longnet-ref`` that installs ``requires`` (``None``: base install).
    """

    name: str
    module: str
    arrays: str
    device: str
    dtypes: tuple[str, ...]
    distributed: bool
    requires: tuple[str, ...] = ()
    extra: str | None = None


_ALL_FLOATS = ("float32", "float64", "float16", "bfloat16")
_REFERENCE = BackendSpec("reference", "longnet_ref.reference", arrays="any", device="cpu", dtypes=_ALL_FLOATS, distributed=True)
_CUPY = dict(arrays="cupy", device="gpu", distributed=False, extra="gpu")  # every GPU backend: CuPy arrays, single device

BACKENDS: dict[str, BackendSpec] = {
    "reference": _REFERENCE,
    "numpy": _REFERENCE,  # an alias: the same spec object, so the same arrays, module and checks
    "numba": BackendSpec("numba", "longnet_ref.backends.numba_cpu", arrays="numpy", device="cpu", dtypes=("float32", "float64"), distributed=True),
    "cupy": BackendSpec("cupy", "longnet_ref.reference", dtypes=_ALL_FLOATS, requires=("cupy",), **_CUPY),
    "cupy-fused": BackendSpec(
        "cupy-fused", "longnet_ref.backends.cupy_gpu", dtypes=("float32", "float64", "float16"), requires=("cupy", "numba.cuda"), **_CUPY
    ),
    "cupy-tensor-core": BackendSpec("cupy-tensor-core", "longnet_ref.backends.tensor_core", dtypes=("float16", "bfloat16"), requires=("cupy",), **_CUPY),
}
"""Every accepted ``backend=`` name -> its [`BackendSpec`][longnet_ref.backends.BackendSpec]."""


def backend_names(*, device: str | None = None, distributed: bool | None = None) -> tuple[str, ...]:
    """The accepted names, in the registry's order, optionally only those of one device or capability.

    Args:
        device: ``"cpu"`` or ``"gpu"`` keeps the backends of that device; ``None`` keeps all.
        distributed: ``True`` keeps the backends ``longnet_ref.distributed`` may use; ``None`` all.

    Returns:
        The names (aliases included), e.g. ``("reference", "numpy", "numba")`` for ``device="cpu"``.
    """
    return tuple(
        name for name, spec in BACKENDS.items() if (device is None or spec.device == device) and (distributed is None or spec.distributed == distributed)
    )


def backend_spec(name: str) -> BackendSpec:
    """The spec of the backend called ``name`` (SPEC §6, §7); imports nothing.

    Args:
        name: A key of [`BACKENDS`][longnet_ref.backends.BACKENDS].

    Returns:
        Its [`BackendSpec`][longnet_ref.backends.BackendSpec] (``"numpy"`` gives the spec of ``"reference"``).

    Raises:
        ValueError: ``name`` is not one of the names (any other value or type), listing them.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {name!r}")
    return BACKENDS[name]


def install_hint(extra: str) -> str:
    """How to install an extra, from PyPI and from a clone: ``pip install "longnet-ref[gpu]"`` ...

    Args:
        extra: The extra's name in ``pyproject.toml`` (``"gpu"``, ``"mpi"``, ...).

    Returns:
        The two commands as one sentence, for an error message.
    """
    return f'pip install "longnet-ref[{extra}]" (in a clone of the repository: pip install ".[{extra}]")'


def get_backend(name: str):
    """Import and return the module of the backend called ``name`` (SPEC §6).

    A backend whose requirements are not installed fails here, before any work, with one line
    naming the extra to install (``"cupy"`` runs the reference, which would import without CuPy).

    Args:
        name: A key of [`BACKENDS`][longnet_ref.backends.BACKENDS].

    Returns:
        The module, with ``forward`` and ``backward``.

    Raises:
        ValueError: An unknown ``name`` ([`backend_spec`][longnet_ref.backends.backend_spec]).
        ImportError: A module of ``requires`` cannot be imported; the message names the extra.
    """
    spec = backend_spec(name)
    for module in spec.requires:
        try:
            importlib.import_module(module)
        except ImportError as error:
            needs = "CuPy and an NVIDIA GPU" if spec.device == "gpu" else module
            raise ImportError(f"backend={name!r} needs {needs}: {install_hint(spec.extra)}") from error
    return importlib.import_module(spec.module)


def to_backend_arrays(x: np.ndarray, name: str):
    """``x`` (a NumPy array) in the array library backend ``name`` computes on (its ``arrays``).

    A CuPy copy on the current GPU for ``arrays="cupy"`` (``"cupy"``, ``"cupy-fused"``); ``x``
    itself for ``"numpy"`` and ``"any"`` (the reference computes on NumPy arrays as given). The
    layer, the model and the benchmarks convert with this, so the choice is the registry's.

    Args:
        x: A NumPy array.
        name: A key of [`BACKENDS`][longnet_ref.backends.BACKENDS].

    Returns:
        ``x`` or ``cupy.asarray(x)``.

    Raises:
        ValueError: An unknown ``name``.
        ImportError: A CuPy backend without CuPy, naming the extra ([`get_backend`][longnet_ref.backends.get_backend]).
    """
    if backend_spec(name).arrays != "cupy":
        return x
    get_backend(name)  # the one-line ImportError naming the extra, if CuPy is missing
    import cupy

    return cupy.asarray(x)


def to_numpy(x) -> np.ndarray:
    """A backend's result on the host: ``x`` itself for a NumPy array, a copy from a CuPy array."""
    return np.asarray(to_device(x, "cpu"))
