"""Sequence-parallel dilated attention over MPI (paper §3.1, Fig. 4), forward and exact backward.

The sequence is split into ``P`` contiguous chunks of ``L = N / P`` rows, rank ``p`` holding
global positions ``[p L, (p + 1) L)``. For each branch ``(w, r)``:

- **local branches** (``L`` a multiple of ``w``): every segment lies inside one chunk, so the
  chunk is computed alone by the chosen single-process backend (``"numpy"`` or ``"numba"``);
  the shared branches below use the same backend's segment attention (for ``"numba"``, the
  fused kernels ``numba_cpu.segment_forward`` / ``segment_backward``);
- **shared branches** (any other ``w``: segments straddle chunk boundaries or span many ranks):
  for every segment, the ranks that hold part of it form a sub-communicator; each one first
  *sparsifies* its rows (keeps only the rows ``I(i, s, h)`` of SPEC §2, per head offset) and the
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
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI
from mpi4py.util.dtlib import from_numpy_dtype

from .backends import backend_names, backend_spec, get_backend
from .index_sets import causal_pairs, segment_position, segment_size, sparse_segments
from .validation import InputTypeError, validate_branches, validate_offset_rule
from .reference import attention_backward_from_scores, attention_from_scores, mix_branches
from .validation import check_attention_inputs, check_flag, check_gradient_inputs, resolve_scale

if TYPE_CHECKING:
    from collections.abc import Sequence


@dataclass
class CommunicationStats:
    """Bytes this rank moved, one record per collective call (the module docstring's formula).

    Returned by [`dilated_attention`][longnet_ref.distributed.dilated_attention] and
    [`dilated_attention_backward`][longnet_ref.distributed.dilated_attention_backward] with
    ``return_stats=True``.

    Attributes:
        records: ``(collective, branch, bytes sent, bytes received)`` per call: ``collective``
            is ``"allgatherv"`` or ``"reduce_scatter"``, ``branch`` the branch index ``i``.
    """

    records: list[tuple[str, int, int, int]] = field(default_factory=list)  # (collective, branch, bytes sent, bytes received)

    def record(self, collective: str, branch: int, sent: int, received: int) -> None:
        """Append one collective call's bytes.

        Args:
            collective: ``"allgatherv"`` or ``"reduce_scatter"``.
            branch: The branch index ``i``.
            sent: Bytes this rank contributed (cast to ``int``).
            received: Bytes this rank received from the other members (cast to ``int``).
        """
        self.records.append((collective, branch, int(sent), int(received)))

    @property
    def bytes_sent(self) -> int:
        """Total bytes this rank contributed, over every record.

        Returns:
            The sum of the records' ``bytes sent``.
        """
        return sum(r[2] for r in self.records)

    @property
    def bytes_received(self) -> int:
        """Total bytes this rank received, over every record.

        Returns:
            The sum of the records' ``bytes received``.
        """
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
    """Where this rank's chunk sits in the global sequence: rows ``[p L, (p + 1) L)``.

    Attributes:
        rank: ``p``, this rank in the communicator.
        size: ``P``, the number of ranks.
        chunk: ``L = N / P``, rows per rank.
    """

    rank: int
    size: int
    chunk: int  # L = N / P

    @property
    def n(self) -> int:
        """The global sequence length.

        Returns:
            ``N = L P``.
        """
        return self.chunk * self.size

    @property
    def lo(self) -> int:
        """The first global row of this rank's chunk.

        Returns:
            ``p L``.
        """
        return self.rank * self.chunk

    @property
    def hi(self) -> int:
        """One past the last global row of this rank's chunk.

        Returns:
            ``(p + 1) L``.
        """
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
        if not backend_spec(backend).distributed:
            names = ", ".join(map(repr, backend_names(distributed=True)))
            raise ValueError(f"backend must be one of {names} for distributed attention (CPU backends); got {backend!r}")
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
            raise ValueError(f"every rank must hold a chunk of the same shape (B, N/P, H, D), dtype and configuration; got {sorted(set(map(str, signatures)))}")

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
    """One sparse segment ``I(i, s, h)`` of a shared branch, seen from this rank (SPEC §2).

    Attributes:
        heads: ``(Hs,)`` integer: the heads whose offset selects these rows.
        positions: ``(T,)`` integer: the segment's global row positions, ascending.
        mine: ``(T,)`` bool: which of them lie in this rank's chunk.
        local_rows: ``(nq,)`` integer: ``positions[mine] - lo``, this rank's rows, chunk-local.
        first: The first rank holding a row of the segment.
        last: The last rank holding a row of the segment.
        counts: ``(last - first + 1,)`` integer: rows held by each member rank.
    """

    heads: np.ndarray  # (Hs,)
    positions: np.ndarray  # (T,) global, ascending
    mine: np.ndarray  # (T,) bool: rows in this rank's chunk
    local_rows: np.ndarray  # (nq,) positions - lo of my rows
    first: int
    last: int
    counts: np.ndarray  # rows held by each member rank

    @property
    def shared(self) -> bool:
        """Whether the segment spans more than one rank (and so needs a collective).

        Returns:
            ``last > first``.
        """
        return self.last > self.first


def _shared_segments(branch, heads, layout, offsets):
    """Every sparse segment of a shared branch with rows on this rank, in the same order on every rank.

    Its rows are those of SPEC §2, by ``index_sets``'s scalar rule (``segment_size``,
    ``segment_position``); the ranks that hold them, ``first..last``, share it.
    """
    w, r, n = branch.segment_length, branch.dilation, layout.n
    for group in sparse_segments(n, heads, (branch,), offsets):
        o = group.offset
        for s in range(layout.lo // w, (layout.hi - 1) // w + 1):  # the segments that overlap my chunk
            size = segment_size(n, w, r, o, s)
            if size == 0:
                continue
            positions = segment_position(w, r, o, s, 0) + r * np.arange(size)  # (T,) I(i, s, h), ascending
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
    _group(comm, segment.first, segment.last).Allgatherv(send, [received, counts, displacements, from_numpy_dtype(send.dtype)])
    stats.record("allgatherv", branch_index, send.nbytes, received.nbytes - send.nbytes)
    keys_values = received.transpose(1, 2, 0, 3)  # (B, Hs, T, D + Dv)
    return keys_values[..., :dim], keys_values[..., dim:]


def _segment_scores(q_rows, keys, segment, causal, scale):
    """``scale Q K^T`` of my queries against the whole sparse segment, ``-inf`` where not attended."""
    scores = scale * (q_rows @ np.swapaxes(keys, -1, -2))  # (B, Hs, nq, T)
    if not causal:
        return scores, None
    query_t = np.flatnonzero(segment.mine)  # (nq,) index t of my rows in the segment
    attended = causal_pairs(query_t, np.arange(segment.positions.size))  # (nq, T): key t <= query t
    return np.where(attended, scores, -np.inf), attended


def _first_query(segment):
    """Index ``t`` in the segment of this rank's first row (a chunk holds a run of consecutive ``t``;
    0 when this rank only lends keys to the segment)."""
    mine = np.flatnonzero(segment.mine)
    return int(mine[0]) if mine.size else 0


def _segment_forward(q_rows, keys, values, segment, causal, scale, backend):
    """``o_i (B, Hs, nq, Dv)``, ``lse_i (B, Hs, nq)`` of my queries against the gathered segment."""
    if backend == "numba":  # the gathered rows are a sparse segment like any other: the fused kernels
        from .backends import numba_cpu

        return numba_cpu.segment_forward(q_rows, keys, values, _first_query(segment), causal, scale)
    scores, attended = _segment_scores(q_rows, keys, segment, causal, scale)
    return attention_from_scores(scores, values, attended)


def _segment_backward(q_rows, keys, values, dout_rows, lse_rows, dsum_rows, segment, causal, scale, backend):
    """Exact ``dQ (B, Hs, nq, D)`` and partial ``dK (B, Hs, T, D)``, ``dV (B, Hs, T, Dv)`` of one segment."""
    if backend == "numba":
        from .backends import numba_cpu

        return numba_cpu.segment_backward(q_rows, keys, values, dout_rows, lse_rows, dsum_rows, _first_query(segment), causal, scale)
    scores, attended = _segment_scores(q_rows, keys, segment, causal, scale)
    return attention_backward_from_scores(scores, attended, lse_rows, dsum_rows, q_rows, keys, values, dout_rows, scale)


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
            o, l = _segment_forward(_rows(q, segment), keys, values, segment, causal, scale, backend)  # (B, Hs, nq, Dv), (B, Hs, nq)
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
            grads = _segment_backward(
                _rows(q, segment),
                keys,
                values,
                _rows(dout, segment),
                _rows(lse[..., None], segment)[..., 0],
                _rows(dsum[..., None], segment)[..., 0],
                segment,
                causal,
                scale,
                backend,
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
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    comm: MPI.Comm,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
    backend: str = "numpy",
    return_lse: bool = False,
    return_stats: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, CommunicationStats] | tuple[np.ndarray, np.ndarray, CommunicationStats]:
    """Sequence-parallel dilated attention: this rank's chunk of the single-process result (paper §3.1, Eq. 10; SPEC §6).

        out[p L : (p + 1) L] = dilated_attention(Q, K, V)[p L : (p + 1) L]

    Collective: every rank of ``comm`` must call it, each with its own chunk, ranks in order.
    The result equals the matching rows of
    [`longnet_ref.dilated_attention`][longnet_ref.attention.dilated_attention] on the whole
    sequence.

    Args:
        q: ``(B, L, H, D)`` with ``L = N / P``: rank ``p``'s contiguous chunk of the queries,
            NumPy float32 or float64.
        k: ``(B, L, H, D)``, the shape and dtype of ``q``.
        v: ``(B, L, H, Dv)``, the dtype of ``q``.
        segment_lengths: ``w_i`` of every branch, positive integers.
        dilation_rates: ``r_i`` of every branch, as many positive integers.
        comm: An mpi4py intra-communicator (``MPI.COMM_WORLD`` or a sub-communicator).
        causal: If ``True``, query ``p`` attends only keys ``k <= p`` (global positions).
        scale: The factor on ``Q K^T``; ``None`` means ``1 / sqrt(D)``.
        offsets: The head-offset rule, ``"paper"`` or ``"torchscale"``.
        backend: A backend whose registry entry has ``distributed=True``
            ([`backend_names`][longnet_ref.backends.backend_names]``(distributed=True)``:
            ``"reference"``/``"numpy"`` or ``"numba"``), for the branches local to a chunk.
        return_lse: Also return ``lse``.
        return_stats: Also return this rank's [`CommunicationStats`][longnet_ref.distributed.CommunicationStats].

    Returns:
        ``out (B, L, H, Dv)`` in the dtype of ``q``; with ``return_lse`` also ``lse (B, L, H)``,
        and with ``return_stats`` the stats last: ``out``, ``(out, lse)``, ``(out, stats)`` or
        ``(out, lse, stats)``.

    Raises:
        TypeError: ``comm`` is not an mpi4py intra-communicator (raised on the calling rank).
        InputTypeError: Every rank that failed validation failed with a type error (dtype,
            non-integer ``w``, non-bool ``causal``, ...); raised on *all* ranks, naming each.
        ValueError: Any other bad input on any rank (shapes, empty or mismatched branch lists,
            an unknown ``offsets`` or ``backend``), or ranks whose chunks differ in shape,
            dtype or configuration; raised on all ranks before any communication.
    """
    layout, branches, causal, scale, offsets = _validate(comm, q, k, v, segment_lengths, dilation_rates, causal, scale, offsets, backend)
    stats = CommunicationStats()
    out, lse = _abort_on_error(comm, lambda: _forward(comm, q, k, v, layout, branches, causal, scale, offsets, backend, stats))
    result = (out, lse) if return_lse else (out,)
    result += (stats,) if return_stats else ()
    return result if len(result) > 1 else result[0]


def dilated_attention_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    comm: MPI.Comm,
    causal: bool = False,
    scale: float | None = None,
    offsets: str = "paper",
    backend: str = "numpy",
    return_stats: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray, CommunicationStats]:
    """Exact gradient of [`dilated_attention`][longnet_ref.distributed.dilated_attention]: this rank's chunk of ``(dq, dk, dv)`` (SPEC §5).

        dK_j = sum over ranks of the partial dK_j of every query that attends key j

    The shared branches gather ``K, V`` again and ``Reduce_scatter`` the partial ``dK, dV``
    onto the rows' owners; ``lse`` and ``Dsum = rowsum(dO * O)`` of the local rows suffice.
    Collective, like the forward.

    Args:
        dout: ``(B, L, H, Dv)`` this rank's chunk of the upstream gradient.
        q: ``(B, L, H, D)`` this rank's chunk of the queries, NumPy float32 or float64.
        k: ``(B, L, H, D)``, the shape and dtype of ``q``.
        v: ``(B, L, H, Dv)``, the dtype of ``q``.
        out: ``(B, L, H, Dv)`` the forward's output on this rank.
        lse: ``(B, L, H)`` the forward's log-sum-exp on this rank.
        segment_lengths: The forward's ``w_i``.
        dilation_rates: The forward's ``r_i``.
        comm: The forward's mpi4py intra-communicator.
        causal: The forward's ``causal``.
        scale: The forward's ``scale``; ``None`` means ``1 / sqrt(D)``.
        offsets: The forward's head-offset rule.
        backend: ``"numpy"`` or ``"numba"``, for the local branches.
        return_stats: Also return this rank's [`CommunicationStats`][longnet_ref.distributed.CommunicationStats].

    Returns:
        ``(dq, dk, dv)`` with the shapes of ``(q, k, v)`` in the dtype of ``q`` (this rank's
        rows), and with ``return_stats`` the stats as a fourth element.

    Raises:
        TypeError: ``comm`` is not an mpi4py intra-communicator (raised on the calling rank).
        InputTypeError: Every rank that failed validation failed with a type error; raised on
            all ranks.
        ValueError: Any other bad input on any rank (``dout``, ``out``, ``lse`` shapes
            included), or ranks that disagree on shape, dtype or configuration; raised on all
            ranks before any communication.
    """
    layout, branches, causal, scale, offsets = _validate(
        comm,
        q,
        k,
        v,
        segment_lengths,
        dilation_rates,
        causal,
        scale,
        offsets,
        backend,
        extra=lambda: check_gradient_inputs(dout, out, lse, q, v),
    )
    stats = CommunicationStats()
    grads = _abort_on_error(comm, lambda: _backward(comm, dout, q, k, v, out, lse, layout, branches, causal, scale, offsets, backend, stats))
    return (*grads, stats) if return_stats else grads
