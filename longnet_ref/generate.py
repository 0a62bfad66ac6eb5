"""Generation with the LongNet LM: prefill the prompt, then one token at a time through KV caches.

Each layer's attention keeps a cache (:mod:`longnet_ref.decode`): ``DilatedKVCache`` for
``"dilated"`` (bounded: ``sum_i ceil(w_i / r_i)`` rows per head whatever the position),
``DilatedKVCache`` with the one branch ``(W, 1)`` for ``"window"`` (the blocked window *is* that
branch, ``nn._attention_pattern``) and ``DenseKVCache`` for ``"dense"``. A step at position ``t``:

    x   = E[token_t]                                              (B, 1, C)
    q, k, v = LN_1(x) W^T + b,  RoPE at the absolute position t   (B, H, D) each
    o_t = cache.step(q, k, v)                                     exact row t of the causal forward
    x   = x + o_t Wo^T + bo;   x = x + MLP(LN_2(x))
    logits_t = LN_f(x) E^T                                        (B, V)

so the logits equal the full forward's at every position (``tests/test_generate.py``).
Docs: ``docs/model.md``.
"""

from __future__ import annotations

import sys

import numpy as np

from . import model as lm
from . import nn
from .decode import DenseKVCache, DilatedKVCache
from .validation import InputTypeError, check_int, check_real, check_tokens


def new_caches(config: lm.LongNetConfig, batch: int) -> list:
    """One empty KV cache per layer, of the config's attention kind."""
    if not config.causal:
        raise ValueError("generation needs a causal model (config.causal=True)")
    H, D = config.n_heads, config.head_dim
    if config.attention == "dense":
        return [DenseKVCache(batch, H, D, D, dtype=config.dtype) for _ in range(config.n_layers)]
    if config.attention == "window":
        window = config.window or nn.window_for(config.segment_lengths, config.dilation_rates)
        branches = ([window], [1])
    else:
        branches = (list(config.segment_lengths), list(config.dilation_rates))
    return [DilatedKVCache(batch, H, D, D, *branches, offsets=config.offsets, dtype=config.dtype)
            for _ in range(config.n_layers)]


def _attend(config, attn_params, h, positions, cache, prefill: bool):
    """Projections, RoPE at ``positions``, the cache's prefill (``T`` rows) or step (one row), ``out_proj``."""
    B, T, C = h.shape
    split = lambda t: t.reshape(B, T, config.n_heads, config.head_dim)  # (B, T, C) -> (B, T, H, D)
    q, k, v = (split(nn.linear_forward(lm._sub(attn_params, f"{p}_proj."), h)[0]) for p in "qkv")
    if config.rope:
        q, k = nn.rope_forward(q, positions)[0], nn.rope_forward(k, positions)[0]
    if prefill:
        o, _ = cache.prefill(q, k, v)  # (B, T, H, D)
    else:
        o = cache.step(q[:, 0], k[:, 0], v[:, 0])[0][:, None]  # (B, 1, H, D)
    return nn.linear_forward(lm._sub(attn_params, "out_proj."), o.reshape(B, T, C))[0]


class Decoder:
    """The model's state while generating: its caches and the next position."""

    def __init__(self, config: lm.LongNetConfig, params: dict, batch: int):
        lm.check_params(config, params)
        self.config, self.params, self.batch = config, params, batch
        self.caches = new_caches(config, batch)
        self.position = 0

    def _run(self, tokens, prefill: bool):
        c, p = self.config, self.params
        positions = self.position + np.arange(tokens.shape[1])
        x, _ = nn.embedding_forward(lm._sub(p, "wte."), tokens)  # (B, T, C)
        for layer, cache in enumerate(self.caches):
            block = lm._sub(p, f"h.{layer}.")
            h, _ = nn.layernorm_forward(lm._sub(block, "ln_1."), x)
            x = x + _attend(c, lm._sub(block, "attn."), h, positions, cache, prefill)
            h, _ = nn.layernorm_forward(lm._sub(block, "ln_2."), x)
            x = x + nn.mlp_forward(lm._sub(block, "mlp."), h)[0]
        h, _ = nn.layernorm_forward(lm._sub(p, "ln_f."), x)
        self.position += tokens.shape[1]
        return h @ p["wte.weight"].T  # (B, T, V)

    def prefill(self, tokens) -> np.ndarray:
        """Logits ``(B, T, V)`` of a prompt ``(B, T)`` (the parallel causal forward), caches left at ``T``."""
        tokens = check_tokens(tokens, self.config.vocab_size, "prompt_tokens")
        if tokens.shape[0] != self.batch or tokens.shape[1] == 0:
            raise ValueError(f"prompt_tokens must have shape ({self.batch}, T >= 1), got {tokens.shape}")
        if self.position != 0:
            raise ValueError("prefill needs a fresh Decoder")
        return self._run(tokens, prefill=True)

    def step(self, token) -> np.ndarray:
        """Logits ``(B, V)`` of the next position, given its input ``token (B,)``."""
        token = check_tokens(np.asarray(token).reshape(self.batch, 1), self.config.vocab_size, "token")
        return self._run(token, prefill=False)[:, 0]


def sample(logits, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """A token per row of ``logits (B, V)``: arg-max if ``temperature == 0``, else from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    temperature = check_real(temperature, "temperature", minimum=0)
    top_k = None if top_k is None else check_int(top_k, "top_k", minimum=1)
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def generate(config, params, prompt_tokens, max_new_tokens, *, temperature=1.0, top_k=None, seed=0, on_token=None):
    """Continue ``prompt_tokens (B, T)`` (or ``(T,)``) by ``max_new_tokens`` sampled tokens.

    Prefills the prompt, then steps every layer's attention through its cache. ``on_token(tokens
    (B,))`` is called as each token is drawn (streaming). Returns ``(B, T + max_new_tokens)``
    (``(T + max_new_tokens,)`` for a 1-D prompt).
    """
    if isinstance(config, lm.LongNetLM):
        config, params = config.config, config.params if params is None else params
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=0)
    temperature = check_real(temperature, "temperature", minimum=0)
    top_k = None if top_k is None else check_int(top_k, "top_k", minimum=1)
    check_int(seed, "seed")
    if not isinstance(config, lm.LongNetConfig):
        raise InputTypeError(f"config must be a LongNetConfig or a LongNetLM, got {type(config).__name__}")
    prompt = check_tokens(prompt_tokens, config.vocab_size, "prompt_tokens", ndim=None)
    if prompt.ndim not in (1, 2):
        raise ValueError(f"prompt_tokens must be (T,) or (B, T), got shape {prompt.shape}")
    one_d = prompt.ndim == 1
    prompt = prompt[None] if one_d else prompt
    rng = np.random.default_rng(seed)
    decoder = Decoder(config, params, prompt.shape[0] if prompt.ndim == 2 else 1)
    logits = decoder.prefill(prompt)[:, -1]  # (B, V)
    out = [prompt]
    for i in range(max_new_tokens):
        token = sample(logits, rng, temperature, top_k)  # (B,)
        out.append(token[:, None])
        if on_token is not None:
            on_token(token)
        if i + 1 < max_new_tokens:
            logits = decoder.step(token)
    tokens = np.concatenate(out, axis=1)
    return tokens[0] if one_d else tokens


# ----------------------------------------------------------------------------------------------
# ``longnet-ref generate``


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint.npz written by longnet-ref train")
    p.add_argument("--prompt", required=True, help="text (byte-level models) or space-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature of the sampling (0: greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only (None: all of them)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling")


def run(args) -> int:
    """``longnet-ref generate``: stream the continuation of ``--prompt`` to stdout."""
    from .train import load_checkpoint

    state, meta = load_checkpoint(args.checkpoint)
    config = state.config
    text = config.vocab_size == 256 and meta.get("task", "text") == "text"
    if text:
        prompt = np.frombuffer(args.prompt.encode("utf-8"), np.uint8).astype(np.int64)
    else:
        try:
            prompt = np.array([int(t) for t in args.prompt.split()], np.int64)
        except ValueError:
            raise ValueError(f"--prompt must be space-separated token ids for this (non-text) model, got {args.prompt!r}") from None
    if prompt.size == 0:
        raise ValueError("--prompt must not be empty")
    out = sys.stdout

    def emit(token):
        if text:
            out.buffer.write(bytes([int(token[0])])) if hasattr(out, "buffer") else out.write(chr(int(token[0])))
        else:
            out.write(f" {int(token[0])}")
        out.flush()

    out.write(args.prompt)
    out.flush()
    generate(config, state.params, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             seed=args.seed, on_token=emit)
    out.write("\n")
    return 0
