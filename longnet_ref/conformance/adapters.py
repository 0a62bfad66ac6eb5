"""Adapters: the kit speaks NumPy; an adapter calls an implementation written for a framework.

Each adapter turns the user's ``forward`` (and ``backward``, if given) into functions of NumPy
arrays, converting the inputs to the framework's arrays and the results back. A framework is
imported only when its adapter is asked for, so the kit never needs PyTorch, JAX or CuPy unless
the implementation under test uses it. When no ``backward`` is given, the PyTorch adapter takes
the gradient from ``torch.autograd`` and the JAX adapter from ``jax.vjp``: the kit then checks
what the framework's autodiff makes of the forward (SPEC §5).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import numpy as np

FRAMEWORKS = ("numpy", "torch", "jax", "cupy", "array-api-strict")


@dataclass
class Adapted:
    """``forward(q, k, v, segment_lengths, dilation_rates, causal) -> out`` and the backward,
    ``backward(dout, q, k, v, segment_lengths, dilation_rates, causal) -> (dq, dk, dv)``, both
    on NumPy arrays; ``backward`` is ``None`` when there is neither a given backward nor autodiff."""

    forward: Callable
    backward: Callable | None
    gradient_source: str  # "backward", "torch.autograd", "jax.vjp" or "none"


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(f"framework {name!r} is not installed ({error})") from None


def _to_numpy_tuple(values, to_numpy):
    if not isinstance(values, (tuple, list)) or len(values) != 3:
        raise TypeError(f"backward must return (dq, dk, dv), got {type(values).__name__}")
    return tuple(to_numpy(x) for x in values)


def _plain(forward, backward, to_array, to_numpy) -> Adapted:
    """An adapter for a framework without autodiff in the kit: NumPy, CuPy, array-API."""

    def fwd(q, k, v, segment_lengths, dilation_rates, causal):
        return to_numpy(forward(to_array(q), to_array(k), to_array(v), list(segment_lengths), list(dilation_rates), causal=causal))

    if backward is None:
        return Adapted(fwd, None, "none")

    def bwd(dout, q, k, v, segment_lengths, dilation_rates, causal):
        args = (to_array(x) for x in (dout, q, k, v))
        return _to_numpy_tuple(backward(*args, list(segment_lengths), list(dilation_rates), causal=causal), to_numpy)

    return Adapted(fwd, bwd, "backward")


def _numpy(forward, backward):
    return _plain(forward, backward, lambda x: x, _as_numpy)


def _as_numpy(x):
    if isinstance(x, tuple):  # e.g. (out, lse): not the contract (SPEC §1: out only)
        raise TypeError(f"forward must return one array out (B, N, H, Dv), got a tuple of {len(x)}")
    return np.asarray(x)


def _cupy(forward, backward):
    cp = _import("cupy")
    return _plain(forward, backward, cp.asarray, lambda x: _as_numpy(cp.asnumpy(x) if isinstance(x, cp.ndarray) else x))


def _array_api_strict(forward, backward):
    xp = _import("array_api_strict")

    def to_numpy(x):
        if isinstance(x, tuple):
            return _as_numpy(x)
        return np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(x)

    return _plain(forward, backward, xp.asarray, to_numpy)


def _torch(forward, backward):
    torch = _import("torch")

    def to_tensor(x, grad=False):
        return torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(grad)

    def to_numpy(x):
        if isinstance(x, tuple):
            return _as_numpy(x)
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    def fwd(q, k, v, segment_lengths, dilation_rates, causal):
        with torch.no_grad():
            out = forward(to_tensor(q), to_tensor(k), to_tensor(v), list(segment_lengths), list(dilation_rates), causal=causal)
        return to_numpy(out)

    if backward is not None:

        def bwd(dout, q, k, v, segment_lengths, dilation_rates, causal):
            args = (to_tensor(x) for x in (dout, q, k, v))
            return _to_numpy_tuple(backward(*args, list(segment_lengths), list(dilation_rates), causal=causal), to_numpy)

        return Adapted(fwd, bwd, "backward")

    def autograd(dout, q, k, v, segment_lengths, dilation_rates, causal):
        inputs = [to_tensor(x, grad=True) for x in (q, k, v)]
        # non-leaf copies, as in a model (q, k, v come out of projections): in-place updates allowed
        out = forward(*(x.clone() for x in inputs), list(segment_lengths), list(dilation_rates), causal=causal)
        grads = torch.autograd.grad(out, inputs, grad_outputs=to_tensor(dout), allow_unused=True)
        return tuple(np.zeros_like(x) if g is None else to_numpy(g) for g, x in zip(grads, (q, k, v)))

    return Adapted(fwd, autograd, "torch.autograd")


def _jax(forward, backward):
    jax = _import("jax")
    jnp = _import("jax.numpy")
    jax.config.update("jax_enable_x64", True)  # float64 inputs stay float64 (the kit's dtype)

    def to_numpy(x):
        return _as_numpy(x) if isinstance(x, tuple) else np.asarray(x)

    adapted = _plain(forward, backward, jnp.asarray, to_numpy)
    if backward is not None:
        return adapted

    def vjp(dout, q, k, v, segment_lengths, dilation_rates, causal):
        def f(q_, k_, v_):
            return forward(q_, k_, v_, list(segment_lengths), list(dilation_rates), causal=causal)

        _, pullback = jax.vjp(f, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        return tuple(np.asarray(g) for g in pullback(jnp.asarray(dout)))

    return Adapted(adapted.forward, vjp, "jax.vjp")


ADAPTERS = {"numpy": _numpy, "torch": _torch, "jax": _jax, "cupy": _cupy, "array-api-strict": _array_api_strict}


def adapt(forward: Callable, backward: Callable | None, framework: str) -> Adapted:
    """Wrap ``forward``/``backward`` written for ``framework`` (one of ``FRAMEWORKS``)."""
    return ADAPTERS[framework](forward, backward)
