"""The tensor-core kernels' tiling, checked on the CPU (no GPU, no CUDA code executed).

1. The plan (``tensor_core_tiles.tile_plan``: which rows each block and tile loads, and the
   masks) against the index sets (``segment_rows``, ``SparseSegments.attended``): every row of
   every sparse segment is owned by exactly one block, and the tiles' masks put together are
   exactly the attended pairs of SPEC §3, so the tiles a kernel skips hold no attended pair.
2. The launch numbers: the grid covers every segment, the shared memory fits sm_80 and sm_90.
3. A NumPy emulation of the kernels' tile loop (``tests/tensor_core_emulation.py``) against the
   NumPy reference: float32 (the algorithm) and with P, dS rounded to float16/bfloat16 as the
   tensor cores take them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dilated_attention, dilated_attention_backward
from longnet_ref.backends import tensor_core_tiles as tiles
from longnet_ref.index_sets import head_offsets, segment_rows, sparse_segments
from longnet_ref.validation import validate_branches

from . import tensor_core_emulation as emulation
from .strategies import problems
from .tolerances import GPU, TENSOR_CORE_ROUNDING

# Segments long enough to span several 64-row tiles: rows up to 300 / r per sparse segment.
TILED = dict(max_n=300, max_heads=4, max_dim=8, max_branches=3, max_segment=320, max_dilation=3)


def _branches(problem):
    return validate_branches(*problem.branches)


@pytest.mark.parametrize("owner", ["queries", "keys"])
@settings(max_examples=30, deadline=None)
@given(problem=problems(**TILED))
def test_tiles_own_every_row_once_and_their_masks_are_the_attended_pairs(owner, problem):
    n, heads, causal = problem.n, problem.num_heads, problem.causal
    branches = _branches(problem)
    blocks = {}  # (branch, offset, segment) -> blocks in plan order
    for block in tiles.tile_plan(n, heads, branches, problem.offsets, causal, owner=owner):
        blocks.setdefault((block.branch, block.offset, block.segment), []).append(block)
    expected_keys = set()
    for group in sparse_segments(n, heads, branches, problem.offsets):
        positions, valid = segment_rows(n, group.segment_length, group.dilation, group.offset)
        attended = group.attended(causal)  # (S, T, T): query row, key row
        for s in range(positions.shape[0]):
            rows = positions[s][valid[s]]
            if rows.size == 0:
                continue
            expected_keys.add((group.branch, group.offset, s))
            own = blocks[(group.branch, group.offset, s)]
            np.testing.assert_array_equal(np.concatenate([b.positions[b.valid] for b in own]), rows)
            size = rows.size
            pairs = np.zeros((size, size), bool)  # (query, key) assembled from the tiles
            for block in own:
                assert np.array_equal(block.heads, group.heads)
                for other in block.others:
                    i = block.start + np.arange(tiles.BLOCK_Q)[block.valid]
                    j = other.start + np.arange(tiles.BLOCK_K)[other.valid]
                    np.testing.assert_array_equal(other.positions[other.valid], positions[s][j])
                    tile_pairs = other.attended[np.ix_(block.valid, other.valid)]
                    if owner == "queries":
                        assert not pairs[np.ix_(i, j)].any()  # no pair visited twice
                        pairs[np.ix_(i, j)] = tile_pairs
                    else:
                        assert not pairs[np.ix_(j, i)].any()
                        pairs[np.ix_(j, i)] = tile_pairs.T
                    assert not other.attended[~block.valid].any() and not other.attended[:, ~other.valid].any()
            t = np.flatnonzero(valid[s])
            np.testing.assert_array_equal(pairs, attended[s][np.ix_(t, t)])
    assert set(blocks) == expected_keys  # no block for a segment that has no rows


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5000), w=st.integers(1, 5000), r=st.integers(1, 40), heads=st.integers(1, 16))
def test_the_grid_covers_every_sparse_segment(n, w, r, heads):
    blocks, batch_heads = tiles.grid(n, heads, 2, w, r)
    per_segment = tiles.tiles_per_segment(n, w, r)
    assert batch_heads == 2 * heads and blocks == math.ceil(n / w) * per_segment
    for o in np.unique(head_offsets(heads, r, "paper")):
        _, valid = segment_rows(n, w, r, int(o))
        assert valid.sum(axis=1).max(initial=0) <= per_segment * tiles.BLOCK_Q  # every row has a block


@pytest.mark.parametrize("kernel", tiles.KERNELS)
@pytest.mark.parametrize("dim", tiles.HEAD_DIMS)
def test_shared_memory_fits_ampere_and_hopper(kernel, dim):
    # Opt-in dynamic shared memory per block: 163 KiB on sm_80 (A100), 227 KiB on sm_90.
    assert tiles.shared_bytes(kernel, 2, dim, dim) <= 163 * 1024
    assert tiles.shared_bytes(kernel, 2, dim, dim) % 16 == 0


def test_instantiations_name_every_kernel_dtype_and_head_dim():
    names = tiles.instantiations()
    assert len(names) == len(set(names)) == len(tiles.KERNELS) * len(tiles.DTYPES) * len(tiles.HEAD_DIMS)
    assert "dilated::backward_keys_branch<__nv_bfloat16, 128, 128>" in names


def _reference(problem, arrays):
    q, k, v, dout = (x.astype(np.float64) for x in arrays)
    out, lse = dilated_attention(q, k, v, *problem.branches, return_lse=True, **problem.options)
    return (out, lse, *dilated_attention_backward(dout, q, k, v, out, lse, *problem.branches, **problem.options))


def _emulated(problem, arrays, rounding):
    q, k, v, dout = arrays
    args = (_branches(problem), problem.causal, problem.scale or 1 / math.sqrt(q.shape[3]), problem.offsets)
    out, lse = emulation.forward(q, k, v, *args, rounding=rounding)
    return (out, lse, *emulation.backward(dout, q, k, v, out, lse, *args, rounding=rounding))


NAMES = ("out", "lse", "dq", "dk", "dv")


@settings(max_examples=15, deadline=None)
@given(problem=problems(**TILED, dtypes=(np.float32,)))
def test_the_emulated_tile_loop_computes_the_reference_in_float32(problem):
    """Without rounding P: the kernels' algorithm (tiles, masks, online softmax, both backward
    passes, the mixture) sums the same terms as the reference in another order (GPU tolerance)."""
    expected = _reference(problem, problem.arrays)
    for name, got, want in zip(NAMES, _emulated(problem, problem.arrays, "float32"), expected):
        np.testing.assert_allclose(got, want, err_msg=name, **GPU[np.dtype(np.float32)])


@pytest.mark.parametrize("rounding", ["float16", "bfloat16"])
@settings(max_examples=8, deadline=None)
@given(problem=problems(**TILED, dtypes=(np.float32,)))
def test_the_emulated_tile_loop_with_half_precision_weights_stays_within_its_rounding(rounding, problem):
    """Inputs rounded to the half type (the reference then reads the same values in float64);
    the emulation rounds P, dS and the results as the kernels do (TENSOR_CORE_ROUNDING)."""
    arrays = tuple(emulation.ROUNDING[rounding](x) for x in problem.arrays)
    expected = _reference(problem, arrays)
    for name, got, want in zip(NAMES, _emulated(problem, arrays, rounding), expected):
        np.testing.assert_allclose(got, want, err_msg=name, **TENSOR_CORE_ROUNDING[rounding][name])
