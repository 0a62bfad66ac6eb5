"""The public dilated-attention API (SPEC §6): validate, then dispatch to one backend.

Validation happens here, once, for every backend: no kernel ever sees an input that SPEC §7
rejects. Docs: ``docs/api.md``.
"""

from __future__ import annotations

from .backends import get_backend
from .config import validate_branches, validate_offset_rule
from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale


def _check_config(backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets):
    module = get_backend(backend)
    head_dim = check_attention_inputs(q, k, v, backend)[3]
    branches = validate_branches(segment_lengths, dilation_rates)
    offsets = validate_offset_rule(offsets)
    return module, branches, check_flag(causal, "causal"), resolve_scale(scale, head_dim), offsets


def dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, causal=False, scale=None, offsets="paper", backend="numpy", return_lse=False
):
    """Dilated attention of LongNet (paper Eqs. 3-10; SPEC §2-4).

    For each branch ``(w_i, r_i)`` every head attends densely inside the rows of each segment
    that its offset selects, giving ``(o_i, lse_i)``; the branches are mixed as

        out = sum_i exp(lse_i - LSE) o_i,   LSE = log sum_i exp(lse_i).

    Args:
        q: ``(B, N, H, D)``, float32 or float64 (``k`` and ``v`` of the same dtype); on CuPy
            arrays also float16 (computed in float32; ``lse`` is then float32).
        k: ``(B, N, H, D)``.
        v: ``(B, N, H, Dv)``.
        segment_lengths: the branches' segment lengths ``w_i``, positive integers.
        dilation_rates: the branches' dilations ``r_i``, positive integers, as many as ``w_i``.
        causal: keep only keys at positions ``<=`` the query's.
        scale: score scale, ``1/sqrt(D)`` by default.
        offsets: ``"paper"`` (head ``h`` offset ``h mod r``) or ``"torchscale"`` (blocks).
        backend: ``"reference"`` (alias ``"numpy"``: the definition, on NumPy, CuPy or any
            array API arrays), ``"numba"`` (CPU kernels), ``"cupy"`` (the reference on CuPy
            arrays: cuBLAS GEMMs) or ``"cupy-fused"`` (fused Numba-CUDA kernels); see ``docs/gpu.md``.
        return_lse: also return ``LSE``.

    Returns:
        ``out (B, N, H, Dv)``, and ``lse (B, N, H)`` if ``return_lse``.
    """
    module, branches, causal, scale, offsets = _check_config(
        backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets
    )
    return_lse = check_flag(return_lse, "return_lse")
    out, lse = module.forward(q, k, v, branches, causal, scale, offsets)
    return (out, lse) if return_lse else out


def dilated_attention_backward(
    dout, q, k, v, out, lse, segment_lengths, dilation_rates, *, causal=False, scale=None, offsets="paper", backend="numpy"
):
    """Exact gradient of :func:`dilated_attention` w.r.t. ``q, k, v`` (SPEC §5).

    ``out`` and ``lse`` are the forward's results (``return_lse=True``). With
    ``Dsum = rowsum(dout * out)`` every branch runs the FlashAttention-2 backward on its sparse
    segments with ``P = exp(scale q.k - LSE)`` and ``dS = P * (dP - Dsum)``; the gradients are
    scattered back and summed over branches. Returns ``(dq, dk, dv)``.
    """
    module, branches, causal, scale, offsets = _check_config(
        backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets
    )
    check_gradient_inputs(dout, out, lse, q, v, backend)
    return module.backward(dout, q, k, v, out, lse, branches, causal, scale, offsets)
