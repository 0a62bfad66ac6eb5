"""The LongNet language model (``longnet_ref.model``): gradients, drop-in equivalence, learning, bad input."""

import dataclasses

import numpy as np
import pytest

from longnet_ref import model as lm
from longnet_ref.dense import dense_attention

KINDS = ("dilated", "dense", "window")


def tiny_config(**overrides):
    base = {"vocab_size": 11, "d_model": 8, "n_layers": 2, "n_heads": 2, "segment_lengths": (2, 4), "dilation_rates": (1, 2),
                "attention": "dilated", "dtype": "float64", "seed": 3}
    return lm.LongNetConfig(**(base | overrides))


def tiny_batch(config, n=8, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, n))
    targets = rng.integers(0, config.vocab_size, (batch, n))
    mask = rng.random((batch, n)) < 0.7
    return tokens, targets, mask


@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no-rope"])
@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_gradient_matches_central_differences(kind, rope):
    """``<grad, u>`` equals ``(L(theta + e u) - L(theta - e u)) / 2e`` along random directions ``u``.

    float64 with ``e = 1e-6``: the truncation error ``e^2 L''' / 6`` measured ~1e-9 here (the
    perturbed weights make ``L'''`` large; it shrinks 100x per 10x smaller ``e``) and the
    rounding error ``|L| eps_64 / e ~ 1e-9``; the bound ``1e-6 max(|numeric|, 1e-2)`` is 10x
    above both yet catches any missing or wrong term (a wrong gradient is off by O(1)). A direction per parameter tensor checks every
    tensor on its own, so an error in a small tensor cannot hide behind a large one.
    """
    config = tiny_config(attention=kind, rope=rope, window=3 if kind == "window" else None)
    params = lm.init_params(config)
    rng = np.random.default_rng(1)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}  # off the symmetric init
    tokens, targets, mask = tiny_batch(config)
    _, grads = lm.loss_and_grads(config, params, tokens, targets, mask)
    eps = 1e-6
    for name in params:
        u = rng.standard_normal(params[name].shape)
        plus = lm.loss_and_grads(config, params | {name: params[name] + eps * u}, tokens, targets, mask)[0]
        minus = lm.loss_and_grads(config, params | {name: params[name] - eps * u}, tokens, targets, mask)[0]
        numeric = (plus - minus) / (2 * eps)
        analytic = float(np.sum(grads[name] * u))
        assert abs(numeric - analytic) <= 1e-6 * max(abs(numeric), 1e-2), name


def test_gradients_have_the_params_names_shapes_and_dtype():
    for dtype in ("float32", "float64"):
        config = tiny_config(dtype=dtype)
        params = lm.init_params(config)
        _, grads = lm.loss_and_grads(config, params, *tiny_batch(config))
        assert list(grads) == list(params)
        assert all(grads[k].shape == params[k].shape and grads[k].dtype == np.dtype(dtype) for k in params)


@pytest.mark.parametrize("n", [8, 13])
def test_one_full_segment_without_dilation_equals_the_dense_model(n):
    """``segment_lengths=[N]``, ``dilation_rates=[1]``: one segment, every row: dense attention.

    The same parameters give the same logits and the same gradients; float64, the two paths
    sum the same terms in a different order, so they agree to rounding (1e-12 relative).
    """
    dilated = tiny_config(segment_lengths=(n,), dilation_rates=(1,))
    dense = dataclasses.replace(dilated, attention="dense")
    params = lm.init_params(dilated)
    tokens, targets, mask = tiny_batch(dilated, n=n)
    logits_dilated, _ = lm.forward(dilated, params, tokens)
    logits_dense, _ = lm.forward(dense, params, tokens)
    np.testing.assert_allclose(logits_dilated, logits_dense, rtol=1e-12, atol=1e-12)
    loss_a, grads_a = lm.loss_and_grads(dilated, params, tokens, targets, mask)
    loss_b, grads_b = lm.loss_and_grads(dense, params, tokens, targets, mask)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for name in params:
        np.testing.assert_allclose(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_forward_matches_a_plain_transformer_written_out_here():
    """An independent one-layer forward (written from the equations with ``dense_attention``)."""
    config = tiny_config(attention="dense", n_layers=1, rope=False)
    params = lm.init_params(config)
    rng = np.random.default_rng(5)
    params = {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}
    tokens = rng.integers(0, config.vocab_size, (2, 7))

    def layernorm(x, name):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * params[name + ".weight"] + params[name + ".bias"]

    def linear(x, name):
        return x @ params[name + ".weight"].T + params[name + ".bias"]

    def gelu(x):  # tanh form (GPT-2)
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    B, N, C, H = 2, 7, config.d_model, config.n_heads
    x = params["wte.weight"][tokens]
    h = layernorm(x, "h.0.ln_1")
    q, k, v = (linear(h, f"h.0.attn.{p}_proj").reshape(B, N, H, C // H) for p in "qkv")
    x = x + linear(dense_attention(q, k, v, causal=True).reshape(B, N, C), "h.0.attn.out_proj")
    x = x + linear(gelu(linear(layernorm(x, "h.0.ln_2"), "h.0.mlp.fc1")), "h.0.mlp.fc2")
    expected = layernorm(x, "ln_f") @ params["wte.weight"].T
    logits, _ = lm.forward(config, params, tokens)
    # float64, the same operations in a different grouping: agreement to rounding
    np.testing.assert_allclose(logits, expected, rtol=1e-12, atol=1e-12)


def test_the_model_is_causal():
    """Changing a later token never changes an earlier position's logits."""
    config = tiny_config(segment_lengths=(4, 8), dilation_rates=(1, 2))
    params = lm.init_params(config)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, 12))
    changed = tokens.copy()
    changed[0, 9] = (changed[0, 9] + 1) % config.vocab_size
    a, _ = lm.forward(config, params, tokens)
    b, _ = lm.forward(config, params, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_init_is_deterministic_from_the_seed():
    a, b = lm.init_params(tiny_config(seed=7)), lm.init_params(tiny_config(seed=7))
    c = lm.init_params(tiny_config(seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])


def test_overfits_a_tiny_fixed_batch():
    """Four sequences of 12 tokens memorised to a cross-entropy near zero within 200 AdamW steps.

    Every (sequence, position) holds a different token, so each target is a function of what the
    model sees and the loss can reach zero (random tokens would repeat contexts with different
    targets: an irreducible floor that says nothing about the model).
    """
    from longnet_ref.train import AdamW, TrainConfig, clip_by_global_norm, learning_rate

    config = tiny_config(d_model=32, n_heads=4, segment_lengths=(4, 8), dilation_rates=(1, 2), vocab_size=48)
    params = lm.init_params(config)
    rng = np.random.default_rng(2)
    tokens = rng.permutation(48).reshape(4, 12)
    targets = rng.integers(0, 48, (4, 12))
    tc = TrainConfig(steps=200, lr=1e-2, min_lr=1e-3, warmup=10, weight_decay=0.0)
    opt = AdamW.zeros_like(params)
    first = None
    for step in range(1, tc.steps + 1):
        loss, grads = lm.loss_and_grads(config, params, tokens, targets)
        first = loss if first is None else first
        grads, _ = clip_by_global_norm(grads, tc.clip)
        opt.step(params, grads, learning_rate(step, tc), tc)
    final, _ = lm.loss_and_grads(config, params, tokens, targets)
    assert first > 3.5  # near ln 48 = 3.87 at the start
    assert final < 0.02


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"attention": "sparse"}, "attention"),
        ({"d_model": 10, "n_heads": 4}, "divisible by n_heads"),
        ({"d_model": 6, "n_heads": 2}, "even head dimension"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"n_layers": 1.5}, "n_layers"),
        ({"segment_lengths": (4, 8), "dilation_rates": (1,)}, "same length|as many|length"),
        ({"segment_lengths": (0,), "dilation_rates": (1,)}, "segment_lengths"),
        ({"segment_lengths": 8, "dilation_rates": (1,)}, "segment_lengths"),
        ({"offsets": "blocks"}, "offsets"),
        ({"backend": "torch"}, "backend"),
        ({"dtype": "float16"}, "dtype"),
        ({"window": 0, "attention": "window"}, "window"),
        ({"causal": "yes"}, "causal"),
    ],
)
def test_a_bad_config_is_rejected_naming_the_field(overrides, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_config(**overrides)


def test_bad_tokens_and_params_are_rejected():
    config = tiny_config()
    params = lm.init_params(config)
    with pytest.raises(ValueError, match="tokens must lie in"):
        lm.forward(config, params, np.full((1, 4), config.vocab_size))
    with pytest.raises(ValueError, match="2-D"):
        lm.forward(config, params, np.zeros(4, int))
    with pytest.raises(TypeError, match="integers"):
        lm.forward(config, params, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="targets must have"):
        lm.loss_and_grads(config, params, np.zeros((1, 4), int), np.zeros((1, 5), int))
    with pytest.raises(ValueError, match="missing"):
        lm.LongNetLM(config, {k: v for k, v in params.items() if k != "ln_f.bias"})
    with pytest.raises(ValueError, match="shape"):
        lm.LongNetLM(config, params | {"ln_f.bias": np.zeros(3)})
    with pytest.raises(ValueError, match="unknown LongNetConfig fields"):
        lm.LongNetConfig.from_dict(config.to_dict() | {"dropout": 0.1})
