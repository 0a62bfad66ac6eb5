"""When do stacked layers of dilated attention link every pair of tokens? (docs/complexity.md)

The paper (§2.4, Eqs. 19-20) says any two tokens are linked in O(log N) layers. That needs
conditions, stated here as properties and proved on the complexity page:

- causal: a token reaches a later one only through tokens in between, so the neighbours
  ``b - 1 -> b`` must be linked directly, which only a dilation-1 branch whose segment holds both
  can do. The graph connects exactly when every ``b`` in ``1..N-1`` is inside a segment of some
  ``r = 1`` branch, whatever the number of heads;
- non-causal: the geometric configuration ``w_i = w_0 a^i``, ``r_i = a^i`` up to ``w >= N``, with
  ``a`` dividing ``w_0``, connects with one head already, within ``2k - 1`` layers for ``k`` branches.
"""

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import complexity


def neighbours_share_a_dilation_one_segment(n, segment_lengths, dilation_rates):
    """The condition written from the definition: b - 1 and b in one segment of an r = 1 branch."""
    return all(any(r == 1 and b // w == (b - 1) // w for w, r in zip(segment_lengths, dilation_rates)) for b in range(1, n))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 48),
    heads=st.integers(1, 5),
    branches=st.lists(st.tuples(st.integers(1, 24), st.integers(1, 3)), min_size=1, max_size=3),
    offsets=st.sampled_from(["paper", "torchscale"]),
)
def test_causal_layers_connect_exactly_when_neighbouring_tokens_share_a_dilation_one_segment(n, heads, branches, offsets):
    w, r = [b[0] for b in branches], [b[1] for b in branches]
    connected = complexity.path_length(n, heads, w, r, causal=True, offsets=offsets) is not None
    assert connected == neighbours_share_a_dilation_one_segment(n, w, r)


def test_the_papers_geometric_configuration_never_connects_causally_whatever_the_heads():
    """Review finding: 'with H >= max r the graph connects' is false. Token 63 never reaches 64."""
    w, r = [64, 128, 256], [1, 2, 4]
    for heads in range(1, 9):
        assert complexity.path_length(256, heads, w, r, causal=True) is None
        assert complexity.path_length(256, heads, w, r, causal=True, source=63, target=64) is None
        assert complexity.path_length(256, heads, w, r, causal=True, source=62, target=63) == 1
    # one r = 1 branch covering the sequence is enough: one layer
    assert complexity.path_length(256, 1, [256, 64], [1, 2], causal=True) == 1


@settings(max_examples=40, deadline=None)
@given(
    first=st.integers(1, 6),
    ratio=st.integers(2, 3),
    n=st.integers(2, 160),
    heads=st.integers(1, 4),
)
def test_geometric_configurations_with_the_ratio_dividing_w0_connect_within_2k_minus_1_layers(first, ratio, n, heads):
    w0 = first * ratio  # the ratio divides w_0
    w, r = complexity.geometric_configuration(n, w0, ratio)
    layers = complexity.path_length(n, heads, w, r)
    assert layers is not None and layers <= 2 * len(w) - 1
    assert len(w) == 1 + max(0, math.ceil(math.log(n / w0, ratio) - 1e-12))  # k = 1 + ceil(log_a(N / w0))
