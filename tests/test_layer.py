"""The drop-in layer: multi-head dilated attention with torchscale's parameters (SPEC §4, §8).

Three independent oracles for the layer's forward:
- projections written out here + ``dense_attention`` with the multiplicity bias ``log m``;
- for one full segment without dilation, the ``"dense"`` kind (forward and gradients);
- a NumPy transcription of torchscale's ``DilatedAttention.forward`` (microsoft/torchscale,
  ``torchscale/component/dilated_attention.py``): ``dense_to_sparse``, padding, per-branch
  flash attention, ``sparse_to_dense`` and the log-sum-exp mixture, rearrange by rearrange.
"""

import math
import os
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import MultiheadDilatedAttention, dense_attention, nn
from longnet_ref.backends import backend_names
from longnet_ref.complexity import attended_pairs

from . import oracle
from .test_nn import random_attention_params
from .tolerances import LAYER_F64, SUMMATION

TOL64 = LAYER_F64  # tests/tolerances.py


def project(params, name, x):
    """torch.nn.Linear: ``x W^T + b``."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def heads(x, num_heads):
    """``b l (h d) -> b l h d``."""
    batch, n, embed_dim = x.shape
    return x.reshape(batch, n, num_heads, embed_dim // num_heads)


def oracle_layer(params, x, num_heads, segment_lengths, dilation_rates, causal, offsets):
    """Projections, dense attention with bias ``log m`` (SPEC §4), output projection."""
    q, k, v = (heads(project(params, name, x), num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    counts = oracle.multiplicity(x.shape[1], num_heads, segment_lengths, dilation_rates, causal, offsets)  # the loop oracle's index rule
    with np.errstate(divide="ignore"):
        bias = np.log(counts.astype(np.float64))[None]  # (1, H, N, N), -inf where m = 0
    o = dense_attention(q, k, v, causal=causal, bias=bias)  # (B, N, H, D)
    return project(params, "out_proj", o.reshape(x.shape))


@st.composite
def layer_problems(draw, max_n=16):
    num_heads = draw(st.integers(1, 4))
    branches = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    return {
        "batch": draw(st.integers(1, 2)),
        "n": n,
        "num_heads": num_heads,
        "head_dim": draw(st.integers(1, 3)),
        "segment_lengths": draw(st.lists(st.integers(1, max_n + 2), min_size=branches, max_size=branches)),
        "dilation_rates": draw(st.lists(st.integers(1, 4), min_size=branches, max_size=branches)),
        "causal": draw(st.booleans()),
        "offsets": draw(st.sampled_from(["paper", "torchscale"])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_layer(problem):
    layer = MultiheadDilatedAttention(
        problem["num_heads"] * problem["head_dim"],
        problem["num_heads"],
        problem["segment_lengths"],
        problem["dilation_rates"],
        causal=problem["causal"],
        offsets=problem["offsets"],
    )
    rng = np.random.default_rng(problem["seed"])
    layer.load_state_dict(random_attention_params(rng, layer.embed_dim))
    x = rng.standard_normal((problem["batch"], problem["n"], layer.embed_dim))
    return layer, x, rng


@settings(max_examples=60, deadline=None)
@given(layer_problems())
def test_layer_equals_projections_plus_dense_attention_with_multiplicity_bias(problem):
    layer, x, _ = make_layer(problem)
    y, _ = layer.forward(x)
    expected = oracle_layer(layer.params, x, layer.num_heads, layer.segment_lengths, layer.dilation_rates, layer.causal, layer.offsets)
    np.testing.assert_allclose(y, expected, **TOL64)


@settings(max_examples=30, deadline=None)
@given(layer_problems(), st.booleans())
def test_one_full_segment_without_dilation_equals_the_dense_kind(problem, rope):
    layer, x, rng = make_layer(problem)
    n = x.shape[1]
    common = {"num_heads": layer.num_heads, "causal": layer.causal, "rope": rope and layer.embed_dim // layer.num_heads % 2 == 0}
    y, cache = nn.attention_forward(layer.params, x, kind="dilated", segment_lengths=[n], dilation_rates=[1], **common)
    y_dense, cache_dense = nn.attention_forward(layer.params, x, kind="dense", **common)
    np.testing.assert_allclose(y, y_dense, **TOL64)
    dy = rng.standard_normal(y.shape)
    dx, grads = nn.attention_backward(layer.params, cache, dy)
    dx_dense, grads_dense = nn.attention_backward(layer.params, cache_dense, dy)
    np.testing.assert_allclose(dx, dx_dense, **TOL64)
    for name in grads:
        np.testing.assert_allclose(grads[name], grads_dense[name], err_msg=name, **TOL64)


@settings(max_examples=30, deadline=None)
@given(layer_problems(), st.integers(1, 8))
def test_window_kind_attends_exactly_its_own_block(problem, window):
    layer, x, _ = make_layer(problem)
    n = x.shape[1]
    y, _ = nn.attention_forward(layer.params, x, num_heads=layer.num_heads, kind="window", window=window, causal=layer.causal)
    # oracle: dense attention with bias 0 inside each block [s W, (s + 1) W), -inf across blocks
    block = np.arange(n) // window
    bias = np.where(block[:, None] == block[None, :], 0.0, -np.inf)  # (N, N)
    q, k, v = (heads(project(layer.params, name, x), layer.num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    o = dense_attention(q, k, v, causal=layer.causal, bias=bias)
    np.testing.assert_allclose(y, project(layer.params, "out_proj", o.reshape(x.shape)), **TOL64)


@pytest.mark.parametrize(
    ("segment_lengths", "dilation_rates", "n"),
    [([4], [1], 16), ([4, 8, 16], [1, 2, 4], 112), ([8, 16], [2, 4], 48), ([6, 12], [1, 2], 36)],
)
@pytest.mark.parametrize("causal", [False, True])
def test_window_for_scores_as_many_pairs_as_the_dilated_configuration(segment_lengths, dilation_rates, n, causal):
    # configurations where N is a multiple of every w and of W, and every w of its r: the counts
    # are then exact (non-causal) or differ only by the diagonal terms (causal)
    window = nn.window_for(segment_lengths, dilation_rates)
    heads_ = max(dilation_rates)  # enough heads that every offset is used
    dilated = attended_pairs(n, heads_, segment_lengths, dilation_rates, causal=causal)
    blocked = attended_pairs(n, heads_, [window], [1], causal=causal)
    if causal:
        # a causal block of T rows scores T (T + 1) / 2 pairs: per head and token, the window
        # scores (W + 1) / 2 and the branches sum_i (w_i / r_i^2 + 1 / r_i) / 2, so the counts
        # differ only by the diagonal terms, N H (1 - sum_i 1 / r_i) / 2
        diagonal = Fraction(n * heads_) * (1 - sum(Fraction(1, r) for r in dilation_rates)) / 2
        assert blocked - dilated == diagonal
    else:
        assert blocked == dilated


def test_window_for_is_the_paper_cost_sum_of_w_over_r_squared():
    assert nn.window_for([2048, 4096, 8192, 16384, 32768], [1, 2, 4, 6, 12]) == math.ceil(2048 + 4096 / 4 + 8192 / 16 + 16384 / 36 + 32768 / 144)
    assert nn.window_for([4], [3]) == 1


# ---------------------------------------------------------------------------------------------
# torchscale's DilatedAttention, transcribed to NumPy (microsoft/torchscale @ 4d1e0e8)
# ---------------------------------------------------------------------------------------------

TORCHSCALE_MISSING_LSE = -1e8  # torchscale marks "this head does not see this row" with -1e8


def padding_to_multiple_of(n, mult):
    return (mult - n % mult) % mult


def ts_dense_to_sparse(x, ratio):
    """``b (l r1) (r2 h) d -> b l h d r1 r2``, the diagonal ``r1 = r2``, ``-> b l (r h) d``."""
    batch, length, num_heads, dim = x.shape
    x = np.pad(x, ((0, 0), (0, padding_to_multiple_of(length, ratio)), (0, padding_to_multiple_of(num_heads, ratio)), (0, 0)))
    rows, heads_per_block = x.shape[1] // ratio, x.shape[2] // ratio
    x = x.reshape(batch, rows, ratio, ratio, heads_per_block, dim)  # b l r1 r2 h d
    x = x[:, :, np.arange(ratio), np.arange(ratio)]  # diagonal: (b, l, r, h, d)
    return x.reshape(batch, rows, ratio * heads_per_block, dim)[:, :, :num_heads]  # b l (r h) d


def ts_sparse_to_dense(out, lse, ratio):
    """``out (b, l, H, d)``, ``lse (b, H, l)`` -> ``(b, H, l r, d)``, ``(b, H, l r, 1)``."""
    batch, rows, num_heads, dim = out.shape
    head_padding = padding_to_multiple_of(num_heads, ratio)
    out = np.pad(out, ((0, 0), (0, 0), (0, head_padding), (0, 0)))
    lse = np.pad(lse, ((0, 0), (0, head_padding), (0, 0)), constant_values=TORCHSCALE_MISSING_LSE)
    hb = out.shape[2] // ratio
    diagonal = np.arange(ratio)
    out = out.reshape(batch, rows, ratio, hb, dim).transpose(0, 1, 3, 4, 2)  # b l h d r
    embedded = np.zeros(out.shape + (ratio,))
    embedded[..., diagonal, diagonal] = out  # diag_embed: (b, l, h, d, r1, r2)
    out = embedded.transpose(0, 5, 2, 1, 4, 3).reshape(batch, ratio * hb, rows * ratio, dim)  # b (r2 h) (l r1) d
    lse = lse.reshape(batch, ratio, hb, rows).transpose(0, 3, 2, 1)  # b l h r
    embedded = np.zeros(lse.shape + (ratio,))
    embedded[..., diagonal, diagonal] = lse  # (b, l, h, r1, r2)
    embedded[embedded == 0] = TORCHSCALE_MISSING_LSE  # masked_fill_(lse == 0, -1e8)
    lse = embedded.transpose(0, 4, 2, 1, 3).reshape(batch, ratio * hb, rows * ratio, 1)  # b (r2 h) (l r1) 1
    return out[:, :num_heads], lse[:, :num_heads]


def ts_gathering(x, ratio, segment_length):
    """Pad to a multiple of the segment, ``b (n g) h d -> (b n) g h d``, then dense_to_sparse."""
    _, length, num_heads, dim = x.shape
    segment_length = min(segment_length, length)
    x = np.pad(x, ((0, 0), (0, padding_to_multiple_of(length, segment_length)), (0, 0), (0, 0)))
    x = x.reshape(-1, segment_length, num_heads, dim)  # (b n) g h d
    return ts_dense_to_sparse(x, ratio)


def ts_flash_attention(q, k, v, causal):
    """flash_attn_func on ``(b, l, h, d)``: softmax(q k^T / sqrt(d)), ``(out, lse (b, h, l))``."""
    scores = np.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tri(q.shape[1], dtype=bool), scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(scores - m).sum(axis=-1))
    out = np.einsum("bhlm,bmhd->blhd", np.exp(scores - lse[..., None]), v)
    return out, lse


def torchscale_dilated_attention(params, x, num_heads, segment_lengths, dilation_rates, causal):
    """``DilatedAttention.forward(x, x, x, is_causal=causal)``, no incremental state, no xPos."""
    batch, length, embed_dim = x.shape
    q, k, v = (heads(project(params, name, x), num_heads) for name in ("q_proj", "k_proj", "v_proj"))
    outs, lses = [], []
    for segment_length, ratio in zip(segment_lengths, dilation_rates):
        qi, ki, vi = (ts_gathering(t, ratio, segment_length) for t in (q, k, v))
        out, lse = ts_flash_attention(qi, ki, vi, causal)
        out, lse = ts_sparse_to_dense(out, lse, ratio)  # (b n, h, g, d), (b n, h, g, 1)
        # scattering: (b n) h g d -> b h (n g) d, keep the first `length` rows
        out = out.reshape(batch, -1, num_heads, out.shape[2], out.shape[3]).transpose(0, 2, 1, 3, 4)
        lse = lse.reshape(batch, -1, num_heads, lse.shape[2], 1).transpose(0, 2, 1, 3, 4)
        outs.append(out.reshape(batch, num_heads, -1, out.shape[-1])[:, :, :length])
        lses.append(lse.reshape(batch, num_heads, -1, 1)[:, :, :length])
    lses = np.stack(lses)  # (branches, b, h, l, 1); torchscale: under no_grad
    weights = np.exp(lses - lses.max(axis=0))
    weights = weights / weights.sum(axis=0)
    attn = sum(o * w for o, w in zip(outs, weights))  # (b, h, l, d)
    attn = attn.transpose(0, 2, 1, 3).reshape(batch, length, embed_dim)  # b l (h d)
    return project(params, "out_proj", attn)


def torchscale_is_exact(n, segment_lengths, dilation_rates, causal):
    """SPEC §8: outside rows 2 (padding in a non-causal softmax) and 4 (misaligned segments)."""
    for w, r in zip(segment_lengths, dilation_rates):
        g = min(w, n)  # torchscale's effective segment length
        if n > w and w % r:  # row 4: later segments written at s * ceil(w/r) * r
            return False
        if not causal and (n % g or g % r):  # row 2: zero-padded keys enter the softmax
            return False
    return True


@st.composite
def torchscale_exact_problems(draw):
    problem = draw(layer_problems(max_n=24))
    exact = [n for n in range(1, 25) if torchscale_is_exact(n, problem["segment_lengths"], problem["dilation_rates"], problem["causal"])]
    problem["n"] = draw(st.sampled_from(exact)) if exact else problem["n"]
    problem["offsets"] = "torchscale"
    return problem


@settings(max_examples=80, deadline=None)
@given(torchscale_exact_problems())
def test_layer_with_torchscale_offsets_equals_torchscale_where_spec_says_it_is_exact(problem):
    layer, x, _ = make_layer(problem)
    n = x.shape[1]
    if not torchscale_is_exact(n, layer.segment_lengths, layer.dilation_rates, layer.causal):
        return  # no exact length for this configuration (rare); the SPEC §8 cases are below
    expected = torchscale_dilated_attention(layer.params, x, layer.num_heads, layer.segment_lengths, layer.dilation_rates, layer.causal)
    np.testing.assert_allclose(layer.forward(x)[0], expected, **TOL64)


def test_transcription_shows_the_padding_quirk_of_spec_section_8():
    # the transcription is not the layer: non-causal with N % w != 0, zero keys join the softmax
    problem = {
        "batch": 1,
        "n": 6,
        "num_heads": 2,
        "head_dim": 2,
        "segment_lengths": [4],
        "dilation_rates": [1],
        "causal": False,
        "offsets": "torchscale",
        "seed": 3,
    }
    layer, x, _ = make_layer(problem)
    expected = torchscale_dilated_attention(layer.params, x, 2, [4], [1], False)
    assert np.abs(layer.forward(x)[0] - expected).max() > 1e-3


def test_transcription_matches_real_torchscale_when_available():
    """Optional: run torchscale's own module (CPU, float64) against the transcription.

    Needs ``torch`` and ``einops`` importable and ``LONGNET_REF_TORCHSCALE`` pointing at a
    torchscale checkout; flash-attn is CUDA-only, so its ``flash_attn_func`` is replaced by the
    plain softmax attention it computes (out and lse). Not part of CI.
    """
    source = os.environ.get("LONGNET_REF_TORCHSCALE")
    if not source:
        pytest.skip("set LONGNET_REF_TORCHSCALE to a torchscale checkout (and install torch, einops) to run")
    torch = pytest.importorskip("torch")
    pytest.importorskip("einops")
    import sys

    sys.path.insert(0, source)
    import torchscale.component.multihead_attention as mha
    from torchscale.component.dilated_attention import DilatedAttention

    def flash_attn_func(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):  # b l h d
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(q.shape[-1])
        if is_causal:
            scores = scores.masked_fill(~torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # (b, h, l)
        return torch.einsum("bhlm,bmhd->blhd", torch.exp(scores - lse[..., None]), v), lse

    mha.flash_attn_func = flash_attn_func
    rng = np.random.default_rng(0)
    worst, exact_cases, transcription_error = 0.0, 0, 0.0
    cases = [
        (16, 4, [4, 8], [1, 2], True),
        (16, 4, [4, 8], [1, 2], False),
        (12, 3, [6, 12, 4], [2, 3, 1], True),
        (24, 3, [8, 24], [2, 4], False),
        (10, 5, [4, 16], [2, 3], True),
        (6, 2, [4], [1], False),
        (10, 3, [3, 6], [2, 4], True),
    ]  # the last two: SPEC §8 rows 2 and 4
    for n, num_heads, segment_lengths, dilation_rates, causal in cases:
        args = type(
            "Args",
            (),
            {
                "flash_attention": True,
                "multiway": False,
                "xpos_rel_pos": False,
                "layernorm_eps": 1e-5,
                "segment_length": segment_lengths,
                "dilated_ratio": dilation_rates,
                "seq_parallel": False,
            },
        )()
        module = DilatedAttention(args, num_heads * 2, num_heads, self_attention=True).double()
        params = random_attention_params(rng, num_heads * 2)
        module.load_state_dict({name: torch.from_numpy(value) for name, value in params.items()})
        x = rng.standard_normal((2, n, num_heads * 2))
        with torch.no_grad():
            real = module(torch.from_numpy(x), torch.from_numpy(x), torch.from_numpy(x), is_causal=causal)[0].numpy()
        transcribed = torchscale_dilated_attention(params, x, num_heads, segment_lengths, dilation_rates, causal)
        np.testing.assert_allclose(transcribed, real, **TOL64)
        transcription_error = max(transcription_error, float(np.abs(transcribed - real).max()))
        if torchscale_is_exact(n, segment_lengths, dilation_rates, causal):
            layer = MultiheadDilatedAttention(num_heads * 2, num_heads, segment_lengths, dilation_rates, causal=causal, offsets="torchscale")
            layer.load_state_dict({name: tensor.numpy() for name, tensor in module.state_dict().items()})
            worst = max(worst, float(np.abs(layer.forward(x)[0] - real).max()))
            exact_cases += 1
    print(f"max |transcription - torchscale| over {len(cases)} cases: {transcription_error:.3e}")
    print(f"max |layer - torchscale| over {exact_cases} exact cases: {worst:.3e}")
    assert exact_cases == len(cases) - 2 and worst < 1e-10


# ---------------------------------------------------------------------------------------------
# The module: parameters, state dicts, bad input
# ---------------------------------------------------------------------------------------------


def test_params_carry_torchscale_names_and_shapes_and_depend_only_on_the_seed():
    layer = MultiheadDilatedAttention(12, 3, [4], [1], seed=5)
    assert {name: value.shape for name, value in layer.params.items()} == {
        f"{proj}.{kind}": (12, 12) if kind == "weight" else (12,) for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for kind in ("weight", "bias")
    }
    again = MultiheadDilatedAttention(12, 3, [8, 16], [1, 2], seed=5)
    other = MultiheadDilatedAttention(12, 3, [4], [1], seed=6)
    for name in layer.params:
        np.testing.assert_array_equal(layer.params[name], again.params[name])
    assert any(not np.array_equal(layer.params[name], other.params[name]) for name in layer.params if "weight" in name)


def test_backward_returns_a_gradient_for_every_parameter():
    layer = MultiheadDilatedAttention(8, 2, [4, 8], [1, 2], causal=True)
    x = np.random.default_rng(0).standard_normal((1, 8, 8))
    y, cache = layer.forward(x)
    dx, grads = layer.backward(np.ones_like(y), cache)
    assert dx.shape == x.shape
    assert {name: g.shape for name, g in grads.items()} == {name: p.shape for name, p in layer.params.items()}


class ArrayLike:
    """Anything with ``__array__`` (as a torch tensor after ``.numpy()``, or a CuPy array)."""

    def __init__(self, value):
        self.value = value

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype=dtype)


def test_load_state_dict_copies_array_likes_into_the_layer_dtype():
    layer = MultiheadDilatedAttention(4, 2, [2], [1], dtype=np.float32)
    source = random_attention_params(np.random.default_rng(0), 4)
    layer.load_state_dict({name: ArrayLike(value) for name, value in source.items()})
    for name, value in source.items():
        assert layer.params[name].dtype == np.float32
        np.testing.assert_array_equal(layer.params[name], value.astype(np.float32))
    plain = {name: value.copy() for name, value in source.items()}
    layer.load_state_dict(plain)
    plain["q_proj.weight"][...] = 0  # the layer holds a copy
    assert np.any(layer.params["q_proj.weight"] != 0)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("k_proj.bias"), "missing.*k_proj.bias"),
        (lambda s: s.__setitem__("extra.weight", np.zeros(2)), "unexpected.*extra.weight"),
        (lambda s: s.__setitem__("out_proj.weight", np.zeros((4, 3))), "out_proj.weight.*shape"),
        (lambda s: s.__setitem__("v_proj.bias", np.zeros((1, 4))), "v_proj.bias.*shape"),
    ],
)
def test_load_state_dict_names_the_bad_key(edit, match):
    layer = MultiheadDilatedAttention(4, 2, [2], [1])
    state = layer.state_dict()
    edit(state)
    before = layer.state_dict()
    with pytest.raises(ValueError, match=match):
        layer.load_state_dict(state)
    for name in before:  # a failed load changes nothing
        np.testing.assert_array_equal(layer.params[name], before[name])


def test_bad_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiheadDilatedAttention(10, 3, [4], [1])
    with pytest.raises(ValueError, match="num_heads"):
        MultiheadDilatedAttention(8, 0, [4], [1])
    with pytest.raises(ValueError, match="segment_lengths"):
        MultiheadDilatedAttention(8, 2, [], [])
    with pytest.raises(ValueError, match="dilation_rates"):
        MultiheadDilatedAttention(8, 2, [4], [0])
    with pytest.raises(ValueError, match="offsets"):
        MultiheadDilatedAttention(8, 2, [4], [1], offsets="blocks")
    with pytest.raises(ValueError, match="backend"):
        MultiheadDilatedAttention(8, 2, [4], [1], backend="torch")
    with pytest.raises(TypeError, match="dtype"):
        MultiheadDilatedAttention(8, 2, [4], [1], dtype=np.float16)


def test_bad_input_to_the_layer_names_the_argument():
    layer = MultiheadDilatedAttention(8, 2, [4], [1])
    with pytest.raises(ValueError, match="x must be 3-D"):
        layer.forward(np.zeros((4, 8)))
    with pytest.raises(ValueError, match="params"):
        layer.forward(np.zeros((1, 4, 6)))  # E = 6 does not match the (8, 8) projections
    with pytest.raises(TypeError, match="x"):
        layer.forward(np.zeros((1, 4, 8), np.int64))
    with pytest.raises(TypeError, match="x"):
        layer.forward(np.zeros((1, 4, 8), np.float32))  # a float64 layer
    with pytest.raises(TypeError, match="x"):
        layer.forward([[[0.0] * 8]])


def test_bad_attention_options_name_the_argument():
    params = MultiheadDilatedAttention(8, 2, [4], [1]).params
    x = np.zeros((1, 4, 8))
    with pytest.raises(ValueError, match="kind"):
        nn.attention_forward(params, x, num_heads=2, kind="sparse")
    with pytest.raises(ValueError, match="segment_lengths and dilation_rates"):
        nn.attention_forward(params, x, num_heads=2, kind="dilated")
    with pytest.raises(ValueError, match="window"):
        nn.attention_forward(params, x, num_heads=2, kind="window")
    with pytest.raises(ValueError, match="window"):
        nn.attention_forward(params, x, num_heads=2, kind="window", window=0)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nn.attention_forward(params, x, num_heads=3, kind="dense")
    with pytest.raises(ValueError, match="rope"):
        nn.attention_forward(params, x, num_heads=8, kind="dense", rope=True)  # head dim 1 is odd
    with pytest.raises(TypeError, match="causal"):
        nn.attention_forward(params, x, num_heads=2, kind="dense", causal="yes")


def test_window_kind_derives_its_window_from_the_branches():
    params = random_attention_params(np.random.default_rng(0), 8)
    x = np.random.default_rng(1).standard_normal((2, 20, 8))
    derived, _ = nn.attention_forward(params, x, num_heads=2, kind="window", segment_lengths=[4, 8, 16], dilation_rates=[1, 2, 4])
    given_window, _ = nn.attention_forward(params, x, num_heads=2, kind="window", window=7)  # 4 + 8/4 + 16/16
    np.testing.assert_array_equal(derived, given_window)


def test_float32_layer_agrees_with_float64():
    problem = {
        "batch": 2,
        "n": 24,
        "num_heads": 4,
        "head_dim": 4,
        "segment_lengths": [4, 8, 24],
        "dilation_rates": [1, 2, 4],
        "causal": True,
        "offsets": "paper",
        "seed": 7,
    }
    layer64, x, _ = make_layer(problem)
    layer32 = MultiheadDilatedAttention(16, 4, [4, 8, 24], [1, 2, 4], causal=True, dtype=np.float32)
    layer32.load_state_dict(layer64.params)
    y32, cache32 = layer32.forward(x.astype(np.float32))
    y64, cache64 = layer64.forward(x)
    assert y32.dtype == np.float32
    # unit roundoff 6e-8 times sums of ~16-term dot products of O(1) values: ~1e-6; 1e-4 is safe
    np.testing.assert_allclose(y32, y64, **SUMMATION[np.dtype(np.float32)])
    dx32, grads32 = layer32.backward(np.ones_like(y32), cache32)
    dx64, grads64 = layer64.backward(np.ones_like(y64), cache64)
    assert dx32.dtype == np.float32 and all(g.dtype == np.float32 for g in grads32.values())
    np.testing.assert_allclose(dx32, dx64, **SUMMATION[np.dtype(np.float32)])
    for name in grads64:  # sums over B N = 48 rows of O(1) products: float32 error ~1e-5
        np.testing.assert_allclose(grads32[name], grads64[name], **SUMMATION[np.dtype(np.float32)], err_msg=name)


@pytest.mark.parametrize("kind", nn.ATTENTION_KINDS)
def test_numba_backend_gives_the_numpy_layer(kind):
    params = random_attention_params(np.random.default_rng(0), 8)
    x = np.random.default_rng(1).standard_normal((2, 12, 8))
    options = {"num_heads": 2, "kind": kind, "segment_lengths": [4, 12], "dilation_rates": [1, 3], "causal": True, "rope": True}
    y, cache = nn.attention_forward(params, x, **options)
    y_numba, cache_numba = nn.attention_forward(params, x, backend="numba", **options)
    np.testing.assert_allclose(y_numba, y, **TOL64)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    (dx, grads), (dx_numba, grads_numba) = (nn.attention_backward(params, c, dy) for c in (cache, cache_numba))
    np.testing.assert_allclose(dx_numba, dx, **TOL64)
    for name in grads:
        np.testing.assert_allclose(grads_numba[name], grads[name], err_msg=name, **TOL64)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backend_names(device="gpu"))
@pytest.mark.parametrize("kind", nn.ATTENTION_KINDS)
def test_gpu_backends_give_the_numpy_layer(kind, backend):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 -- any CUDA driver error means: no GPU here
        pytest.skip(f"the CUDA driver is unavailable: {error.__class__.__name__}")
    if devices == 0:
        pytest.skip("no CUDA device visible to CuPy")
    params = random_attention_params(np.random.default_rng(0), 8)
    x = np.random.default_rng(1).standard_normal((2, 12, 8))
    options = {"num_heads": 2, "kind": kind, "segment_lengths": [4, 12], "dilation_rates": [1, 3], "causal": True, "rope": True}
    y, cache = nn.attention_forward(params, x, **options)
    y_gpu, cache_gpu = nn.attention_forward(params, x, backend=backend, **options)
    assert isinstance(y_gpu, np.ndarray)  # only the attention runs on the GPU
    np.testing.assert_allclose(y_gpu, y, **TOL64)
    dy = np.random.default_rng(2).standard_normal(y.shape)
    (dx, grads), (dx_gpu, grads_gpu) = (nn.attention_backward(params, c, dy) for c in (cache, cache_gpu))
    np.testing.assert_allclose(dx_gpu, dx, **TOL64)
    for name in grads:
        np.testing.assert_allclose(grads_gpu[name], grads[name], err_msg=name, **TOL64)


def test_state_dict_is_a_copy():
    """``state_dict()`` is "a copy of params": editing it leaves the layer as it was."""
    layer = MultiheadDilatedAttention(8, 2, [4], [1])
    before = {name: value.copy() for name, value in layer.params.items()}
    state = layer.state_dict()
    for value in state.values():
        value[...] = 0.0
    for name, value in layer.params.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_the_layers_backend_runs_its_attention_forward_and_backward(attention_calls, backend):
    """``MultiheadDilatedAttention(..., backend=b)`` runs its dilated attention on ``b``, both ways."""
    layer = MultiheadDilatedAttention(8, 2, [4], [1], causal=True, backend=backend)
    y, cache = layer.forward(np.random.default_rng(0).standard_normal((1, 8, 8)))
    layer.backward(np.ones_like(y), cache)
    assert attention_calls == [("dilated_attention", backend), ("dilated_attention_backward", backend)]
