"""A vectorisable ``exp`` for softmax arguments, in plain loops LLVM turns into SIMD code.

``np.exp`` inside ``@njit`` is a scalar libm call (no SVML with PyPI's llvmlite), about
0.2 G exp/s per core: one exp per 256 FLOPs at D = 64 caps a fused attention kernel near half
the GEMM rate (``PERF-NOTES.md``). Here, in the input's own precision:

    n = round(x log2(e)),   r = x - n ln2_hi - n ln2_lo   (Cody-Waite: r exact to ~1 ulp)
    exp(r) = Taylor polynomial, |r| <= ln(2)/2: degree 7 (float32), 13 (float64)
    2^n     added to the exponent bits of exp(r) (an int view of the output)

Truncation error (ln2/2)^8/8! = 5e-9 (float32, below its unit roundoff 6e-8) and
(ln2/2)^14/14! = 4e-18 (float64); measured max relative error 1.2e-7 (float32) and 2.2e-16
(float64) over [-87, 0] (``tests/test_numba_backend.py``). Arguments below ``-87`` (float32) or
``-708`` (float64), where exp is under the smallest normal number, give exactly 0 (so ``-inf``
gives 0); NaN stays NaN. Docs: ``docs/numba.md``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

LOG2E = 1.4426950408889634
LN2_HI = 0.693145751953125  # ln 2 rounded to 13 bits: n * LN2_HI is exact for |n| < 2^11
LN2_LO = 1.4286068203094173e-06  # ln 2 - LN2_HI

F32 = [np.float32(1.0 / math.factorial(j)) for j in range(8)]
F64 = [1.0 / math.factorial(j) for j in range(14)]
A0, A1, A2, A3, A4, A5, A6, A7 = F32
B0, B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, B13 = F64
LOW32, LOG2E32, HALF32 = np.float32(-87.0), np.float32(LOG2E), np.float32(0.5)
LN2_HI32, LN2_LO32 = np.float32(LN2_HI), np.float32(LN2_LO)


@njit(cache=True, fastmath={"contract"})
def _exp_shifted_f32(scores, shift, out, exponents):
    nq, nk = scores.shape
    for i in range(nq):
        m = shift[i]
        for j in range(nk):
            x = scores[i, j] - m
            xc = LOW32 if x < LOW32 else x  # NaN compares false: stays NaN
            n = np.floor(xc * LOG2E32 + HALF32)
            r = (xc - n * LN2_HI32) - n * LN2_LO32
            p = A0 + r * (A1 + r * (A2 + r * (A3 + r * (A4 + r * (A5 + r * (A6 + r * A7))))))
            out[i, j] = np.float32(0.0) if x < LOW32 else p
            exponents[i, j] = np.int32(n) if x >= LOW32 else np.int32(0)  # NaN: no exponent added
    bits = out.reshape(nq * nk).view(np.int32)
    shifts = exponents.reshape(nq * nk)
    for idx in range(nq * nk):
        bits[idx] += shifts[idx] << 23


@njit(cache=True, fastmath={"contract"})
def _exp_shifted_f64(scores, shift, out, exponents):
    nq, nk = scores.shape
    for i in range(nq):
        m = shift[i]
        for j in range(nk):
            x = scores[i, j] - m
            xc = -708.0 if x < -708.0 else x
            n = np.floor(xc * LOG2E + 0.5)
            r = (xc - n * LN2_HI) - n * LN2_LO
            p = B0 + r * (B1 + r * (B2 + r * (B3 + r * (B4 + r * (B5 + r * (B6 + r * (B7 + r * (
                B8 + r * (B9 + r * (B10 + r * (B11 + r * (B12 + r * B13))))))))))))
            out[i, j] = 0.0 if x < -708.0 else p
            exponents[i, j] = np.int64(n) if x >= -708.0 else np.int64(0)
    bits = out.reshape(nq * nk).view(np.int64)
    shifts = exponents.reshape(nq * nk)
    for idx in range(nq * nk):
        bits[idx] += shifts[idx] << 52


@njit(cache=True)
def exp_shifted(scores, shift, out, exponents):
    """``out[i, j] = exp(scores[i, j] - shift[i])`` for C-contiguous ``(nq, nk)`` blocks.

    ``exponents``: int scratch of the same shape and itemsize (int32 / int64). The arguments
    must be <= ~88 (float32) / ~709 (float64); softmax arguments are <= 0.
    """
    if out.itemsize == 4:
        _exp_shifted_f32(scores, shift, out, exponents)
    else:
        _exp_shifted_f64(scores, shift, out, exponents)
