"""A vectorisable ``exp`` for softmax arguments, in one plain loop LLVM turns into SIMD code.

``np.exp`` inside ``@njit`` is a scalar libm call (no SVML with PyPI's llvmlite), about
0.2 G exp/s per core: one exp per 256 FLOPs at D = 64 caps a fused attention kernel near half
the GEMM rate (``PERF-NOTES.md``). Here, in the input's own precision, in a single pass:

    n = round(x log2(e)),   f = x - n ln2_hi - n ln2_lo   (Cody-Waite: f exact to ~1 ulp)
    exp(f) = Taylor polynomial, |f| <= ln(2)/2: degree 7 (float32), 13 (float64)
    2^n     = the float whose bits are (n + bias) << mantissa_bits (a scalar bit-cast)
    exp(x)  = exp(f) * 2^n   (exact: a product with a power of two)

**Error bound** (the one statement of it; ``docs/numba.md`` quotes it): the Taylor truncation is
(ln2/2)^8/8! = 5e-9 (float32) and (ln2/2)^14/14! = 4e-18 (float64), below the unit roundoff, so
the error is rounding in Horner's scheme and in ``f``: **max relative error <= 1.5e-7 in float32
(about 2.5 ulp) and <= 4.5e-16 in float64**, the bounds ``test_vectorised_exp_is_accurate_to_the_
input_precision`` checks over [-87, 0] and [-708, 0] (measured: 7.6e-8 and 2.2e-16).
Arguments below ``-87`` (float32) or ``-708`` (float64), where exp is under the smallest normal
number, give exactly 0 (so ``-inf`` gives 0); NaN stays NaN. Docs: ``docs/numba.md``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

LOG2E = 1.4426950408889634
LN2_HI = 0.693145751953125  # ln 2 rounded to 13 bits: n * LN2_HI is exact for |n| < 2^11
LN2_LO = 1.4286068203094173e-06  # ln 2 - LN2_HI

F32 = [np.float32(1.0 / math.factorial(j)) for j in range(8)]
F64 = [1.0 / math.factorial(j) for j in range(14)]
A0, A1, A2, A3, A4, A5, A6, A7 = F32
B0, B1, B2, B3, B4, B5, B6, B7, B8, B9, B10, B11, B12, B13 = F64
LOW32, LOG2E32, HALF32 = np.float32(-87.0), np.float32(LOG2E), np.float32(0.5)
LN2_HI32, LN2_LO32 = np.float32(LN2_HI), np.float32(LN2_LO)
LOW64 = -708.0
BIAS32 = np.float32(127.0)  # float32 exponent bias


@intrinsic
def bits_as_float(typingctx, bits):
    """The float32 (float64) whose bit pattern is the int32 (int64) ``bits``: no conversion.

    Numba has no scalar bit-cast; this one LLVM ``bitcast`` lets ``2^n`` be built in registers,
    so the exp is one vectorisable loop instead of a second pass over an int view of the output.
    """
    target = {types.int32: types.float32, types.int64: types.float64}.get(bits)
    if target is None:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType() if target == types.float32 else ir.DoubleType())

    return target(bits), codegen


@njit(cache=True, fastmath={"contract"})
def _exp_shifted_f32(scores, shift, out):
    nq, nk = scores.shape
    for i in range(nq):
        m = shift[i]
        for j in range(nk):
            x = scores[i, j] - m
            xc = x if x >= LOW32 else LOW32  # noqa: FURB136 (max() would keep a NaN; NaN -> LOW32 here)
            n = np.floor(xc * LOG2E32 + HALF32)
            f = (x - n * LN2_HI32) - n * LN2_LO32  # from x, not xc: NaN propagates through f
            p = A0 + f * (A1 + f * (A2 + f * (A3 + f * (A4 + f * (A5 + f * (A6 + f * A7))))))
            two_n = bits_as_float(np.int32(np.int32(n + BIAS32) << np.int32(23)))  # n >= -125: a normal number
            out[i, j] = np.float32(0.0) if x < LOW32 else p * two_n


@njit(cache=True, fastmath={"contract"})
def _exp_shifted_f64(scores, shift, out):
    nq, nk = scores.shape
    for i in range(nq):
        m = shift[i]
        for j in range(nk):
            x = scores[i, j] - m
            xc = x if x >= LOW64 else LOW64  # noqa: FURB136 (NaN -> LOW64: n stays a valid exponent)
            n = np.floor(xc * LOG2E + 0.5)
            f = (x - n * LN2_HI) - n * LN2_LO
            p = B0 + f * (
                B1 + f * (B2 + f * (B3 + f * (B4 + f * (B5 + f * (B6 + f * (B7 + f * (B8 + f * (B9 + f * (B10 + f * (B11 + f * (B12 + f * B13)))))))))))
            )
            two_n = bits_as_float((np.int64(n) + 1023) << 52)  # n >= -1021: a normal number
            out[i, j] = 0.0 if x < LOW64 else p * two_n


def exp_shifted_block(scores, shift, out):
    """``out[i, j] = exp(scores[i, j] - shift[i])`` for ``(nq, nk)`` blocks, inside kernels.

    Resolved at compile time to the float32 or float64 loop (only the one needed is compiled).
    The arguments must be <= ~88 (float32) / ~709 (float64); softmax arguments are <= 0.
    """
    raise NotImplementedError("exp_shifted_block is compiled inside kernels; call exp_shifted")


@overload(exp_shifted_block, inline="always")
def _exp_shifted_block_for_dtype(scores, shift, out):
    if scores.dtype == types.float32:
        return lambda scores, shift, out: _exp_shifted_f32(scores, shift, out)
    return lambda scores, shift, out: _exp_shifted_f64(scores, shift, out)


@njit(cache=True)
def exp_shifted(scores, shift, out):
    """``out[i, j] = exp(scores[i, j] - shift[i])`` (the kernels' exp, callable from Python)."""
    exp_shifted_block(scores, shift, out)
