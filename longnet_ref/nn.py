"""Layers with explicit forward and backward: LongNet's attention as a drop-in layer.

The CS231n pattern: every layer is two plain functions,

    y, cache = <name>_forward(params, x, ...)
    dx, grads = <name>_backward(params, cache, dy)

``params`` is a dict of arrays, ``grads`` a dict with the same keys (``{}`` for a layer without
parameters, whose ``params`` may be ``None``); the cache holds exactly what the backward needs.
Two layers read better with their natural signatures: ``rope_forward(x, positions)`` /
``rope_backward(cache, dy) -> dx`` (no parameters) and ``cross_entropy_forward(logits, targets)``
/ ``cross_entropy_backward(cache) -> dlogits`` (the end of the graph). Every backward is tested
against central finite differences (``tests/test_nn.py``).

Multi-head attention is one layer whose *kind* is a parameter: ``"dilated"`` (LongNet,
``longnet_ref.dilated_attention`` and its exact backward), ``"dense"`` (softmax attention over
all keys) or ``"window"`` (a blocked local window of the same per-token cost as a dilated
configuration, [`window_for`][]). Its parameters carry torchscale's state-dict names
(``q_proj.weight`` ...), and [`MultiheadDilatedAttention`][] wraps it as a module that loads a
torchscale ``DilatedAttention`` state dict. Docs: ``docs/layer.md``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .attention import dilated_attention, dilated_attention_backward
from .backends import backend_spec, get_backend, to_backend_arrays, to_numpy
from .decode import DenseKVCache, DilatedKVCache
from .dense import dense_attention, dense_attention_backward
from .validation import InputTypeError, check_array, check_choice, check_dtype, check_flag, check_int
from .validation import check_state_dict, check_tokens, validate_branches, validate_offset_rule

ATTENTION_KINDS = ("dilated", "dense", "window")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def subtree(params, prefix):
    """The parameters under a dotted name, with it stripped: ``subtree(p, "h.0.mlp")`` maps
    ``"h.0.mlp.fc1.weight"`` to ``"fc1.weight"``. How a model hands each layer its own dict."""
    start = prefix + "."
    return {name[len(start) :]: value for name, value in params.items() if name.startswith(start)}


def prefixed(grads, prefix):
    """The inverse of [`subtree`][longnet_ref.nn.subtree]: ``prefixed({"weight": dW}, "fc1")`` is ``{"fc1.weight": dW}``."""
    return {f"{prefix}.{name}": value for name, value in grads.items()}


ROW_BLOCK = 1024
"""Rows per block of the row-wise layers (LayerNorm, MLP, cross-entropy): a block's temporaries
(``ROW_BLOCK x 4E`` floats for the MLP) stay in the CPU caches whatever ``N``, so the cost per
token of these layers does not grow with the sequence (issue 19, section 3)."""


def _row_blocks(rows):
    """``slice``s of at most ``ROW_BLOCK`` consecutive rows covering ``range(rows)``."""
    return [slice(start, min(start + ROW_BLOCK, rows)) for start in range(0, rows, ROW_BLOCK)]


# ---------------------------------------------------------------------------------------------
# Linear: y = x W^T + b
# ---------------------------------------------------------------------------------------------


def linear_forward(params, x):
    """``y = x W^T + b`` over any leading dimensions.

    ``params = {"weight": (out, in), "bias": (out,)}`` (``torch.nn.Linear``'s layout);
    ``x (..., in) -> y (..., out)``.
    """
    y = x @ params["weight"].T + params["bias"]  # (..., out)
    return y, x


def linear_backward(params, cache, dy):
    """``dx = dy W``, ``dW = sum dy^T x``, ``db = sum dy`` (sums over the leading dimensions)."""
    x = cache  # (..., in)
    weight = params["weight"]  # (out, in)
    dx = dy @ weight  # (..., in)
    dy2 = dy.reshape(-1, weight.shape[0])  # (M, out), M = prod(leading)
    x2 = x.reshape(-1, weight.shape[1])  # (M, in)
    return dx, {"weight": dy2.T @ x2, "bias": dy2.sum(axis=0)}


# ---------------------------------------------------------------------------------------------
# Embedding: y[b, n] = W[tokens[b, n]]
# ---------------------------------------------------------------------------------------------


def embedding_forward(params, tokens):
    """``y[b, n] = W[tokens[b, n]]``: ``params = {"weight": (V, C)}``, int ``tokens (B, N) -> (B, N, C)``."""
    tokens = check_tokens(tokens, params["weight"].shape[0], ndim=None)
    return params["weight"][tokens], tokens  # (B, N, C)


def embedding_backward(params, cache, dy):
    """``dW[v] = sum_{(b, n): tokens[b, n] = v} dy[b, n]``; tokens are integers, so ``dx = None``."""
    tokens = cache  # (B, N)
    weight = params["weight"]  # (V, C)
    dweight = np.zeros_like(weight)
    ids = tokens.ravel()  # (M,)
    order = np.argsort(ids, kind="stable")  # equal tokens next to each other
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_ids[1:] != sorted_ids[:-1]])) if ids.size else ids[:0]
    # a token repeated adds up: one sum per run of equal ids (np.add.at would scatter row by row)
    dweight[sorted_ids[starts]] = np.add.reduceat(dy.reshape(-1, weight.shape[1])[order], starts, axis=0) if ids.size else 0
    return None, {"weight": dweight}


# ---------------------------------------------------------------------------------------------
# LayerNorm: y = g * (x - mu) / sqrt(var + eps) + b over the last axis
# ---------------------------------------------------------------------------------------------

LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default


def layernorm_forward(params, x, eps=LAYERNORM_EPS):
    """``xhat = (x - mean(x)) / sqrt(var(x) + eps)``, ``y = g * xhat + b`` over the last axis.

    ``params = {"weight": g (C,), "bias": b (C,)}``, ``x (..., C) -> y (..., C)``; ``var`` is the
    biased variance (divides by ``C``), as in ``torch.nn.LayerNorm``. Computed over blocks of
    ``ROW_BLOCK`` rows into preallocated outputs (the temporaries stay in cache).
    """
    width = x.shape[-1]
    x2 = x.reshape(-1, width)  # (M, C)
    dtype = np.result_type(x, params["weight"])
    xhat, y = np.empty(x2.shape, dtype), np.empty(x2.shape, dtype)  # (M, C)
    rstd = np.empty((x2.shape[0], 1), dtype)  # (M, 1)
    for rows in _row_blocks(x2.shape[0]):
        centred = x2[rows] - x2[rows].mean(axis=-1, keepdims=True)  # (rows, C)
        rstd[rows] = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
        np.multiply(centred, rstd[rows], out=xhat[rows])
        np.multiply(xhat[rows], params["weight"], out=y[rows])
        y[rows] += params["bias"]
    return y.reshape(x.shape), (xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,)))


def layernorm_backward(params, cache, dy):
    """With ``dxhat = dy * g``:

        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))   (means over the last axis)
        dg = sum dy * xhat,   db = sum dy                                (sums over leading axes)

    Over blocks of ``ROW_BLOCK`` rows; ``dg``, ``db`` accumulate the blocks' sums.
    """
    xhat, rstd = cache  # (..., C), (..., 1)
    width = xhat.shape[-1]
    xhat2, rstd2, dy2 = xhat.reshape(-1, width), rstd.reshape(-1, 1), dy.reshape(-1, width)  # (M, C), (M, 1), (M, C)
    dtype = np.result_type(dy, xhat)
    dx = np.empty(dy2.shape, dtype)
    dweight, dbias = np.zeros(width, dtype), np.zeros(width, dtype)
    for rows in _row_blocks(dy2.shape[0]):
        dxhat = dy2[rows] * params["weight"]  # (rows, C)
        dweight += (dy2[rows] * xhat2[rows]).sum(axis=0)
        dbias += dy2[rows].sum(axis=0)
        correction = dxhat.mean(axis=-1, keepdims=True) + xhat2[rows] * (dxhat * xhat2[rows]).mean(axis=-1, keepdims=True)
        np.multiply(rstd2[rows], dxhat - correction, out=dx[rows])
    return dx.reshape(dy.shape), {"weight": dweight, "bias": dbias}


# ---------------------------------------------------------------------------------------------
# GELU, tanh approximation (GPT-2's): y = x/2 (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi)
# ---------------------------------------------------------------------------------------------

GELU_C = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def gelu_forward(params, x):
    """``y = x/2 (1 + tanh(u))``, ``u = c (x + 0.044715 x^3)``: the tanh approximation of GELU
    (GPT-2, ``torch.nn.GELU(approximate="tanh")``), not the exact ``x Phi(x)``. ``params`` is unused."""
    t = np.tanh(GELU_C * (x + GELU_CUBIC * (x * x * x)))  # x * x * x: two multiplies, not a pow call
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_backward(params, cache, dy):
    """``dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2)``, ``t = tanh(u)``."""
    x, t = cache
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * GELU_CUBIC * x * x)
    return dy * slope, {}


# ---------------------------------------------------------------------------------------------
# MLP: y = fc2(gelu(fc1(x)))
# ---------------------------------------------------------------------------------------------


def mlp_forward(params, x):
    """``y = fc2(gelu(fc1(x)))``; params ``fc1.weight (F, C)``, ``fc1.bias (F,)``,
    ``fc2.weight (C, F)``, ``fc2.bias (C,)``; ``x (..., C) -> y (..., C)``.

    Over blocks of ``ROW_BLOCK`` rows: a block's ``gelu`` temporaries stay in cache. The cache
    keeps ``x`` and ``fc1(x)``; the backward recomputes ``gelu`` block by block (one ``tanh``
    per hidden unit) instead of storing two more ``(..., F)`` arrays.
    """
    fc1, fc2 = subtree(params, "fc1"), subtree(params, "fc2")
    width = x.shape[-1]
    x2 = x.reshape(-1, width)  # (M, C)
    dtype = np.result_type(x, fc1["weight"])
    hidden = np.empty((x2.shape[0], fc1["weight"].shape[0]), dtype)  # (M, F) fc1(x)
    y = np.empty((x2.shape[0], fc2["weight"].shape[0]), dtype)  # (M, C)
    for rows in _row_blocks(x2.shape[0]):
        hidden[rows], _ = linear_forward(fc1, x2[rows])
        activated, _ = gelu_forward(None, hidden[rows])  # (rows, F)
        y[rows], _ = linear_forward(fc2, activated)
    return y.reshape(x.shape[:-1] + (y.shape[1],)), (x2, hidden)


def mlp_backward(params, cache, dy):
    """The chain rule through the three layers, last first: fc2, GELU, fc1; block by block, the
    weight gradients summed over the blocks."""
    x2, hidden = cache  # (M, C), (M, F)
    fc1, fc2 = subtree(params, "fc1"), subtree(params, "fc2")
    dy2 = dy.reshape(-1, dy.shape[-1])  # (M, C)
    dx = np.empty(x2.shape, np.result_type(dy, x2))
    grads = {name: np.zeros_like(value) for name, value in params.items()}
    for rows in _row_blocks(dy2.shape[0]):
        activated, gelu_cache = gelu_forward(None, hidden[rows])  # recomputed: (rows, F)
        dactivated, fc2_grads = linear_backward(fc2, activated, dy2[rows])  # (rows, F)
        dhidden, _ = gelu_backward(None, gelu_cache, dactivated)
        dx[rows], fc1_grads = linear_backward(fc1, x2[rows], dhidden)  # (rows, C)
        for name, g in {**prefixed(fc1_grads, "fc1"), **prefixed(fc2_grads, "fc2")}.items():
            grads[name] += g
    return dx.reshape(dy.shape[:-1] + (x2.shape[1],)), grads


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE, Su et al., arXiv 2104.09864)
# ---------------------------------------------------------------------------------------------


def rope_angles(positions, head_dim, base=10000.0):
    """``theta[..., n, j] = positions[..., n] * base^(-2j / D)``, ``j = 0 .. D/2 - 1``: ``(..., N, D/2)``."""
    inverse_frequency = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (D/2,)
    return np.asarray(positions, dtype=np.float64)[..., None] * inverse_frequency  # (..., N, D/2)


def rope_forward(x, positions, base=10000.0):
    """Rotate each pair ``(x[2j], x[2j+1])`` of every head by the angle ``theta_j(n)``:

        y[2j]   = x[2j] cos theta - x[2j+1] sin theta
        y[2j+1] = x[2j] sin theta + x[2j+1] cos theta

    (the RoFormer paper's interleaved pairs). ``x (B, N, H, D)`` with ``D`` even;
    ``positions``: integers ``(N,)`` or ``(B, N)``. Then ``q_m . k_n`` depends on ``m - n`` only.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dimension D, got D = {head_dim}")
    positions = np.asarray(positions)
    if positions.shape not in ((x.shape[1],), tuple(x.shape[:2])):
        raise ValueError(f"positions must have shape (N,) or (B, N) = {tuple(x.shape[:2])}, got {positions.shape}")
    theta = rope_angles(positions, head_dim, base)[..., None, :]  # (B or 1, N, 1, D/2)
    cos, sin = np.cos(theta).astype(x.dtype), np.sin(theta).astype(x.dtype)
    return _rotate_pairs(x, cos, sin), (cos, sin)


def rope_backward(cache, dy):
    """A rotation is orthogonal, so ``dx = R(theta)^T dy = R(-theta) dy``: the inverse rotation."""
    cos, sin = cache
    return _rotate_pairs(dy, cos, -sin)


def _rotate_pairs(x, cos, sin):
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, N, H, D/2) each
    y = np.empty_like(x)
    y[..., 0::2] = even * cos - odd * sin
    y[..., 1::2] = even * sin + odd * cos
    return y


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy: loss = -mean_{unmasked (b, n)} log softmax(logits[b, n])[target]
# ---------------------------------------------------------------------------------------------


def cross_entropy_forward(logits, targets, mask=None, count=None):
    """``loss = -(1/M) sum_{(b, n) in mask} log softmax(logits[b, n])[targets[b, n]]``, ``M = |mask|``.

    ``logits (B, N, V)``, integer ``targets (B, N)``, optional bool ``mask (B, N)`` (``None`` =
    every position). The log-softmax is the stable ``z - max z - log sum exp(z - max z)``.
    ``count`` overrides ``M`` (default ``|mask|``): a rank of ``longnet_ref.parallel`` holds part
    of the sequence and divides by the targets of *all* ranks, so the ranks' losses add up.
    """
    check_array(logits, "logits", 3)
    targets = check_tokens(targets, logits.shape[-1], "targets", ndim=None)
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have shape (B, N) = {logits.shape[:2]}, got {targets.shape}")
    mask = np.ones(targets.shape, bool) if mask is None else np.asarray(mask)
    if mask.shape != targets.shape or mask.dtype != bool:
        raise ValueError(f"mask must be a bool array of shape (B, N) = {targets.shape}, got {mask.dtype} {mask.shape}")
    if count is None:
        count = int(mask.sum())
        if count == 0:
            raise ValueError("mask selects no target: the mean loss is undefined")
    elif check_int(count, "count", minimum=1) < mask.sum():
        raise ValueError(f"count must be at least the mask's {int(mask.sum())} targets, got {count!r}")
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (M, V), (M,)
    probs = np.empty(flat_logits.shape, np.result_type(logits.dtype, np.float32))  # (M, V) softmax
    picked = np.empty(flat_targets.shape, probs.dtype)  # (M,) log softmax at the target
    for rows in _row_blocks(flat_targets.size):  # a block's temporaries stay in cache
        shifted = flat_logits[rows] - flat_logits[rows].max(axis=-1, keepdims=True)  # max 0: exp cannot overflow
        exp = np.exp(shifted, out=probs[rows])  # (rows, V)
        total = exp.sum(axis=-1, keepdims=True)  # (rows, 1)
        exp /= total
        picked[rows] = np.take_along_axis(shifted, flat_targets[rows, None], axis=-1)[:, 0] - np.log(total[:, 0])
    weights = mask / count  # (B, N): 1/M on the unmasked targets, 0 elsewhere
    loss = -(weights * picked.reshape(targets.shape)).sum()
    return loss, (probs.reshape(logits.shape), targets, weights.astype(probs.dtype))


def cross_entropy_backward(cache, dloss=1.0):
    """``dlogits[b, n] = dloss * w[b, n] * (softmax(logits[b, n]) - onehot(targets[b, n]))``, ``w = mask / M``."""
    probs, targets, weights = cache
    dlogits = probs * weights[..., None]  # (B, N, V)
    np.put_along_axis(dlogits, targets[..., None], np.take_along_axis(dlogits, targets[..., None], -1) - weights[..., None], -1)
    return dloss * dlogits


# ---------------------------------------------------------------------------------------------
# Multi-head attention of kind "dilated" | "dense" | "window"
# ---------------------------------------------------------------------------------------------


def window_for(segment_lengths, dilation_rates) -> int:
    """The blocked window ``W`` of the same per-token cost as a dilated configuration:

        W = ceil( sum_i w_i / r_i^2 )

    Why ``w / r^2``: in branch ``i`` a head keeps ``w/r`` of the ``w`` rows of a segment and each
    kept row attends the ``w/r`` kept keys, so the branch scores ``(w/r)^2`` pairs per ``w``
    tokens, ``w/r^2`` per token per head (the paper's Eqs. 16-18; ``complexity.closed_form_flops``).
    A blocked window of length ``W`` scores ``W`` pairs per token. (``sum_i ceil(w_i / r_i)``, the
    number of keys one *covered* query sees, would be a more generous window: every row of a
    window attends, while a dilated head covers only ``1/r_i`` of the rows of each branch.)
    """
    branches = validate_branches(segment_lengths, dilation_rates)
    return math.ceil(sum(Fraction(b.segment_length, b.dilation**2) for b in branches))


def _attention_pattern(kind, segment_lengths, dilation_rates, window):
    """The branches that realise ``kind``, or ``None`` for the dense oracle.

    A blocked window of length ``W`` is dilated attention with one branch ``(W, 1)``: each token
    attends its own block of ``W`` (causally: its block's prefix); so it runs on every backend
    and decodes with the same bounded KV cache. Dense is one branch ``(N, 1)``.
    """
    check_choice(kind, "kind", ATTENTION_KINDS)
    if kind == "dilated":
        if segment_lengths is None or dilation_rates is None:
            raise ValueError("kind='dilated' needs segment_lengths and dilation_rates (the branches), got None")
        branches = validate_branches(segment_lengths, dilation_rates)
        return [b.segment_length for b in branches], [b.dilation for b in branches]
    if kind == "window":
        if window is None:
            if segment_lengths is None or dilation_rates is None:
                raise ValueError("kind='window' needs window, or segment_lengths and dilation_rates to derive it")
            window = window_for(segment_lengths, dilation_rates)
        return [check_int(window, "window", minimum=1)], [1]
    return None  # dense


def _check_attention_input(params, x, num_heads):
    """Validate ``x (B, N, C)`` and the projections; return ``(B, N, C, H, D)``."""
    check_array(x, "x", 3)  # (B, N, C): the projections run in NumPy whatever the backend
    num_heads = check_int(num_heads, "num_heads", minimum=1)
    batch, n, embed_dim = x.shape
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    params = check_state_dict(params, attention_shapes(embed_dim))
    dtypes = sorted({str(value.dtype) for value in params.values()})
    if dtypes != [str(x.dtype)]:
        raise InputTypeError(f"x has dtype {x.dtype} but the params have {', '.join(dtypes)}; they must match")
    return batch, n, embed_dim, num_heads, embed_dim // num_heads


def attention_shapes(embed_dim):
    """The parameter names and shapes, torchscale's state dict of ``DilatedAttention``."""
    shapes = {}
    for name in PROJECTIONS:
        shapes[f"{name}.weight"] = (embed_dim, embed_dim)
        shapes[f"{name}.bias"] = (embed_dim,)
    return shapes


def attention_forward(
    params,
    x,
    *,
    num_heads,
    kind,
    segment_lengths=None,
    dilation_rates=None,
    window=None,
    causal=False,
    offsets="paper",
    backend="numpy",
    rope=False,
    positions=None,
    kv_cache=None,
    core=None,
):
    """Multi-head self-attention of kind ``"dilated"``, ``"dense"`` or ``"window"``:

        q, k, v = x Wq^T + bq, x Wk^T + bk, x Wv^T + bv       # (B, N, C) -> (B, N, H, C/H)
        q, k    = rope(q), rope(k)                               # only if rope=True
        o       = attention_kind(q, k, v), scale (C/H)^-1/2      # (B, N, H, C/H)
        y       = o Wo^T + bo                                    # (B, N, C)

    ``attention_kind`` is ``dilated_attention`` with the given branches (SPEC §2-4), softmax over
    all keys (``dense``), or one branch ``(W, 1)`` (``window``; ``W = window`` or
    [`window_for`][] of the branches). ``params``: ``{q,k,v,out}_proj.{weight (C, C), bias (C,)}``
    in ``x``'s dtype. ``positions`` (``(N,)`` or ``(B, N)``, default ``0..N-1``) feed RoPE.
    With a GPU backend (``"cupy"``, ``"cupy-fused"``) only the attention runs on the GPU, on CuPy
    copies of ``q, k, v`` (the registry's ``arrays``); the projections stay NumPy.

    ``kv_cache`` (a :class:`~longnet_ref.decode.DilatedKVCache` of the kind's branches, or a
    :class:`~longnet_ref.decode.DenseKVCache` for ``"dense"``; causal only) makes ``x`` the rows
    ``t .. t + N - 1`` after the ``t = kv_cache.position`` rows it holds: a prompt at ``t = 0``
    (the cache's prefill: the parallel causal forward, then the cache keeps what later rows need)
    or one new row (its step). ``positions`` then default to ``t .. t + N - 1``. Decoding only:
    the returned cache does not support :func:`attention_backward`.

    ``core``, if given, computes ``attention_kind`` in place of the single-process functions: an
    object with ``forward(q, k, v, branches, options) -> (o, lse)`` and ``backward(do, q, k, v,
    o, lse, branches, options) -> (dq, dk, dv)`` (``longnet_ref.parallel``'s sequence-parallel
    attention, where ``x`` is one rank's chunk and ``positions`` its global positions).
    """
    batch, n, embed_dim, heads, head_dim = _check_attention_input(params, x, num_heads)
    branches = _attention_pattern(kind, segment_lengths, dilation_rates, window)
    causal, rope = check_flag(causal, "causal"), check_flag(rope, "rope")
    offsets = validate_offset_rule(offsets)
    get_backend(backend)  # an unknown name, or a GPU backend without CuPy, fails before any work
    if rope and head_dim % 2:
        raise ValueError(f"rope needs an even head dimension (the width over the number of heads), got {head_dim}")
    if branches is None and backend_spec(backend).name != "reference":
        branches = [max(n, 1)], [1]  # dense on a fast backend: one full segment, no dilation

    split = lambda t: t.reshape(batch, n, heads, head_dim)  # (B, N, C) -> (B, N, H, D)
    q, q_cache = linear_forward(subtree(params, "q_proj"), x)  # (B, N, C)
    k, k_cache = linear_forward(subtree(params, "k_proj"), x)
    v, v_cache = linear_forward(subtree(params, "v_proj"), x)
    q, k, v = split(q), split(k), split(v)  # (B, N, H, D)
    rope_cache = None
    if positions is None:
        positions = np.arange(n) + (0 if kv_cache is None else kv_cache.position)
    if rope:
        q, q_rope = rope_forward(q, positions)  # (B, N, H, D)
        k, k_rope = rope_forward(k, positions)
        rope_cache = (q_rope, k_rope)

    options = {"causal": causal, "offsets": offsets, "backend": backend}
    if core is not None:  # sequence-parallel: longnet_ref.parallel
        o, lse = core.forward(q, k, v, branches, options)  # (B, N, H, D), (B, N, H)
    elif kv_cache is None:
        o, lse = _attention_core(q, k, v, branches, options)  # (B, N, H, D), (B, N, H)
    else:
        o, lse = _cached_attention(kv_cache, q, k, v, kind, branches, causal)  # rows t .. t + N - 1
    y, out_cache = linear_forward(subtree(params, "out_proj"), o.reshape(batch, n, embed_dim))  # (B, N, C)
    cache = {
        "projections": (q_cache, k_cache, v_cache, out_cache),
        "qkv": (q, k, v),
        "o": o,
        "lse": lse,
        "branches": branches,
        "options": options,
        "rope": rope_cache,
        "core": core,
    }
    return y, cache


def attention_backward(params, cache, dy):
    """Backward of [`attention_forward`][], last layer first:

    do            = dy Wo,  dWo = sum dy^T o,  dbo = sum dy
    dq, dk, dv    = exact attention backward (SPEC §5; FA2 with the stored LSE)
    dq, dk        = rope^T(dq), rope^T(dk)          # the inverse rotation, if RoPE
    dx            = dq Wq + dk Wk + dv Wv           # x feeds all three projections
    """
    if not isinstance(cache, dict) or "qkv" not in cache:
        raise InputTypeError(f"cache must be the cache returned by attention_forward, got {type(cache).__name__}")
    q_cache, k_cache, v_cache, out_cache = cache["projections"]
    q, k, v = cache["qkv"]
    batch, n, heads, head_dim = q.shape
    check_array(dy, "dy", 3)
    if dy.shape != (batch, n, heads * head_dim):
        raise ValueError(f"dy must have the forward output's shape {(batch, n, heads * head_dim)}, got {dy.shape}")
    do, out_grads = linear_backward(subtree(params, "out_proj"), out_cache, dy)  # (B, N, C)
    do = do.reshape(batch, n, heads, head_dim)  # (B, N, H, D)
    core_backward = _attention_core_backward if cache.get("core") is None else cache["core"].backward
    dq, dk, dv = core_backward(do, q, k, v, cache["o"], cache["lse"], cache["branches"], cache["options"])
    if cache["rope"] is not None:
        q_rope, k_rope = cache["rope"]
        dq, dk = rope_backward(q_rope, dq), rope_backward(k_rope, dk)
    merge = lambda t: t.reshape(batch, n, heads * head_dim)  # (B, N, H, D) -> (B, N, C)
    dx_q, q_grads = linear_backward(subtree(params, "q_proj"), q_cache, merge(dq))
    dx_k, k_grads = linear_backward(subtree(params, "k_proj"), k_cache, merge(dk))
    dx_v, v_grads = linear_backward(subtree(params, "v_proj"), v_cache, merge(dv))
    grads = {}
    for name, g in (("q_proj", q_grads), ("k_proj", k_grads), ("v_proj", v_grads), ("out_proj", out_grads)):
        grads.update(prefixed(g, name))
    return dx_q + dx_k + dx_v, grads


def _cached_attention(cache, q, k, v, kind, branches, causal):
    """Rows ``t .. t + N - 1`` of causal attention through a KV cache at position ``t``:
    ``cache.prefill`` for a prompt (``t = 0``), ``cache.step`` for one new row."""
    if not causal:
        raise ValueError("kv_cache needs causal=True (decoding is causal)")
    if kind == "dense":
        matches = isinstance(cache, DenseKVCache)
    else:  # dilated, or window = one branch (W, 1): the cache must hold these branches
        matches = isinstance(cache, DilatedKVCache) and (list(cache.segment_lengths), list(cache.dilation_rates)) == (list(branches[0]), list(branches[1]))
    if not matches:
        raise ValueError(f"kv_cache must be the cache of this {kind} attention, got {type(cache).__name__}")
    if cache.position == 0:
        return cache.prefill(q, k, v)  # (B, N, H, D), (B, N, H)
    if q.shape[1] != 1:
        raise ValueError(f"a kv_cache at position {cache.position} takes one new row at a time, got {q.shape[1]}")
    o, lse = cache.step(q[:, 0], k[:, 0], v[:, 0])  # (B, H, D), (B, H)
    return o[:, None], lse[:, None]


def _attention_core(q, k, v, branches, options):
    """``(o, lse)`` of dense (``branches=None``) or dilated attention, on ``options["backend"]``."""
    if branches is None:
        return dense_attention(q, k, v, causal=options["causal"], return_lse=True)
    q, k, v = (to_backend_arrays(t, options["backend"]) for t in (q, k, v))  # CuPy for a GPU backend
    o, lse = dilated_attention(q, k, v, *branches, return_lse=True, **options)
    return to_numpy(o), to_numpy(lse)


def _attention_core_backward(do, q, k, v, o, lse, branches, options):
    if branches is None:
        return dense_attention_backward(do, q, k, v, o, lse, causal=options["causal"])
    arrays = (to_backend_arrays(t, options["backend"]) for t in (do, q, k, v, o, lse))
    return tuple(to_numpy(g) for g in dilated_attention_backward(*arrays, *branches, **options))


# ---------------------------------------------------------------------------------------------
# Parameter initialisation (torchscale's MultiheadAttention.reset_parameters)
# ---------------------------------------------------------------------------------------------


def init_linear(rng, in_features, out_features, *, dtype=np.float64, gain=1.0, zero_bias=False):
    """Xavier-uniform weight ``U(-a, a)``, ``a = gain sqrt(6 / (in + out))``; bias
    ``U(-1/sqrt(in), 1/sqrt(in))`` (``torch.nn.Linear``'s default) or zero."""
    bound = gain * math.sqrt(6.0 / (in_features + out_features))
    weight = rng.uniform(-bound, bound, (out_features, in_features))
    bias = np.zeros(out_features) if zero_bias else rng.uniform(-1, 1, out_features) / math.sqrt(in_features)
    return {"weight": weight.astype(dtype), "bias": bias.astype(dtype)}


def init_embedding(rng, vocab_size, embed_dim, *, dtype=np.float64, std=0.02):
    """``W ~ N(0, std^2)``, ``(V, C)`` (GPT-2's 0.02)."""
    return {"weight": (std * rng.standard_normal((vocab_size, embed_dim))).astype(dtype)}


def init_layernorm(embed_dim, *, dtype=np.float64):
    """``g = 1``, ``b = 0``: the identity affine map."""
    return {"weight": np.ones(embed_dim, dtype), "bias": np.zeros(embed_dim, dtype)}


def init_mlp(rng, embed_dim, hidden_dim, *, dtype=np.float64):
    """``fc1 (F, C)``, ``fc2 (C, F)``, both [`init_linear`][]."""
    fc1 = init_linear(rng, embed_dim, hidden_dim, dtype=dtype)
    fc2 = init_linear(rng, hidden_dim, embed_dim, dtype=dtype)
    return {**prefixed(fc1, "fc1"), **prefixed(fc2, "fc2")}


def init_attention(rng, embed_dim, *, dtype=np.float64):
    """torchscale's initialisation: q, k, v Xavier with gain ``1/sqrt(2)``, out Xavier, out bias 0."""
    params = {}
    for name in PROJECTIONS:
        gain = 1.0 if name == "out_proj" else 1.0 / math.sqrt(2.0)
        linear = init_linear(rng, embed_dim, embed_dim, dtype=dtype, gain=gain, zero_bias=name == "out_proj")
        params.update(prefixed(linear, name))
    return params


# ---------------------------------------------------------------------------------------------
# The drop-in module
# ---------------------------------------------------------------------------------------------


class MultiheadDilatedAttention:
    """LongNet's multi-head dilated attention with torchscale's parameter names.

    A drop-in for ``torchscale.component.dilated_attention.DilatedAttention`` (self-attention,
    no xPos, no sub-LN): ``load_state_dict`` takes its state dict (arrays, or anything with
    ``__array__``, e.g. ``tensor.numpy()``), and with ``offsets="torchscale"`` the outputs agree
    wherever SPEC §8 says torchscale is exact. ``backward`` is the exact gradient, including the
    mixture weights that torchscale detaches.

        layer = MultiheadDilatedAttention(64, 4, [8, 16], [1, 2], causal=True)
        y, cache = layer.forward(x)            # x (B, N, 64) -> y (B, N, 64)
        dx, grads = layer.backward(dy, cache)  # grads: the keys of layer.params
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        segment_lengths,
        dilation_rates,
        *,
        causal=False,
        offsets="paper",
        backend="numpy",
        dtype=np.float64,
        seed=0,
    ):
        self.embed_dim = check_int(embed_dim, "embed_dim", minimum=1)
        self.num_heads = check_int(num_heads, "num_heads", minimum=1)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        branches = validate_branches(segment_lengths, dilation_rates)
        self.segment_lengths = [b.segment_length for b in branches]
        self.dilation_rates = [b.dilation for b in branches]
        self.causal = check_flag(causal, "causal")
        self.offsets = validate_offset_rule(offsets)
        self.dtype = check_dtype(dtype)
        get_backend(backend)  # an unknown name, or a GPU backend without CuPy: one line, up front
        self.backend = backend
        self.params = init_attention(np.random.default_rng(check_int(seed, "seed", minimum=0)), self.embed_dim, dtype=self.dtype)

    def load_state_dict(self, state_dict):
        """Copy ``state_dict``'s arrays into ``params``; a missing, extra or mis-shaped key raises
        ``ValueError`` naming it. Values are converted to this layer's dtype."""
        shapes = attention_shapes(self.embed_dim)
        self.params = check_state_dict(state_dict, shapes, self.dtype, name="state_dict", convert=True)

    def state_dict(self):
        """A copy of ``params``."""
        return {name: value.copy() for name, value in self.params.items()}

    def forward(self, x):
        """``x (B, N, C) -> (y (B, N, C), cache)``: [`attention_forward`][longnet_ref.nn.attention_forward] with ``kind="dilated"``."""
        check_array(x, "x", 3)
        if x.shape[2] != self.embed_dim:
            raise ValueError(f"x must have shape (B, N, {self.embed_dim}) (the layer's params are for embed_dim={self.embed_dim}), got {x.shape}")
        return attention_forward(
            self.params,
            x,
            num_heads=self.num_heads,
            kind="dilated",
            segment_lengths=self.segment_lengths,
            dilation_rates=self.dilation_rates,
            causal=self.causal,
            offsets=self.offsets,
            backend=self.backend,
        )

    def backward(self, dy, cache):
        """``(dx (B, N, C), grads)``, ``grads`` keyed like ``params``: the exact gradient."""
        return attention_backward(self.params, cache, dy)
