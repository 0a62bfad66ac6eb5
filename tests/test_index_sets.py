"""SPEC §2: segments, dilation and head offsets, checked against the SPEC text written out literally."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from longnet_ref.index_sets import causal_key_count, head_offsets, segment_position, segment_rows, segment_size, sparse_segments
from longnet_ref.validation import validate_branches


def spec_positions(n, w, r, o):
    """SPEC §2 written as a loop: P(s) = { s*w + o + t*r : o + t*r < w, s*w + o + t*r < N }."""
    segments = []
    for s in range(-(-n // w)):
        rows, t = [], 0
        while o + t * r < w and s * w + o + t * r < n:
            rows.append(s * w + o + t * r)
            t += 1
        segments.append(rows)
    return segments


@given(n=st.integers(0, 200), w=st.integers(1, 150), r=st.integers(1, 20), o=st.integers(0, 25))
def test_segment_rows_are_the_spec_positions(n, w, r, o):
    positions, valid = segment_rows(n, w, r, o)
    assert [list(p[m]) for p, m in zip(positions, valid)] == spec_positions(n, w, r, o)


@given(n=st.integers(0, 200), w=st.integers(1, 150), r=st.integers(1, 20), o=st.integers(0, 25))
def test_the_scalar_rules_the_kernels_wrap_give_the_spec_positions(n, w, r, o):
    """``segment_size`` / ``segment_position`` (what the kernels compile) against the SPEC loop."""
    for s, rows in enumerate(spec_positions(n, w, r, o)):
        assert segment_size(n, w, r, o, s) == len(rows)
        assert [segment_position(w, r, o, s, t) for t in range(len(rows))] == rows


@given(n=st.integers(1, 120), w=st.integers(1, 80), r=st.integers(1, 9), o=st.integers(0, 8))
def test_the_scalar_rules_agree_with_segment_rows_and_the_causal_mask(n, w, r, o):
    positions, valid = segment_rows(n, w, r, o)
    # H = r heads under the paper rule: head o has offset o (for o < r)
    segments = next((g for g in sparse_segments(n, r, validate_branches([w], [r])) if g.offset == o), None)
    for s in range(positions.shape[0]):
        size = segment_size(n, w, r, o, s)
        assert size == valid[s].sum()
        assert [segment_position(w, r, o, s, t) for t in range(size)] == list(positions[s][valid[s]])
    if segments is not None:
        attended = segments.attended(causal=True)  # (S, T, T)
        for s in range(attended.shape[0]):
            for t in range(segment_size(n, w, r, o, s)):
                assert attended[s, t].sum() == causal_key_count(t)


@given(n=st.integers(1, 200), w=st.integers(1, 150), r=st.integers(1, 20), o=st.integers(0, 19))
def test_selection_never_leaves_its_segment(n, w, r, o):
    positions, valid = segment_rows(n, w, r, o)
    segment_start = (np.arange(positions.shape[0]) * w)[:, None]
    assert np.all(((positions - segment_start) < w)[valid])
    assert np.all((positions < n)[valid])


def test_paper_offsets_are_head_mod_dilation():
    assert list(head_offsets(8, 4, "paper")) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert list(head_offsets(3, 2, "paper")) == [0, 1, 0]
    assert list(head_offsets(5, 1, "paper")) == [0] * 5


def test_torchscale_offsets_are_contiguous_blocks():
    # microsoft/torchscale dense_to_sparse: heads padded to Hp = ceil(H/r)*r, split as (r2 h).
    assert list(head_offsets(8, 4, "torchscale")) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(head_offsets(3, 2, "torchscale")) == [0, 0, 1]
    assert list(head_offsets(4, 8, "torchscale")) == [0, 1, 2, 3]


@given(n=st.integers(0, 120), h=st.integers(1, 9), k=st.integers(1, 4), data=st.data())
def test_every_head_of_every_branch_is_iterated_once(n, h, k, data):
    w = data.draw(st.lists(st.integers(1, 64), min_size=k, max_size=k))
    r = data.draw(st.lists(st.integers(1, 12), min_size=k, max_size=k))
    rule = data.draw(st.sampled_from(["paper", "torchscale"]))
    branches = validate_branches(w, r)
    seen = {(g.branch, int(head)) for g in sparse_segments(n, h, branches, rule) for head in g.heads}
    # A (branch, head) pair is missing only when its offset selects no row: o >= min(w, N).
    expected = {(i, head) for i, b in enumerate(branches) for head, o in enumerate(head_offsets(h, b.dilation, rule)) if o < min(b.segment_length, n)}
    assert seen == expected


def test_unknown_offset_rule_is_rejected():
    with pytest.raises(ValueError, match="offsets"):
        head_offsets(4, 2, "blocks")
