"""The layers of ``longnet_ref.nn``: every backward is the gradient of its forward.

Each backward is compared with central finite differences in float64. For a loss
``L = sum(y * dy)`` with a fixed random ``dy``, ``dL/dtheta`` must equal ``backward(dy)``.
The small layers are checked coordinate by coordinate; attention (hundreds of parameters, a
costlier forward) is checked along random directions ``u``: ``(L(theta + eps u) -
L(theta - eps u)) / (2 eps) = <grad, u>``, which a wrong entry of the gradient violates for
almost every ``u``.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import erf

from longnet_ref import nn

from . import oracle
from .tolerances import F32, FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCES, HAND_F64, LAYER_F64, SUMMATION, UNIFORM_MAX_SLACK, sample_mean_atol, sample_std_rtol

EPS, TOL = FINITE_DIFFERENCE_STEP, FINITE_DIFFERENCES  # tests/tolerances.py


def central_differences(loss, x):
    """Central differences with this file's step ``EPS`` (the loop is ``tests/oracle.py``'s)."""
    return oracle.central_differences(loss, x, EPS)


def check_all_coordinates(forward, backward, x, params, rng):
    """Compare ``backward``'s ``dx`` and ``grads`` with central differences of ``sum(y * dy)``."""
    y, cache = forward(params, x)
    dy = rng.standard_normal(y.shape)
    dx, grads = backward(params, cache, dy)
    loss = lambda: float((forward(params, x)[0] * dy).sum())
    np.testing.assert_allclose(dx, central_differences(loss, x), err_msg="dx", **TOL)
    assert set(grads) == set(params or {})
    for name in grads:
        assert grads[name].shape == params[name].shape, name
        np.testing.assert_allclose(grads[name], central_differences(loss, params[name]), err_msg=name, **TOL)


def check_directions(loss, arrays, grads, rng, directions=2):
    """``(L(a + eps u) - L(a - eps u)) / (2 eps) = <dL/da, u>`` for random ``u``, for every array."""
    for name, a in arrays.items():
        for _ in range(directions):
            u = rng.standard_normal(a.shape)
            saved = a.copy()
            a += EPS * u
            plus = loss()
            a[...] = saved - EPS * u
            minus = loss()
            a[...] = saved
            numeric = (plus - minus) / (2 * EPS)
            analytic = float((grads[name] * u).sum())
            assert abs(numeric - analytic) <= TOL["atol"] + TOL["rtol"] * abs(analytic), (name, numeric, analytic)


leading_shapes = st.lists(st.integers(1, 3), min_size=1, max_size=2).map(tuple)


@settings(max_examples=20, deadline=None)
@given(leading_shapes, st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_linear_backward_is_the_gradient(leading, fan_in, fan_out, seed):
    rng = np.random.default_rng(seed)
    params = {"weight": rng.standard_normal((fan_out, fan_in)), "bias": rng.standard_normal(fan_out)}
    check_all_coordinates(nn.linear_forward, nn.linear_backward, rng.standard_normal((*leading, fan_in)), params, rng)


def test_linear_is_x_times_weight_transposed_plus_bias():
    x = np.array([[1.0, 2.0]])  # (1, in=2)
    params = {"weight": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "bias": np.array([0.5, 0.0, -1.0])}
    np.testing.assert_array_equal(nn.linear_forward(params, x)[0], [[1.5, 2.0, 2.0]])


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_embedding_backward_accumulates_repeated_tokens(batch, n, vocab, width, seed):
    rng = np.random.default_rng(seed)
    params = {"weight": rng.standard_normal((vocab, width))}
    tokens = rng.integers(0, vocab, (batch, n))  # repeats are likely: vocab <= 4
    y, cache = nn.embedding_forward(params, tokens)
    np.testing.assert_array_equal(y, params["weight"][tokens])
    dy = rng.standard_normal(y.shape)
    dx, grads = nn.embedding_backward(params, cache, dy)
    assert dx is None
    loss = lambda: float((nn.embedding_forward(params, tokens)[0] * dy).sum())
    np.testing.assert_allclose(grads["weight"], central_differences(loss, params["weight"]), **TOL)


def test_embedding_rejects_out_of_range_and_float_tokens():
    params = {"weight": np.zeros((3, 2))}
    with pytest.raises(ValueError, match="tokens"):
        nn.embedding_forward(params, np.array([[0, 3]]))
    with pytest.raises(TypeError, match="tokens"):
        nn.embedding_forward(params, np.array([[0.0, 1.0]]))


@settings(max_examples=20, deadline=None)
@given(leading_shapes, st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_layernorm_backward_is_the_gradient(leading, width, seed):
    rng = np.random.default_rng(seed)
    params = {"weight": rng.standard_normal(width), "bias": rng.standard_normal(width)}
    check_all_coordinates(nn.layernorm_forward, nn.layernorm_backward, rng.standard_normal((*leading, width)), params, rng)


def test_layernorm_output_has_zero_mean_and_unit_variance_before_the_affine():
    x = np.random.default_rng(1).standard_normal((3, 8)) * 5 + 2
    y, _ = nn.layernorm_forward({"weight": np.ones(8), "bias": np.zeros(8)}, x)
    np.testing.assert_allclose(y.mean(axis=-1), 0, **HAND_F64)
    # biased variance of xhat is var / (var + eps), eps = 1e-5
    var = x.var(axis=-1)
    np.testing.assert_allclose(y.var(axis=-1), var / (var + 1e-5), **HAND_F64)


@settings(max_examples=20, deadline=None)
@given(leading_shapes, st.integers(0, 2**32 - 1))
def test_gelu_backward_is_the_gradient(leading, seed):
    rng = np.random.default_rng(seed)
    check_all_coordinates(nn.gelu_forward, nn.gelu_backward, 2 * rng.standard_normal(leading), None, rng)


def test_gelu_is_the_tanh_approximation():
    # torch.nn.functional.gelu(torch.tensor(1.0), approximate="tanh") = 0.8411920; the exact
    # x Phi(x) is 0.8413447. The approximation differs from the exact GELU by < 1e-3 everywhere.
    y, _ = nn.gelu_forward(None, np.array([1.0]))
    np.testing.assert_allclose(y, [0.8411919906082768], **HAND_F64)
    x = np.linspace(-6, 6, 241)
    exact = 0.5 * x * (1 + erf(x / math.sqrt(2)))
    assert np.abs(nn.gelu_forward(None, x)[0] - exact).max() < 1e-3


@settings(max_examples=15, deadline=None)
@given(leading_shapes, st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_mlp_backward_is_the_gradient(leading, width, hidden, seed):
    rng = np.random.default_rng(seed)
    params = {
        "fc1.weight": rng.standard_normal((hidden, width)),
        "fc1.bias": rng.standard_normal(hidden),
        "fc2.weight": rng.standard_normal((width, hidden)),
        "fc2.bias": rng.standard_normal(width),
    }
    check_all_coordinates(nn.mlp_forward, nn.mlp_backward, rng.standard_normal((*leading, width)), params, rng)


def rope_layer(per_batch_positions):
    """RoPE as a parameter-free layer ``(params, x)`` for :func:`check_all_coordinates`."""

    def forward(params, x):
        positions = per_batch_positions if per_batch_positions is not None else np.arange(x.shape[1])
        return nn.rope_forward(x, positions)

    return forward, lambda params, cache, dy: (nn.rope_backward(cache, dy), {})


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 4), st.integers(1, 2), st.sampled_from([2, 4, 6]), st.booleans(), st.integers(0, 2**32 - 1))
def test_rope_backward_is_the_gradient(batch, n, heads, head_dim, per_batch, seed):
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, 50, (batch, n)) if per_batch else None
    forward, backward = rope_layer(positions)
    check_all_coordinates(forward, backward, rng.standard_normal((batch, n, heads, head_dim)), None, rng)


def rotate_pair_by_pair(x, positions, base=10000.0):
    """RoPE written out with an explicit 2x2 rotation matrix per pair (the RoFormer paper's form)."""
    y = np.empty_like(x)
    head_dim = x.shape[-1]
    for n in range(x.shape[1]):
        for j in range(head_dim // 2):
            theta = positions[n] * base ** (-2 * j / head_dim)
            rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
            y[:, n, :, 2 * j : 2 * j + 2] = x[:, n, :, 2 * j : 2 * j + 2] @ rotation.T
    return y


def test_rope_rotates_each_pair_by_position_times_frequency():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 5, 3, 6))
    positions = np.array([0, 1, 7, 30, 1000])
    np.testing.assert_allclose(nn.rope_forward(x, positions)[0], rotate_pair_by_pair(x, positions), **HAND_F64)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 100), st.integers(0, 100), st.integers(-50, 50), st.integers(0, 2**32 - 1))
def test_rope_scores_are_the_query_against_the_key_rotated_by_the_relative_angle(m, n, shift, seed):
    """``R(m theta) q . R(n theta) k = q . R((n - m) theta) k``, per pair ``j`` written out:
    ``(q0 k0 + q1 k1) cos phi + (q1 k0 - q0 k1) sin phi`` with ``phi = (n - m) 10000^(-2j/D)``.
    An identity or a negated rotation fails it whenever ``m != n``; shifting both positions
    leaves the score unchanged (relative position only)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, 1, 8))
    score = lambda pq, pk: float((nn.rope_forward(q, [pq])[0] * nn.rope_forward(k, [pk])[0]).sum())
    expected = 0.0
    for j in range(4):
        phi = (n - m) * 10000.0 ** (-2 * j / 8)
        q0, q1, k0, k1 = q[0, 0, 0, 2 * j], q[0, 0, 0, 2 * j + 1], k[0, 0, 0, 2 * j], k[0, 0, 0, 2 * j + 1]
        expected += (q0 * k0 + q1 * k1) * math.cos(phi) + (q1 * k0 - q0 * k1) * math.sin(phi)
    shift = max(shift, -min(m, n))  # keep positions non-negative
    # float64 rotations of O(1) vectors: the dot products agree to ~1e-14
    assert score(m, n) == pytest.approx(expected, rel=HAND_F64["rtol"], abs=HAND_F64["atol"])
    assert score(m + shift, n + shift) == pytest.approx(expected, rel=HAND_F64["rtol"], abs=HAND_F64["atol"])


def test_rope_rejects_odd_head_dim_and_wrong_positions():
    with pytest.raises(ValueError, match="even head dimension"):
        nn.rope_forward(np.zeros((1, 2, 1, 3)), np.arange(2))
    with pytest.raises(ValueError, match="positions"):
        nn.rope_forward(np.zeros((1, 2, 1, 4)), np.arange(3))


def naive_cross_entropy(logits, targets, mask):
    """``-mean log(exp(z_t) / sum exp(z))`` term by term in Python floats (small logits only)."""
    terms = []
    for b, n in zip(*np.nonzero(mask)):
        z = logits[b, n]
        terms.append(-math.log(math.exp(z[targets[b, n]]) / sum(math.exp(v) for v in z)))
    return sum(terms) / len(terms)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 4), st.integers(2, 5), st.booleans(), st.integers(0, 2**32 - 1))
def test_cross_entropy_is_the_mean_over_unmasked_targets_and_its_backward_the_gradient(batch, n, vocab, masked, seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((batch, n, vocab))
    targets = rng.integers(0, vocab, (batch, n))
    mask = rng.random((batch, n)) < 0.6 if masked else np.ones((batch, n), bool)
    mask.flat[0] = True  # at least one target
    loss, cache = nn.cross_entropy_forward(logits, targets, mask if masked else None)
    # a few O(1) terms in float64 summed in different orders: agreement to ~1e-15
    assert loss == pytest.approx(naive_cross_entropy(logits, targets, mask), rel=HAND_F64["rtol"])
    dlogits = nn.cross_entropy_backward(cache)
    numeric = central_differences(lambda: float(nn.cross_entropy_forward(logits, targets, mask)[0]), logits)
    np.testing.assert_allclose(dlogits, numeric, **TOL)
    assert np.all(dlogits[~mask] == 0)
    # the upstream gradient scales it: d(c L)/dlogits = c dL/dlogits (chain rule into a larger graph)
    np.testing.assert_allclose(nn.cross_entropy_backward(cache, dloss=2.5), 2.5 * numeric, **TOL)


def test_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[[1e4, 0.0, -1e4]]])
    loss, cache = nn.cross_entropy_forward(logits, np.array([[1]]))
    assert loss == pytest.approx(1e4)  # -log softmax = 1e4 - 0 + log(1 + e^-1e4 + e^-2e4)
    np.testing.assert_array_equal(nn.cross_entropy_backward(cache), [[[1.0, -1.0, 0.0]]])  # e^-1e4 underflows: exact


def test_cross_entropy_rejects_bad_targets_and_an_empty_mask():
    logits = np.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="targets"):
        nn.cross_entropy_forward(logits, np.array([[0, 3]]))
    with pytest.raises(ValueError, match="targets"):
        nn.cross_entropy_forward(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="mask"):
        nn.cross_entropy_forward(logits, np.array([[0, 1]]), np.zeros((1, 2), bool))


# ---------------------------------------------------------------------------------------------
# Attention of each kind
# ---------------------------------------------------------------------------------------------


@st.composite
def attention_problems(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4]))
    n = draw(st.integers(1, 10))
    branches = draw(st.integers(1, 3))
    return {
        "batch": draw(st.integers(1, 2)),
        "n": n,
        "embed_dim": heads * head_dim,
        "num_heads": heads,
        "kind": draw(st.sampled_from(nn.ATTENTION_KINDS)),
        "segment_lengths": draw(st.lists(st.integers(1, n + 2), min_size=branches, max_size=branches)),
        "dilation_rates": draw(st.lists(st.integers(1, 3), min_size=branches, max_size=branches)),
        "causal": draw(st.booleans()),
        "offsets": draw(st.sampled_from(["paper", "torchscale"])),
        "rope": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def random_attention_params(rng, embed_dim):
    params = {}
    for name in nn.PROJECTIONS:
        params[f"{name}.weight"] = rng.standard_normal((embed_dim, embed_dim)) / math.sqrt(embed_dim)
        params[f"{name}.bias"] = 0.5 * rng.standard_normal(embed_dim)
    return params


@settings(max_examples=40, deadline=None)
@given(attention_problems())
def test_attention_backward_is_the_gradient(problem):
    rng = np.random.default_rng(problem["seed"])
    params = random_attention_params(rng, problem["embed_dim"])
    x = rng.standard_normal((problem["batch"], problem["n"], problem["embed_dim"]))
    options = {key: problem[key] for key in ("num_heads", "kind", "segment_lengths", "dilation_rates", "causal", "offsets", "rope")}
    y, cache = nn.attention_forward(params, x, **options)
    dy = rng.standard_normal(y.shape)
    dx, grads = nn.attention_backward(params, cache, dy)
    assert set(grads) == set(params) and dx.shape == x.shape
    loss = lambda: float((nn.attention_forward(params, x, **options)[0] * dy).sum())
    check_directions(loss, {"x": x, **params}, {"x": dx, **grads}, rng)


def test_initialisers_give_the_shapes_and_dtypes_the_layers_expect():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    mlp = nn.init_mlp(rng, 8, 32, dtype=np.float32)
    norm = nn.init_layernorm(8, dtype=np.float32)
    embedding = nn.init_embedding(rng, 11, 8, dtype=np.float32)
    attention = nn.init_attention(rng, 8, dtype=np.float32)
    assert {k: v.shape for k, v in mlp.items()} == {"fc1.weight": (32, 8), "fc1.bias": (32,), "fc2.weight": (8, 32), "fc2.bias": (8,)}
    assert set(attention) == {f"{p}.{w}" for p in nn.PROJECTIONS for w in ("weight", "bias")}
    assert not attention["out_proj.bias"].any()  # torchscale's reset_parameters zeroes it
    for y in (
        nn.mlp_forward(mlp, x)[0],
        nn.layernorm_forward(norm, x)[0],
        nn.embedding_forward(embedding, np.zeros((2, 3), int))[0],
        nn.attention_forward(attention, x, num_heads=2, kind="dense")[0],
    ):
        assert y.shape == (2, 3, 8) and y.dtype == np.float32


@pytest.mark.parametrize("layer", ["layernorm", "mlp", "cross_entropy"])
def test_the_row_blocked_layers_stay_the_gradient_across_blocks(layer, monkeypatch):
    """The row-wise layers run over blocks of ``nn.ROW_BLOCK`` rows; with 4-row blocks a
    ``(2, 5)`` input has three blocks, the last one ragged: still the exact gradient."""
    monkeypatch.setattr(nn, "ROW_BLOCK", 4)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 3))
    if layer == "layernorm":
        params = {"weight": rng.standard_normal(3), "bias": rng.standard_normal(3)}
        check_all_coordinates(nn.layernorm_forward, nn.layernorm_backward, x, params, rng)
    elif layer == "mlp":
        params = {
            "fc1.weight": rng.standard_normal((4, 3)),
            "fc1.bias": rng.standard_normal(4),
            "fc2.weight": rng.standard_normal((3, 4)),
            "fc2.bias": rng.standard_normal(3),
        }
        check_all_coordinates(nn.mlp_forward, nn.mlp_backward, x, params, rng)
    else:
        targets = rng.integers(0, 3, (2, 5))
        mask = rng.random((2, 5)) < 0.7
        mask[0, 0] = True
        loss, cache = nn.cross_entropy_forward(x, targets, mask)
        assert loss == pytest.approx(naive_cross_entropy(x, targets, mask), rel=HAND_F64["rtol"])
        numeric = central_differences(lambda: float(nn.cross_entropy_forward(x, targets, mask)[0]), x)
        np.testing.assert_allclose(nn.cross_entropy_backward(cache), numeric, **TOL)


def test_cross_entropy_divides_by_the_given_count():
    """``count`` (the targets of every rank, in sequence-parallel training) replaces ``|mask|``."""
    logits = np.zeros((1, 2, 4))  # uniform: -log p = log 4 for every target
    loss, _ = nn.cross_entropy_forward(logits, np.array([[0, 1]]), np.array([[True, False]]), count=4)
    assert loss == pytest.approx(math.log(4) / 4)
    loss, _ = nn.cross_entropy_forward(logits, np.array([[0, 1]]), np.array([[False, False]]), count=4)
    assert loss == 0.0  # a rank with no target of its own contributes nothing
    with pytest.raises(ValueError, match="count"):
        nn.cross_entropy_forward(logits, np.array([[0, 1]]), None, count=1)  # fewer than the mask's 2


@pytest.mark.parametrize("kind", nn.ATTENTION_KINDS)
@pytest.mark.parametrize("per_batch", [False, True], ids=["positions-N", "positions-BN"])
def test_attention_applies_rope_at_the_given_positions(kind, per_batch):
    """``positions`` (irregular, not ``0..N-1`` shifted: RoPE is blind to a common shift) feed the
    rotation of q and k; the layer equals projections + complex-rotation RoPE + the loop oracle."""
    rng = np.random.default_rng(7)
    batch, n, heads, embed_dim = 2, 9, 2, 8
    params = random_attention_params(rng, embed_dim)
    x = rng.standard_normal((batch, n, embed_dim))
    positions = np.array([[0, 3, 4, 9, 10, 17, 30, 31, 50], [5, 6, 8, 13, 21, 34, 55, 89, 144]])
    positions = positions if per_batch else positions[0]
    config = SimpleNamespace(n_heads=heads, rope=True, attention=kind, causal=True, offsets="paper", segment_lengths=(3, 6), dilation_rates=(1, 2), window=4)
    options = dict(num_heads=heads, kind=kind, segment_lengths=[3, 6], dilation_rates=[1, 2], window=4, causal=True, rope=True)
    y, _ = nn.attention_forward({k: v for k, v in params.items()}, x, positions=positions, **options)
    expected = np.stack([oracle.attention_layer(config, params, "", x[b : b + 1], positions[b] if per_batch else positions)[0] for b in range(batch)])
    np.testing.assert_allclose(y, expected, **LAYER_F64)
    default, _ = nn.attention_forward(params, x, **options)  # positions=None: 0..N-1
    np.testing.assert_allclose(default, oracle.attention_layer(config, params, "", x, np.arange(n)), **LAYER_F64)
    assert np.abs(default - y).max() > 1e-3  # the positions matter


def assert_uniform_sample(values, bound, name):
    """``U(-bound, bound)``: every draw within the bound, the largest close to it, std ``bound/sqrt(3)``."""
    assert np.abs(values).max() <= bound, name
    assert np.abs(values).max() >= bound * (1 - UNIFORM_MAX_SLACK), name
    assert abs(values.mean()) <= sample_mean_atol(values.size, bound / math.sqrt(3)), name
    assert values.std() == pytest.approx(bound / math.sqrt(3), rel=sample_std_rtol(values.size, kurtosis=9 / 5)), name


def test_attention_init_is_torchscales_xavier_with_gain_one_over_sqrt2_for_q_k_v():
    """torchscale's ``reset_parameters``: q, k, v Xavier-uniform with gain ``1/sqrt(2)``, out_proj
    gain 1; bound ``gain sqrt(6 / (E + E))``; q/k/v biases ``U(+-1/sqrt(E))`` (torch.nn.Linear's),
    out_proj bias 0."""
    embed_dim = 256
    params = nn.init_attention(np.random.default_rng(3), embed_dim)
    for name in nn.PROJECTIONS:
        gain = 1.0 if name == "out_proj" else 1 / math.sqrt(2)
        assert_uniform_sample(params[f"{name}.weight"], gain * math.sqrt(6 / (2 * embed_dim)), name)
        if name == "out_proj":
            np.testing.assert_array_equal(params[f"{name}.bias"], 0.0)
        else:
            bias = params[f"{name}.bias"]
            assert np.abs(bias).max() <= 1 / math.sqrt(embed_dim) and np.abs(bias).max() > 0.8 / math.sqrt(embed_dim), name
    assert not np.array_equal(params["q_proj.weight"], params["k_proj.weight"])


def test_linear_mlp_embedding_and_layernorm_init():
    rng = np.random.default_rng(4)
    mlp = nn.init_mlp(rng, 64, 256)
    assert_uniform_sample(mlp["fc1.weight"], math.sqrt(6 / (64 + 256)), "fc1")
    assert_uniform_sample(mlp["fc2.weight"], math.sqrt(6 / (256 + 64)), "fc2")
    # biases U(-1/sqrt(in), 1/sqrt(in)): the largest of 256 (64) draws exceeds 0.9 (0.8) of the
    # bound but with probability 0.9^256 ~ 2e-12 (0.8^64 ~ 6e-7)
    for name, fan_in, fraction in (("fc1.bias", 64, 0.9), ("fc2.bias", 256, 0.8)):
        largest = np.abs(mlp[name]).max()
        assert fraction / math.sqrt(fan_in) < largest <= 1 / math.sqrt(fan_in), name
    linear = nn.init_linear(rng, 128, 128, gain=2.0, zero_bias=True)
    assert_uniform_sample(linear["weight"], 2.0 * math.sqrt(6 / 256), "gain 2")
    np.testing.assert_array_equal(linear["bias"], 0.0)
    embedding = nn.init_embedding(rng, 100, 64, std=0.02)["weight"]
    assert embedding.shape == (100, 64)
    assert abs(embedding.mean()) <= sample_mean_atol(embedding.size, 0.02)
    assert embedding.std() == pytest.approx(0.02, rel=sample_std_rtol(embedding.size, kurtosis=3))
    norm = nn.init_layernorm(5, dtype=np.float32)
    np.testing.assert_array_equal(norm["weight"], np.ones(5, np.float32))
    np.testing.assert_array_equal(norm["bias"], np.zeros(5, np.float32))


def test_a_kv_cache_continues_rope_at_its_own_position_when_positions_are_not_given():
    """With a ``kv_cache`` and no ``positions``, the rows are ``t .. t + N - 1`` after the cached
    ``t`` (the docstring's default): a prompt of 3, then 4 single rows, equal the causal layer
    written out (tests/oracle.py) at positions ``0 .. 6``."""
    from longnet_ref.decode import DilatedKVCache

    config = SimpleNamespace(
        n_heads=2, rope=True, attention="dilated", segment_lengths=(2, 4), dilation_rates=(1, 2), causal=True, offsets="paper", window=None
    )
    rng = np.random.default_rng(0)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in nn.init_attention(rng, 8).items()}
    x = rng.standard_normal((1, 7, 8))
    expected = oracle.attention_layer(config, params, "", x, np.arange(7))
    cache = DilatedKVCache(1, 2, 4, 4, [2, 4], [1, 2])
    options = dict(num_heads=2, kind="dilated", segment_lengths=[2, 4], dilation_rates=[1, 2], causal=True, rope=True)
    rows = [nn.attention_forward(params, x[:, :3], kv_cache=cache, **options)[0]]
    rows += [nn.attention_forward(params, x[:, t : t + 1], kv_cache=cache, **options)[0] for t in range(3, 7)]
    np.testing.assert_allclose(np.concatenate(rows, axis=1), expected, **LAYER_F64)


def test_cross_entropy_takes_a_count_equal_to_the_masks_targets():
    """``count = |mask|`` (every target on one rank) is the plain masked mean; one less is refused."""
    logits = np.zeros((1, 3, 4))  # uniform: -log p = log 4 for every target
    mask = np.array([[True, False, True]])
    loss, _ = nn.cross_entropy_forward(logits, np.array([[0, 1, 2]]), mask, count=2)
    assert loss == pytest.approx(math.log(4), rel=HAND_F64["rtol"])
    with pytest.raises(ValueError, match="count must be at least the mask's 2 targets"):
        nn.cross_entropy_forward(logits, np.array([[0, 1, 2]]), mask, count=1)


@pytest.mark.parametrize("mask", [np.array([[1, 0, 1]]), np.array([[1.0, 0.0, 1.0]]), np.array([[2, 0, 2]])], ids=["int", "float", "weights"])
def test_cross_entropy_refuses_a_mask_that_is_not_bool(mask):
    """The mask selects targets; a 0/1 array of numbers is not read as weights (a 2 would double one)."""
    with pytest.raises(ValueError, match="mask must be a bool array"):
        nn.cross_entropy_forward(np.zeros((1, 3, 4)), np.array([[0, 1, 2]]), mask)


def test_a_kv_cache_must_be_the_causal_cache_of_the_kinds_branches_and_steps_one_row():
    """Each refusal guards a silent wrong answer: a cache would decode causally whatever ``causal``
    says, a dense cache would attend every key of a dilated layer, a cache of other branches would
    hold other rows, and a step reads one row (the others would be dropped)."""
    from longnet_ref.decode import DenseKVCache, DilatedKVCache

    rng = np.random.default_rng(0)
    params = nn.init_attention(rng, 8)
    x = rng.standard_normal((1, 4, 8))
    dilated = dict(num_heads=2, kind="dilated", segment_lengths=[2, 4], dilation_rates=[1, 2])
    with pytest.raises(ValueError, match="kv_cache needs causal=True"):
        nn.attention_forward(params, x, causal=False, kv_cache=DilatedKVCache(1, 2, 4, 4, [2, 4], [1, 2]), **dilated)
    for wrong in (DenseKVCache(1, 2, 4, 4), DilatedKVCache(1, 2, 4, 4, [4, 2], [2, 1]), DilatedKVCache(1, 2, 4, 4, [2], [1])):
        with pytest.raises(ValueError, match="kv_cache must be the cache of this dilated attention"):
            nn.attention_forward(params, x, causal=True, kv_cache=wrong, **dilated)
    with pytest.raises(ValueError, match="kv_cache must be the cache of this dense attention"):
        nn.attention_forward(params, x, num_heads=2, kind="dense", causal=True, kv_cache=DilatedKVCache(1, 2, 4, 4, [4], [1]))
    cache = DilatedKVCache(1, 2, 4, 4, [2, 4], [1, 2])
    nn.attention_forward(params, x[:, :3], causal=True, kv_cache=cache, **dilated)  # the prompt: rows 0 .. 2
    with pytest.raises(ValueError, match="a kv_cache at position 3 takes one new row at a time, got 2"):
        nn.attention_forward(params, x[:, 2:], causal=True, kv_cache=cache, **dilated)


def test_rope_keeps_float32_in_float32():
    """The rotation is applied in the input's dtype (a float32 model stays float32 end to end), and
    its float32 values are the float64 rotation's to float32 rounding."""
    x = np.random.default_rng(0).standard_normal((1, 5, 2, 4))
    y32, _ = nn.rope_forward(x.astype(np.float32), np.arange(5))
    y64, _ = nn.rope_forward(x, np.arange(5))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, **SUMMATION[F32])


def test_a_window_of_zero_is_refused_even_where_the_branches_could_size_one():
    """``window=None`` derives the window from the branches; ``window=0`` is a wrong value, not "none"."""
    rng = np.random.default_rng(0)
    params, x = nn.init_attention(rng, 8), rng.standard_normal((1, 4, 8))
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        nn.attention_forward(params, x, num_heads=2, kind="window", window=0, segment_lengths=[4], dilation_rates=[1])
