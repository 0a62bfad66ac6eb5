"""Paper §2.4 (Eqs. 16-20): exact costs, the closed forms, linear scaling, path length."""

import math
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import complexity, multiplicity

from .tolerances import HAND_F64


@given(st.integers(1, 3), st.data())
@settings(deadline=None)
def test_exact_flops_equal_the_closed_form_when_w_divides_n_and_r_divides_w(num_branches, data):
    dilations = data.draw(st.lists(st.integers(1, 8), min_size=num_branches, max_size=num_branches))
    lengths = [r * data.draw(st.integers(1, 8)) for r in dilations]  # r | w
    n = math.lcm(*lengths) * data.draw(st.integers(1, 3))  # w | N
    heads, dim = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 64))
    offsets = data.draw(st.sampled_from(["paper", "torchscale"]))
    exact = complexity.dilated_flops(n, heads, dim, lengths, dilations, offsets=offsets, batch=2)
    assert exact.qk == complexity.closed_form_flops(n, dim, lengths, dilations, num_heads=heads, batch=2)


@given(st.integers(0, 80), st.integers(1, 5), st.booleans(), st.data())
@settings(deadline=None)
def test_attended_pairs_count_the_multiplicity_matrix(n, heads, causal, data):
    k = data.draw(st.integers(1, 3))
    w = data.draw(st.lists(st.integers(1, 40), min_size=k, max_size=k))
    r = data.draw(st.lists(st.integers(1, 6), min_size=k, max_size=k))
    pairs = complexity.attended_pairs(n, heads, w, r, causal=causal)
    assert pairs == multiplicity(n, heads, w, r, causal=causal).sum()


@pytest.mark.parametrize("causal", [False, True])
def test_flops_grow_linearly_with_n_while_dense_grows_quadratically(causal):
    w, r = [256, 512, 1024, 2048], [1, 2, 4, 8]
    previous = None
    for n in [2**12, 2**13, 2**14, 2**15]:
        flops = complexity.dilated_flops(n, 8, 64, w, r, causal=causal).total
        dense = complexity.dense_flops(n, 8, 64, causal=causal).total
        if previous:
            assert flops == 2 * previous[0]  # exactly linear once N is a multiple of every w
            assert 3.99 < dense / previous[1] <= 4.0  # N^2 (N(N+1)/2 causally)
        previous = (flops, dense)


def bfs_layers(adjacency, source):
    """Plain breadth-first search on a boolean (N, N) matrix adjacency[p, k] (k informs p)."""
    n = adjacency.shape[0]
    depth = np.full(n, -1)
    depth[source] = 0
    queue = deque([source])
    informs = adjacency.T  # informs[k, p]
    while queue:
        k = queue.popleft()
        for p in np.flatnonzero(informs[k]):
            if depth[p] < 0:
                depth[p] = depth[k] + 1
                queue.append(p)
    return depth


@given(st.integers(2, 48), st.integers(1, 4), st.booleans(), st.data())
@settings(deadline=None, max_examples=60)
def test_path_length_equals_breadth_first_search_on_the_multiplicity_graph(n, heads, causal, data):
    k = data.draw(st.integers(1, 3))
    w = data.draw(st.lists(st.integers(1, 24), min_size=k, max_size=k))
    r = data.draw(st.lists(st.integers(1, 5), min_size=k, max_size=k))
    adjacency = multiplicity(n, heads, w, r, causal=causal).any(axis=0)  # (N, N) p <- k
    depths = np.array([bfs_layers(adjacency, s) for s in range(n)])  # depths[s, p]
    wanted = np.tri(n, n, dtype=bool).T if causal else np.ones((n, n), bool)  # s <= p causally
    expected = None if np.any(depths[wanted] < 0) else int(depths[wanted].max())
    assert complexity.path_length(n, heads, w, r, causal=causal) == expected
    first_to_last = depths[0, n - 1]
    assert complexity.path_length(n, heads, w, r, causal=causal, source=0) == (None if first_to_last < 0 else first_to_last)


def test_path_length_stays_within_the_logarithmic_prediction():
    """Eq. 20: l ~ log_a(N (a - 1) / w_0) layers link any two tokens (geometric w, r; a = 2).

    Four heads, so the offsets of the dilation-2 and -4 branches are all present, as in the
    paper's multi-head design.
    """
    for exponent in range(8, 15):
        n = 2**exponent
        w, r = complexity.geometric_configuration(n, 64, 2)
        measured = complexity.path_length(n, 4, w, r)
        assert measured is not None
        assert measured <= complexity.predicted_path_length(n, 64, 2) + 1, (n, measured)


@pytest.mark.parametrize(
    "n, w0, ratio, layers",
    [
        (1024, 4, 2, 8),  # N (a - 1) / w0 = 256 = 2^8
        (81, 2, 3, 4),  # 81 * 2 / 2 = 81 = 3^4
        (4096, 3, 4, 6),  # 4096 * 3 / 3 = 4096 = 4^6
    ],
)
def test_predicted_path_length_is_eq_20(n, w0, ratio, layers):
    """Paper Eq. 20, l = log_a(N (a - 1) / w_0), at points worked out by hand (a^l = N (a - 1) / w_0).

    ``math.log(x, a)`` rounds twice (two logs and a division): 1e-12 relative is ample in float64.
    """
    assert complexity.predicted_path_length(n, w0, ratio) == pytest.approx(layers, rel=HAND_F64["rtol"])


def test_geometric_configuration_stops_at_the_first_segment_covering_n():
    assert complexity.geometric_configuration(1000, 64, 2) == ([64, 128, 256, 512, 1024], [1, 2, 4, 8, 16])
    assert complexity.geometric_configuration(64, 64, 4) == ([64], [1])


@given(st.integers(1, 16), st.integers(2, 4), st.integers(0, 5), st.integers(1, 4), st.integers(1, 64))
@settings(deadline=None, max_examples=40)
def test_geometric_flops_sum_to_the_series_of_eq_18_below_its_bound(w0, ratio, levels, heads, dim):
    """Paper Eq. 18: with w_i = w0 a^i, r_i = a^i, the QK^T FLOPs are 2 N d w0 sum_i a^-i < 2 a/(a-1) w0 N d."""
    n = w0 * ratio**levels  # every w_i divides N and every r_i divides w_i: the exact count is the closed form
    w, r = complexity.geometric_configuration(n, w0, ratio)
    exact = complexity.dilated_flops(n, heads, dim, w, r).qk
    series = heads * 2 * n * dim * sum(w0 * Fraction(1, ratio**i) for i in range(len(w)))
    assert exact == series
    assert exact < heads * Fraction(2 * ratio, ratio - 1) * w0 * n * dim
