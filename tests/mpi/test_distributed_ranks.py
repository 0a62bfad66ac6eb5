"""Run by every rank under ``mpiexec -n P`` (see ``tests/test_distributed.py``).

Every test does all of its collective calls first and asserts afterwards, so one rank's failed
assertion cannot leave the others waiting in a collective of the next test.
"""

import numpy as np
import pytest
from mpi4py import MPI

from longnet_ref import dilated_attention, dilated_attention_backward
from longnet_ref import distributed

from ..tolerances import DISTRIBUTED

COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
TOLERANCE = DISTRIBUTED  # float64, the same terms as one process in a different grouping

CHUNK = 24  # rows per rank
CASES = {  # name: (B, H, D, Dv, w, r, offsets)
    "segments inside a chunk": (2, 3, 4, 3, [8, 12, 24], [1, 2, 3], "paper"),
    "segments straddling chunks": (1, 4, 3, 5, [10, 36], [1, 2], "torchscale"),
    "one segment over all ranks": (1, 3, 4, 4, [6, CHUNK * SIZE, 10_000], [1, 3, 5], "paper"),
    "ragged w / r, r > w": (2, 5, 2, 3, [7, 30, 4], [3, 4, 6], "paper"),
    "paper-like geometric": (1, 4, 8, 8, [CHUNK, 2 * CHUNK, 4 * CHUNK], [1, 2, 4], "paper"),
}


def global_problem(batch, heads, dim, value_dim, seed=0):
    """The same full-sequence arrays on every rank (same seed); each rank keeps its chunk."""
    rng = np.random.default_rng(seed)
    n = CHUNK * SIZE
    q, k = (rng.standard_normal((batch, n, heads, dim)) for _ in range(2))
    v, dout = (rng.standard_normal((batch, n, heads, value_dim)) for _ in range(2))
    return q, k, v, dout


def chunk(x):
    return np.ascontiguousarray(x[:, RANK * CHUNK : (RANK + 1) * CHUNK])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_holds_its_chunk_of_the_single_process_result(case, causal, backend):
    batch, heads, dim, value_dim, w, r, offsets = CASES[case]
    q, k, v, dout = global_problem(batch, heads, dim, value_dim)
    options = dict(causal=causal, offsets=offsets)
    out, lse = distributed.dilated_attention(chunk(q), chunk(k), chunk(v), w, r, comm=COMM, backend=backend, return_lse=True, **options)
    grads = distributed.dilated_attention_backward(chunk(dout), chunk(q), chunk(k), chunk(v), out, lse, w, r, comm=COMM, backend=backend, **options)
    # the single-process NumPy reference on the whole sequence, then this rank's rows
    full_out, full_lse = dilated_attention(q, k, v, w, r, return_lse=True, **options)
    full_grads = dilated_attention_backward(dout, q, k, v, full_out, full_lse, w, r, **options)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (full_out, full_lse, *full_grads)):
        np.testing.assert_allclose(got, chunk(want), err_msg=f"rank {RANK}: {name}", **TOLERANCE)


def branch_bytes(w, r, heads=4, batch=1, dim=3, value_dim=2, causal=False, comm=COMM):
    """Bytes this rank receives for one shared branch, forward and backward."""
    chunk_len = CHUNK
    rng = np.random.default_rng(comm.Get_rank())
    q, k = (rng.standard_normal((batch, chunk_len, heads, dim)) for _ in range(2))
    v, dout = (rng.standard_normal((batch, chunk_len, heads, value_dim)) for _ in range(2))
    out, lse, forward = distributed.dilated_attention(q, k, v, [w], [r], comm=comm, causal=causal, return_lse=True, return_stats=True)
    *_, backward = distributed.dilated_attention_backward(dout, q, k, v, out, lse, [w], [r], comm=comm, causal=causal, return_stats=True)
    return forward.bytes_received, backward.bytes_received, forward.bytes_sent


@pytest.mark.skipif(SIZE < 2, reason="needs at least 2 ranks")
@pytest.mark.parametrize("r", [1, 2, 4])
def test_communication_matches_the_documented_formula(r):
    """B H (w - L)/r (D + Dv) itemsize received per forward; twice that per backward."""
    w = 2 * CHUNK  # a segment spans 2 ranks, for every P >= 2
    received, backward_received, sent = branch_bytes(w, r)
    expected = 1 * 4 * (w - CHUNK) // r * (3 + 2) * 8
    assert received == expected, (RANK, received, expected)
    assert sent == 1 * 4 * CHUNK // r * (3 + 2) * 8
    assert backward_received == 2 * expected


@pytest.mark.skipif(SIZE < 4, reason="needs 4 ranks to compare P = 2 with P = 4")
def test_communication_is_constant_when_n_and_p_grow_together():
    """The same branch on 2 ranks (N = 2L) and on 4 ranks (N = 4L): the same bytes per rank."""
    pair = COMM.Split(color=RANK // 2, key=RANK)  # ranks {0, 1} and {2, 3}: two P = 2 problems
    on_two = branch_bytes(2 * CHUNK, 2, comm=pair)
    on_four = branch_bytes(2 * CHUNK, 2)
    pair.Free()
    assert on_two == on_four


def test_branches_inside_the_chunk_communicate_nothing():
    received, backward_received, sent = branch_bytes(CHUNK // 2, 2)
    assert received == backward_received == sent == 0


def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank():
    q = np.zeros((1, CHUNK, 2, 4))
    mine = q.astype(np.float32) if RANK == SIZE - 1 else q  # only the last rank is wrong
    with pytest.raises(TypeError, match=f"rank {SIZE - 1}: q, k and v must share one dtype"):
        distributed.dilated_attention(mine, q, q, [8], [1], comm=COMM)


@pytest.mark.skipif(SIZE < 2, reason="needs at least 2 ranks")
def test_chunks_of_different_lengths_are_rejected_on_every_rank():
    q = np.zeros((1, CHUNK - RANK, 2, 4))  # rank 1 holds one row fewer than rank 0
    with pytest.raises(ValueError, match="same shape"):
        distributed.dilated_attention(q, q, q, [8], [1], comm=COMM)


@pytest.mark.skipif(SIZE < 2, reason="needs at least 2 ranks")
def test_sub_communicators_are_freed_with_their_communicator():
    """The cache of sub-communicators lives on the communicator (an MPI attribute): freeing the
    communicator frees them, and a new communicator starts with none."""
    comm = COMM.Dup()
    branch_bytes(2 * CHUNK, 2, comm=comm)  # a segment over ranks {0, 1}, {2, 3}, ...: sub-communicators
    cached = dict(comm.Get_attr(distributed._KEYVAL))
    comm.Free()
    fresh = COMM.Dup()  # may reuse the freed handle
    inherited = fresh.Get_attr(distributed._KEYVAL)
    fresh.Free()
    assert cached  # this rank is a member of at least one sub-communicator
    assert all(sub == MPI.COMM_NULL for sub in cached.values()), cached
    assert inherited is None
