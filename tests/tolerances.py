"""The one tolerance table of the test suite: every comparison of floating-point results uses it.

Each entry says which two computations it compares and why the bound holds. Unit roundoff:
``u = 6.0e-8`` (float32), ``1.1e-16`` (float64). Inputs are unit normal unless an entry says
otherwise, so scores, outputs and their sums are O(1..10).
"""

from __future__ import annotations

import numpy as np

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

# The same attention computed two ways that sum in different orders (the library against the
# dense oracle or the loop oracle, which works in float64). The longest sum is over
# N * branches <= 96 * 4 keys, so the rounding of a sum of O(1) terms is bounded by ~400 u:
# 2.4e-5 in float32, 4.4e-14 in float64. The gradients' dS = P * (dP - Dsum) subtract O(1)
# quantities, so their absolute error is of that order times the O(1..10) input magnitudes.
SUMMATION = {
    F32: dict(rtol=1e-4, atol=1e-4),
    F64: dict(rtol=1e-10, atol=1e-11),
}

# The Numba kernels against the NumPy reference (or a float64 oracle): blocks of 128 rows and the
# kernels' own exp (max relative error 1.5e-7 in float32, 4.5e-16 in float64: the bound
# numba_exp states and tests/test_numba_backend.py checks). float64: sums of <= ~3000 terms at
# 1.1e-16 -> ~3e-13 relative; float32: the same sums at 6e-8 plus the exp -> ~2e-4 worst case,
# ~1e-6 typical. (The one table: test_numba_backend.py's own copy now reads this one.)
NUMBA = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=2e-4, atol=2e-5),
}

# Scores of magnitude ~1e4 (q and k scaled by 100). A score's absolute rounding error is
# |score| * u * D: ~1e4 * 1.1e-16 * 4 ~ 5e-12 in float64, ~1e4 * 6e-8 * 4 ~ 2.4e-3 in float32.
# It moves each softmax weight by that relative amount, so outputs (|v| <= ~4) move by a few
# times it (measured: 5e-12 and 3.4e-3). The softmax is saturated, so the exact dq, dk are tiny
# (~1e-6) and dS = P * (dP - Dsum) is a cancellation: the output error enters Dsum and comes out
# as scale * |k| * |dout| * (out error) ~ 0.5 * 300 * 3 * err: ~1e-9 in float64 (measured 7e-10)
# and ~0.5 in float32 (measured 0.44), where dq, dk keep no correct digit. The bound still
# fails a gradient that overflows or loses the max subtraction (errors of 1e4 and more).
LARGE_SCORES_OUT = {
    F64: dict(rtol=1e-7, atol=1e-7),
    F32: dict(rtol=2e-2, atol=2e-2),
}
LARGE_SCORES_LSE = {  # lse ~ 1e4 with the same absolute error as one score: relative u * D
    F64: dict(rtol=1e-10, atol=0),
    F32: dict(rtol=1e-5, atol=0),
}
LARGE_SCORES_GRAD = {
    F64: dict(rtol=1e-7, atol=1e-8),
    F32: dict(rtol=1e-2, atol=2.0),
}

# Central finite differences in float64 with eps = 1e-6: truncation O(eps^2 |f'''|) ~ 1e-11,
# cancellation O(u |f| / eps) ~ 1e-16 * 10 / 1e-6 = 1e-9; a wrong term (e.g. a detached mixture
# weight) is O(0.1).
FINITE_DIFFERENCES = dict(rtol=1e-6, atol=1e-6)
FINITE_DIFFERENCE_STEP = 1e-6

# A handful of float64 operations on Python floats (lr / 10, a warm-up ratio, a cosine) against
# the value written by hand: each rounds at u = 1.1e-16, cos adds ~1 ulp, so 1e-12 relative
# leaves a wide margin, while a wrong schedule or a wrong min_lr is off by 1e-3 relative or more.
SCALAR_ARITHMETIC = dict(rel=1e-12)

# Distributed (float64) against one process: the same terms summed in a different grouping
# over <= 4 ranks and <= 3 branches, N <= 96: well under 1e-12 relative.
DISTRIBUTED = dict(rtol=1e-11, atol=1e-12)

# A GPU path against the NumPy reference: the same sums in other orders (cuBLAS tiles, kernel
# tiles). float64: <= ~3000 terms at 1.1e-16 -> ~3e-13 relative; float32: the same sums at
# 6e-8 -> ~2e-4 worst case on O(1) values, ~1e-6 typical.
GPU = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=2e-4, atol=2e-5),
}

# A decoding step against the parallel forward (or the loop oracle): the same float operations
# per row, but the parallel forward forms a whole segment's scores with one matrix product and a
# step one row, so the D products may be summed in another order: about D * u * |s| with D <= 16
# and |s| <= ~40: float64 ~7e-14 (the 1e-12 holds with margin); float32 ~4e-5, so 5e-5
# (observed <= 1e-6 over 60 random problems). Outputs are convex combinations of O(1) values,
# so the same bound serves absolute and relative.
DECODE_STEP = {
    F64: dict(rtol=1e-12, atol=1e-12),
    F32: dict(rtol=5e-5, atol=5e-5),
}


# Half-precision inputs on the fused GPU kernels (and the CuPy reference path) against the float64
# reference on the same half values: float32 work, the result rounded once to the input type
# (unit roundoff u = 2^-11 float16, 2^-8 bfloat16): out within 2u relative; the backward reads out
# and dout rounded and rounds its result once more: 8u; lse stays float32 (u = 6e-8 over <= 10^4
# terms -> 1e-5). Relative to the result, and absolute relative to its largest magnitude.
def _half_rounding(unit):
    return {"out": 2 * unit, "dq": 8 * unit, "dk": 8 * unit, "dv": 8 * unit, "lse": 1e-5}


HALF_ROUNDING = {"float16": _half_rounding(2.0**-11), "bfloat16": _half_rounding(2.0**-8)}

# Decoded logits (prefill + steps) against the full forward of the language model, relative to the
# logits' largest magnitude: the same operations in other groupings (a cached row vs a segment's
# matrix product) through 2 layers. float64: ~1e3 roundings of 1.1e-16, so 1e-10 is ~1e5 u and far
# below any real difference (O(1)); float32: a few hundred roundings of 6e-8 -> ~1e-5, so 1e-4.
DECODE_LOGITS = {F64: 1e-10, F32: 1e-4}

# The drop-in layer (float64) against projections + dense attention with bias log m: attention
# over <= ~30 keys and 3 branches, then O(E) projections, summed in different orders agree to
# ~1e-14; 1e-10 leaves room and still catches any real error.
LAYER_F64 = dict(rtol=1e-10, atol=1e-11)

# Sequence-parallel training (longnet_ref.parallel) against model.loss_and_grads on the whole
# sequence: the same float operations, but every parameter gradient is summed as P partial sums
# (one per rank, then the all-reduce) instead of one, and the attention's dK, dV of shared
# segments arrive through a reduce-scatter. A gradient is a sum over B * N <= 64 rows of
# products of O(1) factors through <= 2 layers, so its rounding is ~64 u of the tensor's largest
# entry: ~7e-15 in float64 (measured <= 9.4e-16 at P = 2 and 4; the 1e-10 holds with a
# wide margin) and ~4e-6 in float32 (measured <= 1.1e-6, numpy and numba): 2e-5 leaves room for
# the drawn configurations. Relative error = max |difference| / max |reference|, per tensor.
PARALLEL_MODEL = {F64: 1e-10, F32: 2e-5}

# The first loss of a freshly initialised language model (weights N(0, 0.02^2), C = 16) against
# ln V: its logits differ by ~0.02 |h| ~ 0.1, so the softmax is near uniform and the
# cross-entropy is ln V within a few hundredths of a nat (measured: 0.03). A NaN, a zero, or the
# loss of a trained model misses by more than 0.5.
INITIAL_LOSS_NATS = 0.1


# The language model (float64) against its independent transcription in tests/test_model.py
# (loop-oracle attention, complex RoPE): two layers of O(1) activations (perturbed weights ~0.3),
# sums of <= 4C = 32 terms and softmaxes over <= 11 keys/tokens, summed in different orders:
# ~1e-14 relative; 1e-9 leaves room and still fails any wrong term (O(1e-2) or more).
MODEL_F64 = dict(rtol=1e-9, atol=1e-10)

# Initialisation statistics: a sample of n i.i.d. draws. The sample standard deviation's
# standard error is sigma sqrt((kappa - 1) / (4 n)) (kappa: the kurtosis, 3 for a normal, 9/5 for a
# uniform), the sample mean's sigma / sqrt(n). Six standard errors: a correct init fails with
# probability < 2e-9 (and the seeds are fixed, so a run is deterministic), while a wrong gain
# (1 vs 1/sqrt(2), sqrt(L) vs sqrt(2L): >= 15 % off) is many standard errors out at n >= 4096.
# The maximum of n uniform draws on [-a, a] falls below a (1 - delta) with probability
# (1 - delta)^n: delta = 1e-3 at n >= 16384 gives < 1e-7.
INIT_STANDARD_ERRORS = 6
UNIFORM_MAX_SLACK = 1e-3


def sample_std_rtol(count, kurtosis):
    """Relative tolerance of a sample standard deviation of ``count`` draws (see above)."""
    return INIT_STANDARD_ERRORS * ((kurtosis - 1) / (4 * count)) ** 0.5


def sample_mean_atol(count, std):
    """Absolute tolerance of a sample mean of ``count`` draws of standard deviation ``std``."""
    return INIT_STANDARD_ERRORS * std / count**0.5


# A handful of float64 operations on O(1) numbers, the library's against a transcription by hand
# (AdamW steps, the schedule, a RoPE dot product): ~10 roundings of 1.1e-16: 1e-12 leaves room.
HAND_F64 = dict(rtol=1e-12, atol=1e-14)

# A float32 quantity (loss, gradient norm, first moment, a parameter's first step) against the same
# quantity recomputed from float32 gradients in float64: float32 rounding of sums of <= ~1e4 terms,
# ~1e-6 relative; 1e-5 leaves room (a wrong lr, clip factor or beta is off by >= 1e-2).
FLOAT32_RECOMPUTED = dict(rtol=1e-5, atol=1e-9)

# Chi-square goodness of fit of seeded samples: a correct sampler is rejected with probability
# 1e-6 for a random seed (the seeds are fixed, so a run is deterministic); a wrong temperature
# or a wrong top-k gives p < 1e-100 at the sample sizes used (>= 3000 draws).
CHI_SQUARE_P_VALUE = 1e-6


# The tensor-core kernels (and their NumPy emulation, tests/tensor_core_emulation.py) against the
# float64 reference on the same half-precision inputs. The kernels round the softmax weights P
# (backward: P and dS) to the input type before each tensor-core product, as FlashAttention
# does, and the results once more; everything else is float32. Unit roundoff u = 2^-11
# (float16), 2^-8 (bfloat16). out = sum_k P_k v_k with each P_k off by <= u P_k: the error is
# <= u * sum_k P_k |v_k| <= u max|v| (~4u for unit normal v), plus u |out| for the final
# rounding: atol 8u, rtol 2u. lse is float32 from float32 scores: 1e-5 (as half_tolerance in
# tests/test_gpu.py). The gradients sum T products of a rounded weight (u) with O(1..4) rows,
# then are rounded: dv = sum P dO like out (atol 8u); dq, dk = scale sum dS k, with dS rounded
# relative to itself and |dS| <= P (|dP| + |Dsum|) ~ P * 8: atol 32u, rtol 8u.
def _tensor_core_rounding(unit):
    return {
        "out": dict(rtol=2 * unit, atol=8 * unit),
        "lse": dict(rtol=1e-5, atol=1e-5),
        "dv": dict(rtol=8 * unit, atol=8 * unit),
        "dq": dict(rtol=8 * unit, atol=32 * unit),
        "dk": dict(rtol=8 * unit, atol=32 * unit),
    }


TENSOR_CORE_ROUNDING = {"float16": _tensor_core_rounding(2.0**-11), "bfloat16": _tensor_core_rounding(2.0**-8)}
