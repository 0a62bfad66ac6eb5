"""The public dilated-attention API (SPEC §6): validate, then dispatch to one backend.

Validation happens here, once, for every backend: no kernel ever sees an input that SPEC §7
rejects. Docs: ``docs/api.md`` (the public API), ``docs/overview.md`` (the idea in one page).
"""

from __future__ import annotations

from typing import Any, Sequence

from .backends import get_backend
from .validation import validate_branches, validate_offset_rule
from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale

ArrayLike = Any  # a NumPy array, or a CuPy array with backend="cupy"


def _check_config(backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets):
    module = get_backend(backend)
    head_dim = check_attention_inputs(q, k, v, backend)[3]
    branches = validate_branches(segment_lengths, dilation_rates)
    offsets = validate_offset_rule(offsets)
    return module, branches, check_flag(causal, "causal"), resolve_scale(scale, head_dim), offsets


def dilated_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
    backend: str = "numpy",
    return_lse: bool = False,
) -> ArrayLike | tuple[ArrayLike, ArrayLike]:
    """Dilated attention of LongNet (paper Eqs. 3-10; SPEC §2-4).

    For each branch ``(w_i, r_i)`` every head attends densely inside the rows of each segment
    that its offset selects, giving ``(o_i, lse_i)``; the branches are mixed as

        out = sum_i exp(lse_i - LSE) o_i,   LSE = log sum_i exp(lse_i).

    Docs: [the mixture](mixture.md), [from scratch](scratch.md) (the same in plain loops).

    Args:
        q: queries ``(B, N, H, D)``, ``float32`` or ``float64`` (on CuPy arrays also ``float16``,
            and ``bfloat16`` with ``backend="cupy"``: computed in float32, ``lse`` then float32).
        k: keys ``(B, N, H, D)``, the dtype of ``q``.
        v: values ``(B, N, H, Dv)``, the dtype of ``q``; ``Dv`` may differ from ``D``.
        segment_lengths: the branches' segment lengths ``w_i``, positive integers.
        dilation_rates: the branches' dilations ``r_i``, positive integers, as many as ``w_i``.
        causal: keep only keys at positions ``<=`` the query's (SPEC §3).
        scale: the score scale; ``1/sqrt(D)`` when ``None``.
        offsets: ``"paper"`` (head ``h`` has offset ``h mod r``) or ``"torchscale"`` (contiguous
            blocks of heads), SPEC §2.
        backend: ``"reference"`` (alias ``"numpy"``: the definition, on NumPy, CuPy or any
            array API arrays), ``"numba"`` (CPU kernels), ``"cupy"`` (the reference on CuPy
            arrays: cuBLAS GEMMs) or ``"cupy-fused"`` (fused Numba-CUDA kernels); see
            [GPU](gpu.md).
        return_lse: also return the log-sum-exp ``LSE`` of every row.

    Returns:
        ``out``, ``(B, N, H, Dv)`` in the dtype of the inputs, or ``(out, lse)`` with
        ``lse (B, N, H)`` if ``return_lse``. A row covered by no branch has ``out = 0`` and
        ``lse = -inf`` (SPEC §4).

    Raises:
        ValueError: bad shapes, dtypes, branch lists, ``offsets`` or ``backend`` (SPEC §7);
            the message names the argument.
        TypeError: an argument of the wrong type (a non-integer ``w``, a non-bool flag).
    """
    module, branches, causal, scale, offsets = _check_config(backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets)
    return_lse = check_flag(return_lse, "return_lse")
    out, lse = module.forward(q, k, v, branches, causal, scale, offsets)
    return (out, lse) if return_lse else out


def dilated_attention_backward(
    dout: ArrayLike,
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    out: ArrayLike,
    lse: ArrayLike,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
    backend: str = "numpy",
) -> tuple[ArrayLike, ArrayLike, ArrayLike]:
    """Exact gradient of [`dilated_attention`][longnet_ref.attention.dilated_attention] w.r.t. ``q, k, v`` (SPEC §5).

    With ``Dsum = rowsum(dout * out)`` every branch runs the FlashAttention-2 backward on its
    sparse segments with ``P = exp(scale q.k - LSE)`` and ``dS = P * (dP - Dsum)``; the
    gradients are scattered back and summed over branches. That this is exact, including the
    dependence of the mixture weights on the scores, is derived in [the backward
    pass](backward.md).

    Args:
        dout: the gradient of the loss with respect to ``out``, ``(B, N, H, Dv)``.
        q: ``(B, N, H, D)``, as given to the forward.
        k: ``(B, N, H, D)``, as given to the forward.
        v: ``(B, N, H, Dv)``, as given to the forward.
        out: the forward's output ``(B, N, H, Dv)``.
        lse: the forward's ``LSE`` ``(B, N, H)`` (``return_lse=True``).
        segment_lengths: as in the forward.
        dilation_rates: as in the forward.
        causal: as in the forward.
        scale: as in the forward.
        offsets: as in the forward.
        backend: as in the forward.

    Returns:
        ``(dq, dk, dv)``, shaped like ``q``, ``k``, ``v``, in their dtype.

    Raises:
        ValueError: as in the forward, and for a ``dout``, ``out`` or ``lse`` of the wrong shape.
        TypeError: an argument of the wrong type.
    """
    module, branches, causal, scale, offsets = _check_config(backend, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets)
    check_gradient_inputs(dout, out, lse, q, v, backend)
    return module.backward(dout, q, k, v, out, lse, branches, causal, scale, offsets)
