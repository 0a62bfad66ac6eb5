"""Generation with the LongNet LM: prefill the prompt, then one token at a time through KV caches.

The decoder runs the model's own [`longnet_ref.model.forward`][longnet_ref.model.forward] with a cache per layer.
Each layer's attention keeps a cache ([`longnet_ref.decode`][longnet_ref.decode]): ``DilatedKVCache`` for
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

import numpy as np

from . import model as lm
from . import nn
from .decode import DenseKVCache, DilatedKVCache
from .validation import InputTypeError, check_array, check_int, check_real, check_rng, check_tokens


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
    return [DilatedKVCache(batch, H, D, D, *branches, offsets=config.offsets, dtype=config.dtype) for _ in range(config.n_layers)]


class Decoder:
    """The model's state while generating: its caches and the next position."""

    def __init__(self, config: lm.LongNetConfig, params: dict, batch: int):
        lm.check_params(config, params)
        self.config, self.params, self.batch = config, params, batch
        self.caches = new_caches(config, batch)
        self.position = 0

    def _run(self, tokens) -> np.ndarray:
        """``model.forward`` of ``tokens (B, T)`` at the next ``T`` positions, through the caches."""
        positions = self.position + np.arange(tokens.shape[1])  # (T,) absolute positions for RoPE
        logits, _ = lm.forward(self.config, self.params, tokens, positions=positions, kv_caches=self.caches)
        self.position += tokens.shape[1]
        return logits  # (B, T, V)

    def prefill(self, tokens) -> np.ndarray:
        """Logits ``(B, T, V)`` of a prompt ``(B, T)`` (the parallel causal forward), caches left at ``T``."""
        tokens = check_tokens(tokens, self.config.vocab_size, "prompt_tokens")
        if tokens.shape[0] != self.batch or tokens.shape[1] == 0:
            raise ValueError(f"prompt_tokens must have shape ({self.batch}, T >= 1), got {tokens.shape}")
        if self.position != 0:
            raise ValueError("prefill needs a fresh Decoder")
        return self._run(tokens)

    def step(self, token) -> np.ndarray:
        """Logits ``(B, V)`` of the next position, given its input ``token (B,)``."""
        token = check_tokens(token, self.config.vocab_size, "token", ndim=1)
        if token.shape != (self.batch,):
            raise ValueError(f"token must have shape (B,) = ({self.batch},), got {token.shape}")
        return self._run(token[:, None])[:, 0]


def sample(logits, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
    """A token per row of ``logits (B, V)``: arg-max if ``temperature == 0``, else from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` largest."""
    check_array(logits, "logits", 2)  # (B, V)
    rng = check_rng(rng)
    temperature = check_real(temperature, "temperature", minimum=0)
    top_k = None if top_k is None else check_int(top_k, "top_k", minimum=1)
    if np.isnan(logits).any():
        raise ValueError("logits must not contain NaN: there is no distribution to sample from")
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
    check_int(seed, "seed", minimum=0)
    if on_token is not None and not callable(on_token):
        raise InputTypeError(f"on_token must be a function of the drawn tokens, or None; got {type(on_token).__name__}")
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
