"""The tiling of the tensor-core kernels, in NumPy: which rows each tile loads, and its masks.

The CUDA C++ kernels of ``backends/cuda/dilated_attention.cu`` (launched by
``backends/tensor_core.py``) split every sparse segment ``P(i, s, h)`` (SPEC §2) into tiles of
``BLOCK_Q`` query rows, one thread block each, and loop over tiles of ``BLOCK_K`` key rows. This
module states that plan on the CPU, with the index rules of ``longnet_ref.index_sets`` (the only
home of which rows a head sees): the tests compare it with ``segment_rows``/``sparse_segments``
and run a NumPy emulation of the kernels' tile loop over it against the reference, so the
algorithm is checked without a GPU. It also holds what the host needs to launch the kernels (the
grid, the dynamic shared memory, the template names), so that those numbers have one home.

Importable without CuPy. Docs: ``docs/gpu.md`` ("The tensor-core kernels").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..index_sets import Branch, causal_key_count, segment_position, segment_size, sparse_segments

WARPS = 4  # warps per thread block
ROWS = 16  # rows per warp: the M of one 16x16x16 wmma fragment
BLOCK_Q = WARPS * ROWS  # rows a block owns (queries; keys in the dK/dV kernel)
BLOCK_K = 64  # rows of the tile a block loops over; == BLOCK_Q (the causal loop bounds assume it)
THREADS = 32 * WARPS
PAD, FLOAT_PAD = 8, 4  # elements added to each shared row of T and of float (16 bytes each)
HEAD_DIMS = (64, 128)  # D = Dv the kernels are instantiated for
DTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}  # input dtype -> C++ type
KERNELS = ("forward_branch", "backward_keys_branch", "backward_queries_branch")
# Compiled in CI (tests/test_tensor_core_compile.py): the virtual compute_80 (PTX: the C++ and
# the wmma types allowed on Ampere) and sm_90 machine code (ptxas too: registers, spills).
ARCHITECTURES = ("compute_80", "sm_90")
SOURCE = Path(__file__).parent / "cuda" / "dilated_attention.cu"  # shipped as package data
# NVRTC options shared by CuPy's RawModule and the CI compile: none; NVRTC's default dialect
# (C++17 since CUDA 11) has the `if constexpr` the source uses.
COMPILE_OPTIONS: tuple[str, ...] = ()


def instantiation(kernel: str, dtype: str, dim: int, value_dim: int) -> str:
    """The C++ name of one template instantiation, e.g. ``dilated::forward_branch<__half, 64, 64>``."""
    return f"dilated::{kernel}<{DTYPES[dtype]}, {dim}, {value_dim}>"


def instantiations() -> list[str]:
    """Every instantiation the host can launch: each kernel x dtype x head dim (``D = Dv``)."""
    return [instantiation(kernel, dtype, d, d) for kernel in KERNELS for dtype in DTYPES for d in HEAD_DIMS]


def shared_bytes(kernel: str, itemsize: int, dim: int, value_dim: int) -> int:
    """Dynamic shared memory of one kernel: ``ForwardShared`` / ``BackwardShared::bytes`` of the .cu.

    The kernel traps (``require_shared``) if it is launched with less, so a mismatch between this
    function and the C++ structs cannot read past the allocation silently.
    """
    ldq, ldv, ldp = dim + PAD, value_dim + PAD, BLOCK_K + PAD
    if kernel == "forward_branch":
        lds = max(BLOCK_K, value_dim) + FLOAT_PAD
        tiles = (BLOCK_Q * ldq + BLOCK_K * ldq + BLOCK_K * ldv) * itemsize  # Q, K, V
        return tiles + WARPS * ROWS * lds * 4 + WARPS * ROWS * ldp * itemsize  # scores (float), P (T)
    lds, lds_v = max(BLOCK_K, dim) + FLOAT_PAD, max(BLOCK_K, value_dim) + FLOAT_PAD
    tiles = (BLOCK_Q * ldq + BLOCK_Q * ldv + BLOCK_K * ldq + BLOCK_K * ldv) * itemsize  # own and other rows
    stats = 2 * BLOCK_K * 4  # LSE, Dsum
    scratch = WARPS * ROWS * (lds + lds_v) * 4 + 2 * WARPS * ROWS * ldp * itemsize  # S, dP (float); P, dS (T)
    return tiles + stats + scratch


def tiles_per_segment(n: int, segment_length: int, dilation: int) -> int:
    """Blocks per segment: the largest sparse segment (offset 0) in tiles of ``BLOCK_Q`` rows."""
    return max(1, -(-segment_size(n, segment_length, dilation, 0, 0) // BLOCK_Q))


def grid(n: int, num_heads: int, batch: int, segment_length: int, dilation: int) -> tuple[int, int]:
    """The launch grid of one branch: ``(segments * tiles_per_segment, B * H)``.

    A block whose tile starts past its (shorter, or other-offset) segment returns at once.
    """
    segments = -(-n // segment_length)
    return segments * tiles_per_segment(n, segment_length, dilation), batch * num_heads


def other_tiles(size: int, first: int, causal: bool, owner: str) -> range:
    """Starts of the tiles a block loops over, as the kernels' loops do.

    ``owner="queries"`` (forward, dQ): key tiles ``0 .. key_end``, where causally the block's
    last query ``first + BLOCK_Q - 1`` bounds the keys any of its rows attends.
    ``owner="keys"`` (dK, dV): query tiles from ``first`` causally (earlier queries never attend
    the block's keys; ``BLOCK_K == BLOCK_Q``), from 0 otherwise.
    """
    if owner == "queries":
        end = min(size, causal_key_count(first + BLOCK_Q - 1)) if causal else size
        return range(0, end, BLOCK_K)
    return range(first if causal else 0, size, BLOCK_K)


@dataclass(frozen=True)
class OtherTile:
    """One tile of the inner loop: its rows and the (own x other) mask of attended pairs."""

    start: int  # t of its first row in the sparse segment
    positions: np.ndarray  # (BLOCK_K,) global rows s*w + o + t*r (0 where not valid)
    valid: np.ndarray  # (BLOCK_K,) t < size: rows past the segment are loaded as zeros
    attended: np.ndarray  # (BLOCK_Q, BLOCK_K) bool: own row i and other row j form an attended pair


@dataclass(frozen=True)
class OwnTile:
    """The rows one thread block owns, and the tiles it loops over."""

    branch: int
    heads: np.ndarray  # (Hs,) the heads of this offset group
    offset: int
    segment: int
    start: int  # t of its first row
    positions: np.ndarray  # (BLOCK_Q,)
    valid: np.ndarray  # (BLOCK_Q,)
    others: list[OtherTile] = field(default_factory=list)


def _rows(w, r, o, s, start, count, size):
    t = start + np.arange(count)  # (count,) rows of the sparse segment
    valid = t < size
    return np.where(valid, segment_position(w, r, o, s, t), 0), valid, t


def tile_plan(n: int, num_heads: int, branches: Sequence[Branch], offsets: str, causal: bool, owner: str = "queries") -> Iterator[OwnTile]:
    """Every block of one pass with its tiles, in the kernels' loop order (SPEC §2-3).

    ``owner="queries"``: the forward and dQ kernels (a block owns ``BLOCK_Q`` queries, loops over
    key tiles); ``owner="keys"``: the dK/dV kernel (owns keys, loops over query tiles). Blocks
    whose tile starts past their segment (they return at once) are not listed.
    """
    if owner not in ("queries", "keys"):
        raise ValueError(f"owner must be 'queries' or 'keys', got {owner!r}")
    for group in sparse_segments(n, num_heads, branches, offsets):
        w, r, o = group.segment_length, group.dilation, group.offset
        for s in range(group.positions.shape[0]):
            size = segment_size(n, w, r, o, s)
            for first in range(0, size, BLOCK_Q):
                positions, valid, t_own = _rows(w, r, o, s, first, BLOCK_Q, size)
                tile = OwnTile(group.branch, group.heads, o, s, first, positions, valid)
                for start in other_tiles(size, first, causal, owner):
                    other_positions, other_valid, t_other = _rows(w, r, o, s, start, BLOCK_K, size)
                    t_query, t_key = (t_own, t_other) if owner == "queries" else (t_other, t_own)
                    pairs = valid[:, None] & other_valid[None, :]  # (BLOCK_Q, BLOCK_K)
                    if causal:  # key t_k attended by query t_q iff t_k < causal_key_count(t_q)
                        below = (
                            t_key[None, :] < causal_key_count(t_query[:, None]) if owner == "queries" else (t_key[:, None] < causal_key_count(t_query[None, :]))
                        )
                        pairs = pairs & below
                    tile.others.append(OtherTile(start, other_positions, other_valid, pairs))
                yield tile
