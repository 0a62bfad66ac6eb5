"""The LongNet language model (``longnet_ref.model``): gradients, drop-in equivalence, learning, bad input."""

import dataclasses
import math
import sys

import numpy as np
import pytest

from longnet_ref import model as lm

from . import oracle
from .tolerances import F32, FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCES, MODEL_F64, SUMMATION, sample_mean_atol, sample_std_rtol

KINDS = ("dilated", "dense", "window")


def tiny_config(**overrides):
    base = {
        "vocab_size": 11,
        "d_model": 8,
        "n_layers": 2,
        "n_heads": 2,
        "segment_lengths": (2, 4),
        "dilation_rates": (1, 2),
        "attention": "dilated",
        "dtype": "float64",
        "seed": 3,
    }
    return lm.LongNetConfig(**(base | overrides))


def tiny_batch(config, n=8, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab_size, (batch, n))
    targets = rng.integers(0, config.vocab_size, (batch, n))
    mask = rng.random((batch, n)) < 0.7
    return tokens, targets, mask


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
    np.testing.assert_allclose(logits_dilated, logits_dense, **MODEL_F64)
    loss_a, grads_a = lm.loss_and_grads(dilated, params, tokens, targets, mask)
    loss_b, grads_b = lm.loss_and_grads(dense, params, tokens, targets, mask)
    assert loss_a == pytest.approx(loss_b, rel=MODEL_F64["rtol"])
    for name in params:
        np.testing.assert_allclose(grads_a[name], grads_b[name], **MODEL_F64, err_msg=name)


# ---- the model written out from its equations (tests/oracle.py) -----------------------------------
#
# A bug in a library layer mirrored in its backward is invisible to finite differences of the
# library's own forward; here both the logits and the gradient meet an outside computation.

INDEPENDENT_CASES = {
    "dilated": {},
    "dilated-torchscale-3-heads": {"offsets": "torchscale", "n_heads": 4, "d_model": 8, "rope": False, "segment_lengths": (3, 8), "dilation_rates": (2, 3)},
    "dilated-non-causal": {"causal": False, "segment_lengths": (4, 3), "dilation_rates": (2, 1)},
    "dense": {"attention": "dense"},
    "dense-non-causal": {"attention": "dense", "causal": False},
    "window": {"attention": "window", "window": 5},  # not the derived 3
    "window-derived": {"attention": "window", "causal": False},  # W = ceil(2/1 + 4/4) = 3
}


def perturbed(config, scale=0.3, seed=1):
    """Off the init (zero biases, unit gains, tiny weights), so every term of every layer matters."""
    rng = np.random.default_rng(seed)
    return {k: v + scale * rng.standard_normal(v.shape).astype(v.dtype) for k, v in lm.init_params(config).items()}


@pytest.mark.parametrize("case", list(INDEPENDENT_CASES))
def test_forward_and_masked_loss_equal_the_model_written_out_from_its_equations(case):
    config = tiny_config(**INDEPENDENT_CASES[case])
    params = perturbed(config)
    tokens, targets, mask = tiny_batch(config, n=9)
    assert 0 < mask.sum() < mask.size  # a partial mask: the loss must skip the unmasked targets
    logits, _ = lm.forward(config, params, tokens)
    np.testing.assert_allclose(logits, oracle.lm_logits(config, params, tokens), **MODEL_F64)
    loss, _ = lm.loss_and_grads(config, params, tokens, targets, mask)
    np.testing.assert_allclose(loss, oracle.lm_loss(config, params, tokens, targets, mask), **MODEL_F64)
    full_loss, _ = lm.loss_and_grads(config, params, tokens, targets)  # mask=None: every target
    np.testing.assert_allclose(full_loss, oracle.lm_loss(config, params, tokens, targets, np.ones_like(mask)), **MODEL_F64)


@pytest.mark.parametrize("case", ["dilated", "dense", "window-derived", "dilated-torchscale-3-heads"])
def test_gradients_are_the_derivatives_of_the_independent_loss(case):
    """``<grad, u>`` of ``loss_and_grads`` equals the central difference of the *independent* loss
    along a random ``u`` per tensor, with a partial mask: a bug in the library's forward mirrored in
    its backward (same wrong function, consistent gradient) fails here."""
    config = tiny_config(**INDEPENDENT_CASES[case])
    params = perturbed(config)
    tokens, targets, mask = tiny_batch(config, n=7)
    _, grads = lm.loss_and_grads(config, params, tokens, targets, mask)
    rng = np.random.default_rng(4)
    eps = FINITE_DIFFERENCE_STEP
    for name in params:
        u = rng.standard_normal(params[name].shape)
        plus = oracle.lm_loss(config, params | {name: params[name] + eps * u}, tokens, targets, mask)
        minus = oracle.lm_loss(config, params | {name: params[name] - eps * u}, tokens, targets, mask)
        numeric, analytic = (plus - minus) / (2 * eps), float(np.sum(grads[name] * u))
        assert abs(numeric - analytic) <= FINITE_DIFFERENCES["atol"] + FINITE_DIFFERENCES["rtol"] * abs(numeric), (name, numeric, analytic)


def test_float32_model_equals_the_independent_float64_model():
    config = tiny_config(dtype="float32")
    params = perturbed(config)
    tokens, _, _ = tiny_batch(config, n=9)
    logits, _ = lm.forward(config, params, tokens)
    assert logits.dtype == np.float32
    params64 = {k: v.astype(np.float64) for k, v in params.items()}
    np.testing.assert_allclose(logits, oracle.lm_logits(dataclasses.replace(config, dtype="float64"), params64, tokens), **SUMMATION[F32])


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


def test_the_module_passes_the_mask_on():
    """``LongNetLM.loss_and_grads(tokens, targets, mask)`` is the masked mean of the model written out."""
    config = tiny_config()
    params = perturbed(config)
    tokens, targets, mask = tiny_batch(config, n=9)
    loss, _ = lm.LongNetLM(config, params).loss_and_grads(tokens, targets, mask)
    np.testing.assert_allclose(loss, oracle.lm_loss(config, params, tokens, targets, mask), **MODEL_F64)


def test_the_positions_given_feed_rope_in_every_layer():
    """``positions`` with gaps (a packed or left-padded sequence): RoPE sees ``m - n`` of the given
    positions, not of the row indices (a common shift would change nothing, gaps do)."""
    config = tiny_config()
    params = perturbed(config)
    tokens, _, _ = tiny_batch(config, n=9)
    positions = np.array([0, 1, 4, 5, 6, 10, 11, 15, 16])
    logits, _ = lm.forward(config, params, tokens, positions=positions)
    np.testing.assert_allclose(logits, oracle.lm_logits(config, params, tokens, positions), **MODEL_F64)
    assert not np.allclose(logits, oracle.lm_logits(config, params, tokens), **MODEL_F64)  # the gaps matter


def test_dense_attention_on_the_numba_backend_equals_the_model_written_out():
    """On a fast backend ``"dense"`` runs as one full segment of all N rows without dilation
    (``nn.attention_forward``), not as the dense oracle: it must still be the same model, causal and
    not, at a length N = 9 that no power of two or segment length hides."""
    for causal in (True, False):
        config = tiny_config(attention="dense", causal=causal, backend="numba")
        params = perturbed(config)
        tokens, _, _ = tiny_batch(config, n=9)
        logits, _ = lm.forward(config, params, tokens)
        np.testing.assert_allclose(logits, oracle.lm_logits(config, params, tokens), **MODEL_F64)


def test_the_parameter_count_is_the_architectures():
    """``V C + L (4 (C^2 + C) + (4C C + 4C) + (C 4C + C) + 2 (2C)) + 2C`` by hand for V = 11, C = 8,
    L = 2 (four projections, the MLP, two LayerNorms per block; the final LayerNorm; the tied
    embedding once), and the sizes of the initialised arrays for a wider config."""
    assert lm.parameter_count(tiny_config()) == 11 * 8 + 2 * (4 * (64 + 8) + (32 * 8 + 32) + (8 * 32 + 8) + 2 * 16) + 16 == 1848
    config = lm.LongNetConfig(vocab_size=50, d_model=24, n_layers=3, n_heads=4)
    assert lm.parameter_count(config) == sum(value.size for value in lm.init_params(config).values())


def test_init_is_deterministic_from_the_seed():
    a, b = lm.init_params(tiny_config(seed=7)), lm.init_params(tiny_config(seed=7))
    c = lm.init_params(tiny_config(seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["wte.weight"], c["wte.weight"])


def assert_normal_sample(values, std, name):
    """Mean 0 and standard deviation ``std`` within the sampling error (tests/tolerances.py)."""
    assert abs(values.mean()) <= sample_mean_atol(values.size, std), name
    assert values.std() == pytest.approx(std, rel=sample_std_rtol(values.size, kurtosis=3)), name


def test_init_statistics_follow_gpt2_for_every_tensor_class():
    """N(0, 0.02^2) weights and embedding, N(0, (0.02/sqrt(2L))^2) for the two projections that
    write into the residual stream (out_proj, fc2), biases 0, LayerNorm gains 1; L = 3 layers so
    that sqrt(2L) differs from sqrt(L), sqrt(2(L+1)), 2L by more than the sampling error."""
    config = lm.LongNetConfig(vocab_size=96, d_model=128, n_layers=3, n_heads=4, dtype="float32", seed=11)
    params = lm.init_params(config)
    residual_std = 0.02 / math.sqrt(2 * 3)
    for name, value in params.items():
        assert value.dtype == np.float32, name
        values = value.astype(np.float64)
        if name.endswith(("ln_1.weight", "ln_2.weight")) or name == "ln_f.weight":
            np.testing.assert_array_equal(values, 1.0, err_msg=name)
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(values, 0.0, err_msg=name)
        elif name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
            assert_normal_sample(values, residual_std, name)
        else:  # wte, q/k/v projections, fc1
            assert_normal_sample(values, 0.02, name)
    # every layer draws its own values
    assert not np.array_equal(params["h.0.attn.q_proj.weight"], params["h.1.attn.q_proj.weight"])
    assert not np.array_equal(params["h.0.attn.q_proj.weight"], params["h.0.attn.k_proj.weight"])


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
        ({"d_model": 0}, "d_model must be an integer >= 1"),
        ({"n_layers": 0}, "n_layers must be an integer >= 1"),
        ({"n_heads": 0}, "n_heads must be an integer >= 1"),
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


# ---- the edges of the config's checks, and the plumbing of its fields (found by injected bugs) -----


@pytest.mark.parametrize(
    "overrides",
    [
        {"attention": "window", "window": 1},  # the smallest window: each token attends itself
        {"d_model": 6, "n_heads": 2, "rope": False},  # an odd head dimension (3) needs no pairs without RoPE
        {"n_layers": 1, "seed": 0},
    ],
    ids=["window-1", "odd-head-dim-without-rope", "one-layer-seed-0"],
)
def test_a_config_at_the_edge_of_every_check_is_the_model_written_out(overrides):
    config = tiny_config(**overrides)
    assert all(getattr(config, name) == value for name, value in overrides.items())
    params = perturbed(config)
    tokens, _, _ = tiny_batch(config, n=9)
    logits, _ = lm.forward(config, params, tokens)
    np.testing.assert_allclose(logits, oracle.lm_logits(config, params, tokens), **MODEL_F64)


def test_the_model_takes_exactly_one_kv_cache_per_layer():
    from longnet_ref.generate import new_caches

    config = tiny_config()
    params = lm.init_params(config)
    tokens, _, _ = tiny_batch(config, n=4, batch=1)
    caches = new_caches(config, 1)
    for wrong in (caches[:-1], caches + new_caches(config, 1)[:1]):
        with pytest.raises(ValueError, match=r"kv_caches must hold one cache per layer \(2\), got [13]"):
            lm.forward(config, params, tokens, kv_caches=wrong)


@pytest.mark.parametrize("backend", ["reference", "numpy"])
def test_the_configs_backend_runs_the_attention_forward_and_backward(attention_calls, backend):
    """``config.backend`` is the backend every layer's attention runs on, forward and backward."""
    config = tiny_config(backend=backend)
    lm.loss_and_grads(config, lm.init_params(config), *tiny_batch(config, n=4))
    assert sorted(set(attention_calls)) == [("dilated_attention", backend), ("dilated_attention_backward", backend)]
    assert len(attention_calls) == 2 * config.n_layers


@pytest.mark.parametrize("fields", [[("vocab_size", 11)], "vocab_size=11", None], ids=["pairs", "string", "None"])
def test_a_config_is_read_from_a_dict_only(fields):
    from longnet_ref.validation import InputTypeError

    with pytest.raises(InputTypeError, match="a LongNetConfig is read from a dict of its fields"):
        lm.LongNetConfig.from_dict(fields)


def test_a_gpu_backend_without_cupy_is_refused_when_the_module_is_built(monkeypatch):
    """``LongNetLM`` names the missing extra up front (its promise), not at the first forward."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if CuPy were not installed
    monkeypatch.delitem(sys.modules, "longnet_ref.backends.cupy_gpu", raising=False)
    config = tiny_config(backend="cupy")  # a registered name: the config itself is valid
    with pytest.raises(ImportError, match="CuPy"):
        lm.LongNetLM(config)


def test_backward_refuses_dlogits_of_another_shape_than_the_logits():
    """A ``(1, N, V)`` gradient for a batch of 2 would broadcast through the head silently."""
    config = tiny_config()
    params = lm.init_params(config)
    tokens, _, _ = tiny_batch(config, n=4)
    logits, cache = lm.forward(config, params, tokens)
    for wrong in (np.ones((1, 4, 11)), np.ones((2, 4, 12)), np.ones((2, 3, 11))):
        with pytest.raises(ValueError, match=r"dlogits must have the logits' shape \(2, 4, 11\)"):
            lm.backward(config, params, cache, wrong)
    assert logits.shape == (2, 4, 11)


def test_the_default_model_is_longnets():
    """Without options the model is LongNet's (arXiv 2307.02486 §3): causal dilated attention with
    RoPE, paper offsets, on the NumPy backend, in float64."""
    config = lm.LongNetConfig()
    assert (config.attention, config.causal, config.rope, config.offsets, config.backend, config.dtype) == ("dilated", True, True, "paper", "numpy", "float64")
    assert config.window is None
