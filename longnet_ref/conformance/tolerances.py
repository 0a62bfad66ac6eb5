"""The kit's one tolerance table: every comparison the kit makes takes its bound from here.

Unit roundoff ``u``: 6.0e-8 in float32, 1.1e-16 in float64. The kit's inputs are unit normal,
``N <= 24``, ``D <= 24``, at most 3 branches, so scores are O(1..10) and outputs, convex
combinations of values, are O(1). An implementation and the oracle (float64) sum the same terms
in different orders; the longest sum has ``N * branches <= 72`` terms.
"""

from __future__ import annotations

# Forward values against the float64 oracle: ~72 terms of O(1) rounded at u, plus the exp, give
# a few hundred u: 2e-5 in float32 (a bound of 2e-4 leaves room for a float32 matmul's blocking),
# 3e-14 in float64 (1e-10 leaves room for any summation order). A classic mistake (a key counted
# once instead of twice, a padding key in a softmax, 1/D for 1/sqrt(D)) moves outputs by O(0.01-1).
VALUES = {
    "float32": dict(rtol=2e-4, atol=2e-4),
    "float64": dict(rtol=1e-10, atol=1e-10),
}

# Which keys a row attends, read from one-hot values (SPEC §2 probe): with q, k scaled by 0.3 a
# weight is at least e^{-2}/72 > 1e-3, and a key not attended contributes an exact 0 (0 * weight).
# 1e-5 separates the two in both dtypes.
SUPPORT = {"float32": 1e-5, "float64": 1e-5}

# The gradient against central differences of the implementation's own forward, along a random
# direction (a scalar): truncation eps^2 |f'''| plus cancellation u |f| / eps. float64 with
# eps = 1e-6: ~1e-12 + 1e-9 -> 1e-6; float32 with eps = 1e-2: ~1e-4 + 6e-5 * 10 -> 2e-2
# (relative to the directional derivative, with the same absolute floor). A backward that treats
# the mixture weights as constants is wrong by O(0.1) relative (docs/backward.md: 36-39 %).
FINITE_DIFFERENCES = {
    "float32": dict(eps=1e-2, rtol=2e-2, atol=2e-2),
    "float64": dict(eps=1e-6, rtol=1e-6, atol=1e-6),
}

# The gradient against the oracle's exact gradient: the forward's sums, then dS = P (dP - Dsum),
# a difference of O(1) terms: ~10x the forward's bound.
GRADIENTS = {
    "float32": dict(rtol=2e-3, atol=2e-3),
    "float64": dict(rtol=1e-9, atol=1e-9),
}
