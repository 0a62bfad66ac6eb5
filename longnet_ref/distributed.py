"""Sequence-parallel dilated attention over MPI (paper §3.1, Fig. 4), forward and exact backward.

The sequence is split into ``P`` contiguous chunks of ``L = N / P`` rows, rank ``p`` holding
global positions ``[p L, (p + 1) L)``. For each branch ``(w, r)``:

- **local branches** (``L`` a multiple of ``w``): every segment lies inside one chunk, so the
  chunk is computed alone by the chosen single-process backend (``"numpy"`` or ``"numba"``);
- **shared branches** (any other ``w``: segments straddle chunk boundaries or span many ranks):
  for every segment, the ranks that hold part of it form a sub-communicator; each one first
  *sparsifies* its rows (keeps only the rows ``P(i, s, h)`` of SPEC §2, per head offset) and the
  group ``Allgatherv``s only those rows of ``K`` and ``V``. Each rank then attends its own
  queries against the whole sparse segment. In the backward the same rows are gathered again
  and the partial ``dK``, ``dV`` of every gathered row are summed back onto their owners with a
  ``Reduce_scatter`` (the paper's "all-gather becomes reduce-scatter").

The branches are mixed locally by their softmax denominators (paper Eq. 10), and the backward
uses the global ``LSE`` and ``Dsum = rowsum(dO * O)`` of the local rows (SPEC §5): results on
each rank are its chunk of the single-process result, causal or not, for every configuration
the single-process API accepts when ``N`` is divisible by ``P``.

**Communication per rank** (``return_stats=True``): for a shared branch whose segments span
``m = w / L`` ranks (``w`` a multiple of ``L``, ``L`` of ``r``, every offset held by some head),
each rank receives, per forward,

    B * H * (w - L) / r * (D + Dv) * itemsize  bytes

(the sparse rows of its segment held by the other ``m - 1`` ranks) and contributes its own
``B * H * L / r * (D + Dv) * itemsize``. The backward moves the same amount twice (gather, then
reduce-scatter). This depends on ``w / r`` (and ``L``, ``B``, ``H``, ``D``) but not on ``N``:
doubling ``N`` and ``P`` together leaves it unchanged. Local branches communicate nothing.

**Failure behaviour**: inputs are validated on every rank and the verdict is exchanged
*before* any communication, so a bad input on one rank raises the same error on all ranks
instead of leaving them waiting in a collective. An unexpected error after communication has
started aborts the whole communicator (``comm.Abort``) with a message on stderr.

Docs: ``docs/distributed.md``.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from .backends import get_backend
from .config import InputTypeError, segment_position, segment_size, sparse_segments, validate_branches, validate_offset_rule
from .reference import attention_backward_from_scores, attention_from_scores, mix_branches
from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale

DISTRIBUTED_BACKENDS = ("numpy", "numba")


@dataclass
class CommunicationStats:
    """Bytes this rank moved, one record per collective call."""

    records: list = field(default_factory=list)  # (collective, branch, bytes sent, bytes received)

    def record(self, collective, branch, sent, received):
        self.records.append((collective, branch, int(sent), int(received)))

    @property
    def bytes_sent(self):
        return sum(r[2] for r in self.records)

    @property
    def bytes_received(self):
        return sum(r[3] for r in self.records)


_KEYVAL = None  # MPI attribute key under which a communicator caches its sub-communicators


def _free_sub_communicators(comm, keyval, groups):
    """Attribute delete callback: MPI calls it when ``comm`` is freed (or at finalize), so the
    sub-communicators die with the communicator they were cut from."""
    for group in groups.values():
        if group != MPI.COMM_NULL:
            group.Free()


def _group(comm, first, last):
    """The sub-communicator of ranks ``first..last`` of ``comm`` (created once, collectively, by its members).

    The cache is an attribute of ``comm`` itself, not a table keyed by its handle: a freed
    communicator takes its sub-communicators with it, and a new communicator that reuses the
    handle starts with an empty cache. ``Dup`` does not copy the attribute.
    """
    global _KEYVAL
    if _KEYVAL is None:
        _KEYVAL = MPI.Comm.Create_keyval(delete_fn=_free_sub_communicators)
    groups = comm.Get_attr(_KEYVAL)
    if groups is None:
        groups = {}
        comm.Set_attr(_KEYVAL, groups)
    if (first, last) not in groups:
        groups[(first, last)] = comm.Create_group(comm.Get_group().Range_incl([(first, last, 1)]))
    return groups[(first, last)]


@dataclass(frozen=True)
class Layout:
    """Where this rank's chunk sits in the global sequence."""

    rank: int
    size: int
    chunk: int  # L = N / P

    @property
    def n(self):
        return self.chunk * self.size

    @property
    def lo(self):
        return self.rank * self.chunk

    @property
    def hi(self):
        return self.lo + self.chunk


def _collective_check(comm, check):
    """Run ``check()`` on every rank; if any rank fails, raise on *all* ranks (no hang)."""
    try:
        result, error = check(), None
    except (ValueError, TypeError) as exc:  # the validation errors of SPEC §7
        result, error = None, (isinstance(exc, TypeError), f"rank {comm.Get_rank()}: {exc}")
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        kind = InputTypeError if all(is_type for is_type, _ in errors) else ValueError
        raise kind("distributed dilated attention: bad input on " + "; ".join(message for _, message in errors))
    return result


def _validate(comm, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets, backend, extra=None):
    if not isinstance(comm, MPI.Comm) or comm.Is_inter():
        raise TypeError(f"comm must be an mpi4py intra-communicator, got {type(comm).__name__}")

    def check():
        if backend not in DISTRIBUTED_BACKENDS:
            raise ValueError(f"backend must be one of {DISTRIBUTED_BACKENDS} for distributed attention, got {backend!r}")
        sizes = check_attention_inputs(q, k, v)
        branches = validate_branches(segment_lengths, dilation_rates)
        options = (check_flag(causal, "causal"), resolve_scale(scale, sizes[3]), validate_offset_rule(offsets))
        if extra is not None:
            extra()
        return sizes, branches, options

    sizes, branches, options = _collective_check(comm, check)
    signature = (sizes, tuple(branches), options, str(q.dtype))
    signatures = comm.allgather(signature)

    def same_everywhere():
        if any(s != signatures[0] for s in signatures):
            raise ValueError(
                "every rank must hold a chunk of the same shape (B, N/P, H, D), dtype and configuration; "
                f"got {sorted(set(map(str, signatures)))}"
            )

    _collective_check(comm, same_everywhere)
    causal, scale, offsets = options
    return Layout(comm.Get_rank(), comm.Get_size(), chunk=sizes[1]), branches, causal, scale, offsets


def _abort_on_error(comm, fn):
    """Run ``fn``; an unexpected error after communication started aborts every rank."""
    try:
        return fn()
    except Exception:  # pragma: no cover - exercised by the failure test in a subprocess
        sys.stderr.write(f"longnet_ref.distributed: rank {comm.Get_rank()} failed; aborting the communicator\n")
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        comm.Abort(1)


def _is_local(branch, layout):
    return layout.chunk % branch.segment_length == 0


@dataclass
class SharedSegment:
    """One sparse segment of a shared branch, seen from this rank."""

    heads: np.ndarray  # (Hs,)
    positions: np.ndarray  # (T,) global, ascending
    mine: np.ndarray  # (T,) bool: rows in this rank's chunk
    local_rows: np.ndarray  # (nq,) positions - lo of my rows
    first: int
    last: int
    counts: np.ndarray  # rows held by each member rank


    @property
    def shared(self):
        return self.last > self.first


def _shared_segments(branch, heads, layout, offsets):
    """Every sparse segment of a shared branch with rows on this rank, in the same order on every rank.

    Its rows are those of SPEC §2, by ``config``'s scalar rule (``segment_size``,
    ``segment_position``); the ranks that hold them, ``first..last``, share it.
    """
    w, r, n = branch.segment_length, branch.dilation, layout.n
    for group in sparse_segments(n, heads, (branch,), offsets):
        o = group.offset
        for s in range(layout.lo // w, (layout.hi - 1) // w + 1):  # the segments that overlap my chunk
            size = segment_size(n, w, r, o, s)
            if size == 0:
                continue
            positions = segment_position(w, r, o, s, 0) + r * np.arange(size)  # (T,) P(i, s, h), ascending
            owner = positions // layout.chunk  # (T,) the rank holding each row
            first, last = int(owner[0]), int(owner[-1])
            if not first <= layout.rank <= last:
                continue  # no row of this segment here, before or after mine: not a member
            mine = owner == layout.rank
            yield SharedSegment(
                heads=group.heads,
                positions=positions,
                mine=mine,
                local_rows=positions[mine] - layout.lo,
                first=first,
                last=last,
                counts=np.bincount(owner - first, minlength=last - first + 1),
            )


def _rows(x, segment):
    """``x (B, L, H, C)`` at my rows of the segment, heads first: ``(B, Hs, nq, C)``."""
    return x[:, segment.local_rows[:, None], segment.heads[None, :]].transpose(0, 2, 1, 3)


def _gather_keys(comm, segment, k, v, branch_index, stats):
    """``K, V`` of the whole sparse segment ``(B, Hs, T, D)``, ``(B, Hs, T, Dv)``: Allgatherv of sparse rows."""
    dim = k.shape[3]
    mine = np.concatenate([_rows(k, segment), _rows(v, segment)], axis=3)  # (B, Hs, nq, D + Dv)
    if not segment.shared:
        return mine[..., :dim], mine[..., dim:]
    send = np.ascontiguousarray(mine.transpose(2, 0, 1, 3))  # (nq, B, Hs, D + Dv): rows first
    counts = segment.counts * int(np.prod(send.shape[1:]))  # elements per member
    displacements = np.concatenate([[0], np.cumsum(counts)[:-1]])
    received = np.empty((int(segment.counts.sum()),) + send.shape[1:], send.dtype)  # (T, B, Hs, D + Dv)
    _group(comm, segment.first, segment.last).Allgatherv(
        send, [received, counts, displacements, from_numpy_dtype(send.dtype)]
    )
    stats.record("allgatherv", branch_index, send.nbytes, received.nbytes - send.nbytes)
    keys_values = received.transpose(1, 2, 0, 3)  # (B, Hs, T, D + Dv)
    return keys_values[..., :dim], keys_values[..., dim:]


def _segment_scores(q_rows, keys, segment, causal, scale):
    """``scale Q K^T`` of my queries against the whole sparse segment, ``-inf`` where not attended."""
    scores = scale * (q_rows @ np.swapaxes(keys, -1, -2))  # (B, Hs, nq, T)
    if not causal:
        return scores, None
    query_t = np.flatnonzero(segment.mine)  # (nq,) index t of my rows in the segment
    attended = np.arange(segment.positions.size)[None, :] <= query_t[:, None]  # (nq, T): key t <= query t
    return np.where(attended, scores, -np.inf), attended


def _forward(comm, q, k, v, layout, branches, causal, scale, offsets, backend, stats):
    batch, chunk, heads, _ = q.shape
    local = tuple(b for b in branches if _is_local(b, layout))
    shared = [(i, b) for i, b in enumerate(branches) if not _is_local(b, layout)]
    parts_out, parts_lse = [], []
    if local:  # segments inside the chunk: the single-process backend, on the chunk alone
        out, lse = get_backend(backend).forward(q, k, v, local, causal, scale, offsets)
        parts_out.append(out)
        parts_lse.append(lse)
    for index, branch in shared:
        out = np.zeros((batch, chunk, heads, v.shape[3]), q.dtype)  # o_i
        lse = np.full((batch, chunk, heads), -np.inf, q.dtype)  # lse_i
        for segment in _shared_segments(branch, heads, layout, offsets):
            keys, values = _gather_keys(comm, segment, k, v, index, stats)
            if segment.local_rows.size == 0:
                continue  # this rank only lends keys to the segment
            scores, attended = _segment_scores(_rows(q, segment), keys, segment, causal, scale)
            o, l = attention_from_scores(scores, values, attended)  # (B, Hs, nq, Dv), (B, Hs, nq)
            where = (slice(None), segment.local_rows[:, None], segment.heads[None, :])
            out[where] = o.transpose(0, 2, 1, 3)
            lse[where] = l.transpose(0, 2, 1)
        parts_out.append(out)
        parts_lse.append(lse)
    return mix_branches(np.stack(parts_out), np.stack(parts_lse))  # paper Eq. 10, on the local rows


def _backward(comm, dout, q, k, v, out, lse, layout, branches, causal, scale, offsets, backend, stats):
    heads = q.shape[2]
    dim = k.shape[3]
    local = tuple(b for b in branches if _is_local(b, layout))
    if local:  # global LSE and Dsum: the local branches' share of the exact gradient
        dq, dk, dv = get_backend(backend).backward(dout, q, k, v, out, lse, local, causal, scale, offsets)
    else:
        dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dsum = (dout * out).sum(axis=-1)  # (B, L, H)  Dsum = rowsum(dO * O), local rows only
    for index, branch in ((i, b) for i, b in enumerate(branches) if not _is_local(b, layout)):
        for segment in _shared_segments(branch, heads, layout, offsets):
            keys, values = _gather_keys(comm, segment, k, v, index, stats)
            q_rows = _rows(q, segment)  # (B, Hs, nq, D)
            scores, attended = _segment_scores(q_rows, keys, segment, causal, scale)
            grads = attention_backward_from_scores(
                scores, attended, _rows(lse[..., None], segment)[..., 0], _rows(dsum[..., None], segment)[..., 0],
                q_rows, keys, values, _rows(dout, segment), scale,
            )  # dQ (B, Hs, nq, D), dK (B, Hs, T, D), dV (B, Hs, T, Dv)
            where = (slice(None), segment.local_rows[:, None], segment.heads[None, :])
            dq[where] += grads[0].transpose(0, 2, 1, 3)
            partial = np.concatenate(grads[1:], axis=3)  # (B, Hs, T, D + Dv) for every row of the segment
            if segment.shared:  # sum every member's partial onto the rows' owners
                send = np.ascontiguousarray(partial.transpose(2, 0, 1, 3))  # (T, B, Hs, D + Dv)
                mine = np.empty((segment.local_rows.size,) + send.shape[1:], send.dtype)
                row = int(np.prod(send.shape[1:]))
                _group(comm, segment.first, segment.last).Reduce_scatter(send, mine, recvcounts=segment.counts * row, op=MPI.SUM)
                stats.record("reduce_scatter", index, send.nbytes - mine.nbytes, mine.nbytes * (segment.counts.size - 1))
                partial = mine.transpose(1, 2, 0, 3)  # (B, Hs, nq, D + Dv)
            dk[where] += partial[..., :dim].transpose(0, 2, 1, 3)
            dv[where] += partial[..., dim:].transpose(0, 2, 1, 3)
    return dq, dk, dv


def dilated_attention(
    q, k, v, segment_lengths, dilation_rates, *, comm, causal=False, scale=None, offsets="paper", backend="numpy",
    return_lse=False, return_stats=False,
):
    """Sequence-parallel dilated attention: this rank's chunk of the single-process result.

    ``q, k: (B, N/P, H, D)``, ``v: (B, N/P, H, Dv)``: rank ``p``'s contiguous chunk, ranks in
    order. Returns ``out (B, N/P, H, Dv)`` (and ``lse (B, N/P, H)``, and a
    :class:`CommunicationStats`), equal to the matching rows of
    ``longnet_ref.dilated_attention`` on the whole sequence.
    """
    layout, branches, causal, scale, offsets = _validate(comm, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets, backend)
    stats = CommunicationStats()
    out, lse = _abort_on_error(comm, lambda: _forward(comm, q, k, v, layout, branches, causal, scale, offsets, backend, stats))
    result = (out, lse) if return_lse else (out,)
    result += (stats,) if return_stats else ()
    return result if len(result) > 1 else result[0]


def dilated_attention_backward(
    dout, q, k, v, out, lse, segment_lengths, dilation_rates, *, comm, causal=False, scale=None, offsets="paper",
    backend="numpy", return_stats=False,
):
    """Exact gradient of :func:`dilated_attention`: this rank's chunk of ``(dq, dk, dv)`` (SPEC §5)."""
    layout, branches, causal, scale, offsets = _validate(
        comm, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets, backend,
        extra=lambda: check_gradient_inputs(dout, out, lse, q, v),
    )
    stats = CommunicationStats()
    grads = _abort_on_error(
        comm, lambda: _backward(comm, dout, q, k, v, out, lse, layout, branches, causal, scale, offsets, backend, stats)
    )
    return (*grads, stats) if return_stats else grads
