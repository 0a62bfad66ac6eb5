"""A brute-force oracle: SPEC §2-5 written as plain Python loops, sharing nothing with longnet_ref.

Everything the library computes is recomputed here from the SPEC text alone, slowly and in
float64, so that a bug in a helper the library shares between its implementations (the index
sets, the softmax core, the backward formulas, the scale) cannot also hide in the oracle:

- the selected rows of a segment by testing every position (not a formula for the row count or
  the library's segment tables), the ``"torchscale"`` offsets by padding the heads and cutting them into
  blocks, the causal rule as ``key <= query``;
- the softmax by a log-sum-exp written here (``logsumexp``) over the attended keys of one query row;
- the backward from the chain rule through the softmax Jacobian ``diag(a) - a a^T``, not from
  the FlashAttention-2 formulas the library uses.

Only attended pairs are ever summed, so a NaN or Inf reaches exactly the rows that attend it.
A row whose logits are all ``-inf`` (no key, or an infinite query) carries no weight: its
``out`` is 0, its ``lse`` is ``-inf``, and it contributes nothing to ``dq``, ``dk``, ``dv``
(SPEC §5): the chain rule below skips it. The loops cost
``O(B H N^2)`` Python steps: keep ``N`` to a few dozen.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def default_scale(head_dim):
    """SPEC §1: scores are ``scale * q.k`` with ``scale = 1/sqrt(D)`` unless given."""
    return 1.0 / math.sqrt(head_dim)


def head_offset(h, dilation, num_heads, rule):
    """SPEC §2: the first row (within its segment) that head ``h`` keeps for dilation ``r``."""
    if rule == "paper":
        return h % dilation
    # torchscale: pad the heads to a multiple of r, then cut them into r equal contiguous blocks;
    # block b starts at row b of every segment.
    padded = dilation * math.ceil(num_heads / dilation)
    blocks = [b for b in range(dilation) for _ in range(padded // dilation)]
    return blocks[h]


def selected_rows(n, h, num_heads, w, r, rule):
    """SPEC §2, tested position by position: ``x`` is selected by head ``h`` of branch ``(w, r)`` iff its
    place ``x mod w`` in its segment is at least the head's offset and a multiple of ``r`` past it."""
    within = np.arange(n) % w  # the row's place in its segment [x - x mod w, x - x mod w + w)
    o = head_offset(h, r, num_heads, rule)
    return (within >= o) & ((within - o) % r == 0)  # (N,)


def multiplicity(n, num_heads, segment_lengths, dilation_rates, causal, rule):
    """``m[h, p, k]``: the number of branches in which head ``h``'s query ``p`` attends key ``k`` (SPEC §4):
    both selected, in the same segment, and (causal) ``k <= p``."""
    positions = np.arange(n)
    m = np.zeros((num_heads, n, n), int)
    for h in range(num_heads):
        for w, r in zip(segment_lengths, dilation_rates):
            selected = selected_rows(n, h, num_heads, w, r, rule)
            linked = selected[:, None] & selected[None, :] & (positions[:, None] // w == positions[None, :] // w)  # (N, N)
            if causal:
                linked &= positions[None, :] <= positions[:, None]
            m[h] += linked
    return m


def multiplicity_bias(m):
    """``log m`` with ``-inf`` where ``m = 0``, ``(H, N, N)`` -> ``(1, H, N, N)``."""
    bias = np.full(m.shape, -np.inf)
    bias[m > 0] = np.log(m[m > 0])
    return bias[None]


def logsumexp(logits):
    """``log sum_j exp(z_j) = m + log sum_j exp(z_j - m)``, ``m = max_j z_j`` (exact for an infinite
    ``m``; NaN if any ``z_j`` is). Written out rather than ``scipy.special.logsumexp``, whose
    per-call overhead (~1 ms) dominated the loops."""
    m = np.max(logits)
    if np.isinf(m):
        return float(m)
    return float(m + np.log(np.sum(np.exp(logits - m))))


def _row(q, k, bias, scale, causal, b, h, p):
    """Attended keys of query row ``(b, p, h)``, their logits and softmax weights."""
    n = q.shape[1]
    keys = [j for j in range(n) if bias[b, h, p, j] != -np.inf and not (causal and j > p)]
    logits = np.array([scale * np.dot(q[b, p, h], k[b, j, h]) + bias[b, h, p, j] for j in keys])
    lse = logsumexp(logits) if keys else -np.inf
    if lse == -np.inf:  # no weight at all: no key, or every logit -inf
        return [], np.zeros(0), lse
    with np.errstate(invalid="ignore"):  # a +inf logit: inf - inf = NaN, the non-finite row SPEC §7 expects
        return keys, np.exp(logits - lse), lse


def _float64(*arrays):
    return tuple(np.asarray(x, np.float64) for x in arrays)


def _bias(bias, q):
    batch, n, num_heads, _ = q.shape
    return np.broadcast_to(np.zeros(()) if bias is None else np.asarray(bias, np.float64), (batch, num_heads, n, n))


def attention(q, k, v, *, bias=None, scale=None, causal=False):
    """Dense softmax attention with additive ``bias`` (SPEC §3-4), one query row at a time.

    ``q, k: (B, N, H, D)``, ``v: (B, N, H, Dv)``, ``bias`` broadcastable to ``(B, H, N, N)``.
    Returns ``out (B, N, H, Dv)`` and ``lse (B, N, H)`` in float64.
    """
    q, k, v = _float64(q, k, v)
    scale = default_scale(q.shape[3]) if scale is None else scale
    bias = _bias(bias, q)
    batch, n, num_heads, _ = q.shape
    out = np.zeros(v.shape)
    lse = np.full((batch, n, num_heads), -np.inf)
    for b in range(batch):
        for h in range(num_heads):
            for p in range(n):
                keys, weights, lse[b, p, h] = _row(q, k, bias, scale, causal, b, h, p)
                for j, a in zip(keys, weights):
                    out[b, p, h] += a * v[b, j, h]
    return out, lse


def attention_gradients(dout, q, k, v, *, bias=None, scale=None, causal=False):
    """``d/d(q, k, v)`` of ``sum(dout * out)`` for :func:`attention`, by the chain rule.

    Per query row ``p`` with weights ``a_j = softmax_j(scale q_p.k_j + bias)``:
    ``out_p = sum_j a_j v_j``, so ``dv_j += a_j dout_p``; ``g_j = dout_p . v_j`` is the
    derivative by ``a_j``, the softmax Jacobian ``J = diag(a) - a a^T`` turns it into the
    derivative by the logits ``dz = J g``, and ``z_j = scale q_p.k_j`` gives
    ``dq_p += scale sum_j dz_j k_j`` and ``dk_j += scale dz_j q_p``.
    """
    dout, q, k, v = _float64(dout, q, k, v)
    scale = default_scale(q.shape[3]) if scale is None else scale
    bias = _bias(bias, q)
    batch, n, num_heads, _ = q.shape
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(batch):
        for h in range(num_heads):
            for p in range(n):
                keys, a, _ = _row(q, k, bias, scale, causal, b, h, p)
                if not keys:
                    continue
                # A NaN or Inf input gives inf - inf or 0 * inf below: the NaN is the chain rule's
                # value for the pairs that attend it (SPEC §7), so NumPy's warning is expected.
                with np.errstate(invalid="ignore"):
                    g = np.array([np.dot(dout[b, p, h], v[b, j, h]) for j in keys])  # d loss / d a
                    jacobian = np.diag(a) - np.outer(a, a)  # d a / d z
                    dz = jacobian @ g  # d loss / d z
                    for j, a_j, dz_j in zip(keys, a, dz):
                        dv[b, j, h] += a_j * dout[b, p, h]
                        dq[b, p, h] += scale * dz_j * k[b, j, h]
                        dk[b, j, h] += scale * dz_j * q[b, p, h]
    return dq, dk, dv


def dilated_attention(q, k, v, segment_lengths, dilation_rates, *, causal=False, scale=None, offsets="paper"):
    """Dilated attention as dense attention with bias ``log m`` (SPEC §4), ``m`` counted by loops."""
    m = multiplicity(q.shape[1], q.shape[2], segment_lengths, dilation_rates, causal, offsets)
    return attention(q, k, v, bias=multiplicity_bias(m), scale=scale, causal=causal)


def dilated_attention_gradients(dout, q, k, v, segment_lengths, dilation_rates, *, causal=False, scale=None, offsets="paper"):
    """The exact gradient of :func:`dilated_attention` (SPEC §5)."""
    m = multiplicity(q.shape[1], q.shape[2], segment_lengths, dilation_rates, causal, offsets)
    return attention_gradients(dout, q, k, v, bias=multiplicity_bias(m), scale=scale, causal=causal)


def central_differences(loss, x, eps):
    """``d loss / d x`` by ``(loss(x + eps e) - loss(x - eps e)) / (2 eps)``, one element at a time.

    ``loss`` takes no argument and reads ``x``, which is perturbed in place and restored.
    """
    grad = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + eps
        plus = loss()
        x[index] = saved - eps
        minus = loss()
        x[index] = saved
        grad[index] = (plus - minus) / (2 * eps)
    return grad


# ---------------------------------------------------------------------------------------------
# The language model of longnet_ref.model, written from its equations
#
# GPT-2 pre-norm blocks with a tied head; attention by the loops above; RoPE as a complex
# rotation ``(x_2j + i x_2j+1) e^{i n theta_j}`` (not the library's cos/sin pairs); the loss as
# ``logsumexp - z_target`` averaged over the mask. ``config`` is a ``LongNetConfig`` (read only).
# ---------------------------------------------------------------------------------------------


def layernorm(x, weight, bias):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)  # biased variance, eps 1e-5 (torch)
    return (x - mu) / np.sqrt(var + 1e-5) * weight + bias


def gelu(x):  # the tanh approximation (GPT-2)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rope(x, positions):
    """Rotate pair ``j`` of every head at position ``n`` by ``n * 10000^(-2j/D)``, as complex numbers."""
    head_dim = x.shape[-1]
    angle = np.asarray(positions, np.float64)[..., None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # (.., N, D/2)
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * angle)[..., None, :]  # (B, N, H, D/2)
    return np.stack([z.real, z.imag], axis=-1).reshape(x.shape)


def window(config):
    """``W = ceil(sum_i w_i / r_i^2)`` (the same per-token cost), unless the config gives it."""
    if config.window is not None:
        return config.window
    return math.ceil(sum(Fraction(w, r * r) for w, r in zip(config.segment_lengths, config.dilation_rates)))


def attention_layer(config, params, prefix, x, positions):
    """Projections, RoPE at ``positions``, the kind's attention by the loop oracle, ``out_proj``."""
    B, N, C = x.shape
    H = config.n_heads
    linear = lambda t, name: t @ params[f"{prefix}{name}.weight"].T + params[f"{prefix}{name}.bias"]
    q, k, v = (linear(x, f"{p}_proj").reshape(B, N, H, C // H) for p in "qkv")  # (B, N, H, D)
    if config.rope:
        q, k = rope(q, positions), rope(k, positions)
    if config.attention == "dense":
        o, _ = attention(q, k, v, causal=config.causal)
    else:
        branches = (config.segment_lengths, config.dilation_rates) if config.attention == "dilated" else ([window(config)], [1])
        o, _ = dilated_attention(q, k, v, *branches, causal=config.causal, offsets=config.offsets)
    return linear(o.reshape(B, N, C), "out_proj")


def lm_logits(config, params, tokens, positions=None):
    """``logits = LN_f(x^L) E^T`` with ``x^l = x' + MLP(LN_2(x'))``, ``x' = x + Attn(LN_1(x))``, ``x^0 = E[t]``;
    RoPE at ``positions`` (default ``0 .. N-1``)."""
    p = params
    linear = lambda t, name: t @ p[name + ".weight"].T + p[name + ".bias"]
    x = p["wte.weight"][tokens]  # (B, N, C)
    positions = np.arange(tokens.shape[1]) if positions is None else np.asarray(positions)
    for layer in range(config.n_layers):
        h = f"h.{layer}."
        x = x + attention_layer(config, p, h + "attn.", layernorm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"]), positions)
        hidden = gelu(linear(layernorm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"]), h + "mlp.fc1"))
        x = x + linear(hidden, h + "mlp.fc2")
    return layernorm(x, p["ln_f.weight"], p["ln_f.bias"]) @ p["wte.weight"].T  # (B, N, V)


def lm_loss(config, params, tokens, targets, mask):
    """``(1/|mask|) sum_{(b, n) in mask} (logsumexp(z[b, n]) - z[b, n, targets[b, n]])``."""
    z = lm_logits(config, params, tokens)
    top = z.max(axis=-1)  # (B, N)
    lse = top + np.log(np.exp(z - top[..., None]).sum(axis=-1))  # (B, N)
    picked = np.take_along_axis(z, targets[..., None], -1)[..., 0]  # (B, N)
    return float(((lse - picked) * mask).sum() / mask.sum())
