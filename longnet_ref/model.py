"""A decoder-only LongNet language model, nanoGPT-like, with every backward written out.

LongNet (arXiv 2307.02486) §3: a Transformer whose attention is dilated attention, nothing
else changed. That is what "drop-in" means here: the config field ``attention`` swaps
``"dilated"`` for ``"dense"`` or ``"window"`` and the rest of this file does not change.

The model, for tokens ``t_1..t_N`` (pre-norm blocks, tied embeddings; GPT-2 without dropout):

    x^0    = E[t]                                        (B, N, C)   token embedding
    x^l'   = x^(l-1) + Attn_l(LN_1l(x^(l-1)))                        attention block
    x^l    = x^l' + MLP_l(LN_2l(x^l'))                               MLP block
    logits = LN_f(x^n_layers) E^T                        (B, N, V)   tied output head

Positions enter only through RoPE inside attention (``rope=True``). The backward runs the same
list in reverse; the residual stream's gradient ``dx`` flows through both branches of every
``x + f(x)`` and ``dE`` sums the head's and the embedding's contributions.

The layers (and their backward equations) live in [`longnet_ref.nn`][longnet_ref.nn]; training in
[`longnet_ref.train`][longnet_ref.train]. Docs: ``docs/model.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import nn
from .backends import backend_spec, get_backend
from .validation import InputTypeError, check_array, check_choice, check_dtype, check_flag, check_int
from .validation import check_state_dict, check_tokens, validate_branches, validate_offset_rule

ATTENTION_KINDS = nn.ATTENTION_KINDS  # "dilated" | "dense" | "window"


# ----------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class LongNetConfig:
    """Every number that fixes the model's shape and its attention pattern.

    ``segment_lengths``/``dilation_rates`` are the branches ``(w_i, r_i)`` of dilated attention;
    ``"window"`` attention uses them only to size its window (``nn.window_for``: the same number
    of keys per query as the dilated pattern) unless ``window`` is given; ``"dense"`` ignores them.
    """

    vocab_size: int = 32
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    segment_lengths: tuple[int, ...] = (64, 128, 256)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    attention: str = "dilated"  # "dilated" | "dense" | "window"
    window: int | None = None  # "window" only; None: nn.window_for(segment_lengths, dilation_rates)
    causal: bool = True
    offsets: str = "paper"
    backend: str = "numpy"
    rope: bool = True
    dtype: str = "float64"
    seed: int = 0

    def __post_init__(self):
        # every check from longnet_ref.validation (SPEC §7): wrong type InputTypeError, wrong value ValueError
        for name in ("vocab_size", "d_model", "n_layers", "n_heads"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.seed, "seed", minimum=0)
        check_flag(self.causal, "causal")
        check_flag(self.rope, "rope")
        check_choice(self.attention, "attention", ATTENTION_KINDS)
        backend_spec(self.backend)
        dtype = check_dtype(self.dtype, "dtype")  # float32 or float64
        branches = validate_branches(self.segment_lengths, self.dilation_rates)
        validate_offset_rule(self.offsets)
        if self.window is not None:
            check_int(self.window, "window", minimum=1)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.rope and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rope needs an even head dimension, got d_model // n_heads = {self.d_model // self.n_heads}")
        # a frozen dataclass normalises its own fields this way
        object.__setattr__(self, "segment_lengths", tuple(b.segment_length for b in branches))
        object.__setattr__(self, "dilation_rates", tuple(b.dilation for b in branches))
        object.__setattr__(self, "dtype", dtype.name)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> LongNetConfig:
        if not isinstance(d, dict):
            raise InputTypeError(f"a LongNetConfig is read from a dict of its fields, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LongNetConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# parameters: one flat dict, names like nanoGPT's / torchscale's state dicts


def parameter_shapes(config: LongNetConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every parameter, in a fixed order (the order ``init_params`` draws them)."""
    C, V = config.d_model, config.vocab_size
    shapes = {"wte.weight": (V, C)}
    for layer in range(config.n_layers):
        p = f"h.{layer}."
        shapes |= {p + "ln_1.weight": (C,), p + "ln_1.bias": (C,)}
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"attn.{proj}.weight": (C, C), p + f"attn.{proj}.bias": (C,)}
        shapes |= {p + "ln_2.weight": (C,), p + "ln_2.bias": (C,)}
        shapes |= {p + "mlp.fc1.weight": (4 * C, C), p + "mlp.fc1.bias": (4 * C,)}
        shapes |= {p + "mlp.fc2.weight": (C, 4 * C), p + "mlp.fc2.bias": (C,)}
    shapes |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    return shapes


def parameter_count(config: LongNetConfig) -> int:
    """The number of scalars of :func:`parameter_shapes`, counted without listing them:
    ``V C`` (tied embedding) ``+ n_layers (12 C^2 + 13 C)`` (per block: four ``C x C`` projections and
    an MLP ``C -> 4C -> C`` with their biases, two LayerNorms) ``+ 2 C`` (the final LayerNorm)."""
    C = config.d_model
    return config.vocab_size * C + config.n_layers * (12 * C * C + 13 * C) + 2 * C


def init_params(config: LongNetConfig) -> dict[str, np.ndarray]:
    """GPT-2 initialisation, deterministic from ``config.seed``.

    Weights ``~ N(0, 0.02^2)``; the two projections that write into the residual stream
    (``out_proj``, ``fc2``) ``~ N(0, (0.02 / sqrt(2 n_layers))^2)`` so the stream's variance does not
    grow with depth; biases 0; LayerNorm gains 1.
    """
    rng = np.random.default_rng(config.seed)
    params = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            value = np.ones(shape)
        elif name.endswith(".bias"):
            value = np.zeros(shape)
        else:
            std = 0.02 / np.sqrt(2 * config.n_layers) if name.endswith(("out_proj.weight", "fc2.weight")) else 0.02
            value = rng.normal(0.0, std, shape)
        params[name] = value.astype(config.dtype)
    return params


def check_params(config: LongNetConfig, params: dict) -> None:
    """Every expected name present with its shape and the config's dtype, nothing extra.

    Raises:
        InputTypeError: ``params`` is not a dict of NumPy arrays, or an array's dtype is not the config's.
        ValueError: A missing or unexpected name, or an array of the wrong shape.
    """
    check_state_dict(params, parameter_shapes(config), config.dtype, name="params")


def attention_options(config: LongNetConfig) -> dict:
    """Keyword arguments of ``nn.attention_forward`` that the config fixes."""
    return {
        "num_heads": config.n_heads,
        "kind": config.attention,
        "segment_lengths": list(config.segment_lengths),
        "dilation_rates": list(config.dilation_rates),
        "window": config.window,
        "causal": config.causal,
        "offsets": config.offsets,
        "backend": config.backend,
        "rope": config.rope,
    }


# ----------------------------------------------------------------------------------------------
# forward and backward


def forward(config: LongNetConfig, params: dict, tokens, *, positions=None, kv_caches=None, attention_core=None) -> tuple[np.ndarray, dict]:
    """``logits = LN_f(x^n_layers) E^T`` for ``tokens (B, N)``; returns ``(logits (B, N, V), cache)``.

    ``positions (N,)`` of the tokens feed RoPE (default ``0 .. N-1``). For decoding,
    ``kv_caches`` holds one KV cache per layer (``generate.new_caches``): each layer's attention
    then reads and extends its cache (the tokens are a prompt, or one new token), and
    ``positions`` default to the rows that follow the cached ones.
    ``attention_core`` replaces the single-process attention (``nn.attention_forward``'s ``core``):
    ``longnet_ref.parallel`` passes it, with ``tokens`` one rank's chunk and ``positions`` its global ones.
    """
    if not isinstance(config, LongNetConfig):
        raise InputTypeError(f"config must be a LongNetConfig, got {type(config).__name__}")
    tokens = check_tokens(tokens, config.vocab_size)
    check_params(config, params)
    get_backend(config.backend)  # a GPU backend without CuPy fails here, before the first layer
    attn = attention_options(config)
    kv_caches = [None] * config.n_layers if kv_caches is None else kv_caches
    if len(kv_caches) != config.n_layers:
        raise ValueError(f"kv_caches must hold one cache per layer ({config.n_layers}), got {len(kv_caches)}")
    cache = {"blocks": []}

    x, cache["wte"] = nn.embedding_forward(nn.subtree(params, "wte"), tokens)  # (B, N, C)
    for layer, kv_cache in enumerate(kv_caches):
        p = nn.subtree(params, f"h.{layer}")
        h, c_ln1 = nn.layernorm_forward(nn.subtree(p, "ln_1"), x)
        a, c_attn = nn.attention_forward(nn.subtree(p, "attn"), h, positions=positions, kv_cache=kv_cache, core=attention_core, **attn)
        x += a  # x' = x + Attn(LN_1(x)), in place: x is no layer's cache (the LayerNorms keep xhat)
        h, c_ln2 = nn.layernorm_forward(nn.subtree(p, "ln_2"), x)
        m, c_mlp = nn.mlp_forward(nn.subtree(p, "mlp"), h)
        x += m  # x = x' + MLP(LN_2(x'))
        cache["blocks"].append((c_ln1, c_attn, c_ln2, c_mlp))
    h, cache["ln_f"] = nn.layernorm_forward(nn.subtree(params, "ln_f"), x)  # (B, N, C)
    logits = h @ params["wte.weight"].T  # (B, N, V) tied head: logits = h E^T
    cache["h"] = h
    return logits, cache


def backward(config: LongNetConfig, params: dict, cache: dict, dlogits) -> dict[str, np.ndarray]:
    """Gradients of a scalar loss w.r.t. every parameter, given ``dlogits = dloss/dlogits``.

    Head: ``dh = dlogits E``, ``dE = dlogits^T h`` (flattened over batch and sequence). Each
    residual ``x_out = x_in + f(x_in)`` passes ``dx`` on unchanged and adds ``f``'s input gradient.
    """
    if not isinstance(cache, dict) or "blocks" not in cache:
        raise InputTypeError(f"cache must be the cache returned by forward, got {type(cache).__name__}")
    check_array(dlogits, "dlogits", 3)
    if dlogits.shape != cache["h"].shape[:2] + (config.vocab_size,):
        raise ValueError(f"dlogits must have the logits' shape {cache['h'].shape[:2] + (config.vocab_size,)}, got {dlogits.shape}")
    grads = {}
    C = config.d_model
    dh = dlogits @ params["wte.weight"]  # (B, N, C)
    d_wte_head = dlogits.reshape(-1, dlogits.shape[-1]).T @ cache["h"].reshape(-1, C)  # (V, C)
    dx, g = nn.layernorm_backward(nn.subtree(params, "ln_f"), cache["ln_f"], dh)
    grads |= nn.prefixed(g, "ln_f")
    for layer in reversed(range(config.n_layers)):
        prefix = f"h.{layer}"
        p = nn.subtree(params, prefix)
        c_ln1, c_attn, c_ln2, c_mlp = cache["blocks"][layer]
        dm, g = nn.mlp_backward(nn.subtree(p, "mlp"), c_mlp, dx)
        grads |= nn.prefixed(g, f"{prefix}.mlp")
        dh, g = nn.layernorm_backward(nn.subtree(p, "ln_2"), c_ln2, dm)
        grads |= nn.prefixed(g, f"{prefix}.ln_2")
        dx += dh  # the residual carries dx past the MLP (dx is this function's own array)
        da, g = nn.attention_backward(nn.subtree(p, "attn"), c_attn, dx)
        grads |= nn.prefixed(g, f"{prefix}.attn")
        dh, g = nn.layernorm_backward(nn.subtree(p, "ln_1"), c_ln1, da)
        grads |= nn.prefixed(g, f"{prefix}.ln_1")
        dx += dh  # ... and past the attention
    _, g = nn.embedding_backward(nn.subtree(params, "wte"), cache["wte"], dx)
    grads["wte.weight"] = g["weight"] + d_wte_head  # tied: the table is used twice
    return {name: grads[name] for name in params}  # the params' order


def loss_and_grads(config: LongNetConfig, params: dict, tokens, targets, mask=None):
    """Mean cross-entropy of ``targets (B, N)`` over the positions where ``mask`` is true, and its gradients."""
    logits, cache = forward(config, params, tokens)
    targets = check_tokens(targets, config.vocab_size, "targets")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets must have the tokens' shape {logits.shape[:2]}, got {targets.shape}")
    if mask is not None and np.shape(mask) != targets.shape:
        raise ValueError(f"mask must have the tokens' shape {targets.shape}, got {np.shape(mask)}")
    loss, ce_cache = nn.cross_entropy_forward(logits, targets, mask)
    grads = backward(config, params, cache, nn.cross_entropy_backward(ce_cache))
    return float(loss), grads


class LongNetLM:
    """A config and its parameters together: ``LongNetLM(config).forward(tokens)``."""

    def __init__(self, config: LongNetConfig, params: dict | None = None):
        if not isinstance(config, LongNetConfig):
            raise InputTypeError(f"config must be a LongNetConfig, got {type(config).__name__}")
        get_backend(config.backend)  # a GPU backend without CuPy: one line naming the extra, up front
        self.config = config
        self.params = init_params(config) if params is None else params
        check_params(config, self.params)

    def forward(self, tokens):
        return forward(self.config, self.params, tokens)

    def backward(self, cache, dlogits):
        return backward(self.config, self.params, cache, dlogits)

    def loss_and_grads(self, tokens, targets, mask=None):
        return loss_and_grads(self.config, self.params, tokens, targets, mask)
