"""This package's backends in the kit's calling convention, for ``longnet-ref check``:

    longnet-ref check longnet_ref.conformance.targets:numba_forward --backward longnet_ref.conformance.targets:numba_backward

The kit's backward takes no ``out``/``lse``; these wrappers recompute them with the forward.
"""

from __future__ import annotations

from ..attention import dilated_attention, dilated_attention_backward


def _forward(backend):
    def forward(q, k, v, segment_lengths, dilation_rates, *, causal, offsets="paper"):
        return dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=causal, offsets=offsets, backend=backend)

    forward.__name__ = f"{backend}_forward"
    return forward


def _backward(backend):
    def backward(dout, q, k, v, segment_lengths, dilation_rates, *, causal, offsets="paper"):
        common = dict(causal=causal, offsets=offsets, backend=backend)
        out, lse = dilated_attention(q, k, v, segment_lengths, dilation_rates, return_lse=True, **common)
        return dilated_attention_backward(dout, q, k, v, out, lse, segment_lengths, dilation_rates, **common)

    backward.__name__ = f"{backend}_backward"
    return backward


numpy_forward, numpy_backward = _forward("numpy"), _backward("numpy")
numba_forward, numba_backward = _forward("numba"), _backward("numba")
