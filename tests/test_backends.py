"""The backend registry (``longnet_ref.backends.BACKENDS``) decides, and every user follows it.

- ``"numpy"`` is truly ``"reference"``: the same registry entry, the same module, and it accepts
  the array API arrays that ``"reference"`` accepts (it once rejected them).
- The layer and the model run with every backend name. Where CuPy is missing, a GPU name fails at
  construction with one line naming the extra; and the arrays the layer hands to a backend are of
  the registry's array library: with a stand-in ``cupy`` module, ``"cupy"`` and ``"cupy-fused"``
  both receive CuPy arrays (``"cupy-fused"`` once received NumPy arrays, because the layer
  decided by the name ``"cupy"``).
"""

import sys
import types

import numpy as np
import pytest

from longnet_ref import DilatedKVCache, MultiheadDilatedAttention, dilated_attention, nn
from longnet_ref import model as lm
from longnet_ref import reference
from longnet_ref.backends import BACKENDS, backend_names, backend_spec, get_backend, install_hint

from . import oracle
from .tolerances import F64, NUMBA, SUMMATION

try:
    import cupy  # noqa: F401

    CUPY_INSTALLED = True
except ImportError:
    CUPY_INSTALLED = False

CPU_NAMES = backend_names(device="cpu")
GPU_NAMES = backend_names(device="gpu")


def test_the_registry_names_every_backend_once_with_its_properties():
    assert set(BACKENDS) == {"reference", "numpy", "numba", "cupy", "cupy-fused", "cupy-tensor-core"}
    assert CPU_NAMES == ("reference", "numpy", "numba") and GPU_NAMES == ("cupy", "cupy-fused", "cupy-tensor-core")
    assert backend_names(distributed=True) == CPU_NAMES  # MPI exchanges NumPy arrays
    for name, spec in BACKENDS.items():
        assert spec.arrays in ("numpy", "cupy", "any") and spec.device in ("cpu", "gpu")
        # The tensor-core kernels take half precision only (issue 23); every other backend float32/float64.
        assert set(spec.dtypes) >= ({"float16", "bfloat16"} if name == "cupy-tensor-core" else {"float32", "float64"})
        assert (spec.extra == "gpu") == (spec.device == "gpu")
    assert "float16" in BACKENDS["cupy-fused"].dtypes and "bfloat16" not in BACKENDS["cupy-fused"].dtypes


def test_numpy_is_the_reference_entry_itself():
    assert backend_spec("numpy") is backend_spec("reference")
    assert get_backend("numpy") is get_backend("reference") is reference


def test_numpy_accepts_array_api_arrays_as_reference_does():
    xp = pytest.importorskip("array_api_strict")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 12, 2, 4)) for _ in range(3))
    want, _ = oracle.dilated_attention(q, k, v, [4, 8], [1, 2], causal=True)
    for name in ("numpy", "reference"):
        out = dilated_attention(xp.asarray(q), xp.asarray(k), xp.asarray(v), [4, 8], [1, 2], causal=True, backend=name)
        assert type(out).__module__.startswith("array_api_strict"), name
        # the library against the loop oracle: SUMMATION (different summation orders, float64)
        np.testing.assert_allclose(np.from_dlpack(out), want, **SUMMATION[F64])


def test_a_numpy_only_backend_refuses_array_api_arrays_naming_the_backend():
    xp = pytest.importorskip("array_api_strict")
    q = xp.asarray(np.zeros((1, 4, 1, 2)))
    with pytest.raises(TypeError, match="q must be a numpy array for backend='numba'"):
        dilated_attention(q, q, q, [4], [1], backend="numba")


@pytest.mark.parametrize("name", CPU_NAMES)
def test_the_layer_and_the_model_run_on_every_cpu_backend(name):
    x = np.random.default_rng(1).standard_normal((2, 12, 8))
    layer = MultiheadDilatedAttention(8, 2, [4, 12], [1, 3], causal=True, backend=name)
    y, cache = layer.forward(x)
    numba = MultiheadDilatedAttention(8, 2, [4, 12], [1, 3], causal=True, backend="numba")
    # the reference against the Numba kernels (NUMBA: blocked sums and the kernels' own exp)
    np.testing.assert_allclose(y, numba.forward(x)[0], **NUMBA[F64])
    dx, grads = layer.backward(np.ones_like(y), cache)
    assert dx.shape == x.shape and set(grads) == set(layer.params)

    config = lm.LongNetConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(2,), backend=name)
    tokens = np.arange(12).reshape(2, 6) % 7
    logits, _ = lm.LongNetLM(config).forward(tokens)
    numba_logits, _ = lm.LongNetLM(lm.LongNetConfig(**{**config.to_dict(), "backend": "numba"})).forward(tokens)
    np.testing.assert_allclose(logits, numba_logits, **NUMBA[F64])


@pytest.mark.skipif(CUPY_INSTALLED, reason="CuPy is installed: tests/test_gpu.py and test_layer.py run the GPU names")
@pytest.mark.parametrize("name", GPU_NAMES)
def test_a_gpu_name_without_cupy_fails_up_front_naming_the_extra(name):
    config = lm.LongNetConfig(
        vocab_size=7, d_model=8, n_layers=1, n_heads=2, segment_lengths=(4,), dilation_rates=(1,), backend=name
    )  # a config is data: it may name a GPU it does not run on
    params = lm.init_params(config)
    calls = [
        lambda: MultiheadDilatedAttention(8, 2, [4], [1], backend=name),
        lambda: lm.LongNetLM(config),
        lambda: lm.forward(config, params, np.zeros((1, 4), np.int64)),
        lambda: nn.attention_forward(
            MultiheadDilatedAttention(8, 2, [4], [1]).params,
            np.zeros((1, 4, 8)),
            num_heads=2,
            kind="dilated",
            segment_lengths=[4],
            dilation_rates=[1],
            backend=name,
        ),
        lambda: dilated_attention(np.zeros((1, 4, 1, 2)), np.zeros((1, 4, 1, 2)), np.zeros((1, 4, 1, 2)), [4], [1], backend=name),
        lambda: DilatedKVCache(1, 1, 2, 2, [4], [1]).prefill(*[np.zeros((1, 4, 1, 2))] * 3, backend=name),
    ]
    for call in calls:
        with pytest.raises(ImportError) as raised:
            call()
        message = str(raised.value)
        assert "\n" not in message and f"backend={name!r}" in message
        assert install_hint("gpu") in message
    assert 'pip install "longnet-ref[gpu]"' in install_hint("gpu") and 'pip install ".[gpu]"' in install_hint("gpu")


class StandInCupyArray:
    """A NumPy array dressed as a CuPy array: ``array_api_compat.is_cupy_array`` recognises it
    through the stand-in ``cupy.ndarray``, and ``.get()`` returns it to the host as CuPy does."""

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape, self.ndim, self.dtype = self.array.shape, self.array.ndim, self.array.dtype

    def get(self):
        return self.array.copy()


@pytest.mark.skipif(CUPY_INSTALLED, reason="CuPy is installed: the real GPU tests run instead")
# The layer below runs in float64: every backend that takes it ("cupy-tensor-core" is half only).
@pytest.mark.parametrize("name", [name for name in backend_names() if "float64" in BACKENDS[name].dtypes])
def test_the_layer_hands_each_backend_the_arrays_of_its_registry_entry(name, monkeypatch):
    stand_in = types.ModuleType("cupy")
    stand_in.ndarray = StandInCupyArray
    stand_in.asarray = StandInCupyArray
    monkeypatch.setitem(sys.modules, "cupy", stand_in)
    received = []

    def unwrap(x):
        received.append(type(x))
        return x.array if isinstance(x, StandInCupyArray) else x

    def rewrap(arrays, like):
        return tuple(StandInCupyArray(a) if like is StandInCupyArray else a for a in arrays)

    recording = types.SimpleNamespace(
        forward=lambda q, k, v, *rest: rewrap(reference.forward(*map(unwrap, (q, k, v)), *rest), received[-1]),
        backward=lambda *arrays_and_rest: rewrap(reference.backward(*map(unwrap, arrays_and_rest[:6]), *arrays_and_rest[6:]), received[-1]),
    )
    real_get_backend = get_backend

    def get_recording_backend(backend):
        spec = backend_spec(backend)
        if spec.arrays == "cupy":
            return recording  # the GPU modules need a real CuPy; the conversion is what is tested
        module = real_get_backend(backend)
        return types.SimpleNamespace(
            forward=lambda *a: (received.extend(type(x) for x in a[:3]), module.forward(*a))[1],
            backward=lambda *a: (received.extend(type(x) for x in a[:6]), module.backward(*a))[1],
        )

    for where in ("longnet_ref.backends", "longnet_ref.attention", "longnet_ref.nn"):
        monkeypatch.setattr(f"{where}.get_backend", get_recording_backend)

    layer = MultiheadDilatedAttention(8, 2, [4], [1], causal=True, backend=name)
    x = np.random.default_rng(2).standard_normal((1, 8, 8))
    y, cache = layer.forward(x)
    dx, _ = layer.backward(np.ones_like(y), cache)
    expected = StandInCupyArray if BACKENDS[name].arrays == "cupy" else np.ndarray
    assert received and all(t is expected for t in received), (name, set(received))
    assert type(y) is np.ndarray and type(dx) is np.ndarray  # back on the host
    want, _ = MultiheadDilatedAttention(8, 2, [4], [1], causal=True).forward(x)
    # the reference or (for "numba") the Numba kernels computed it: NUMBA covers both
    np.testing.assert_allclose(y, want, **NUMBA[F64])
