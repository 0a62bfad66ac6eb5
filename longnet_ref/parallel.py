"""Sequence-parallel training of the LongNet LM over MPI: the loss and its exact gradients (paper §3.1).

The sequence of ``N`` tokens is split into ``P`` contiguous chunks of ``L = N / P``, rank ``p``
holding global positions ``[p L, (p + 1) L)`` (the layout of ``longnet_ref.distributed``).
Parameters are replicated. One step, on every rank:

    x^0      = E[t_chunk]                            (B, L, C)  local: a row needs only its token
    LN, MLP  on the chunk's rows                                local: row-wise
    Attn     = distributed.dilated_attention                    the only exchange in the forward:
                                                                sparse K, V rows of shared segments
    RoPE     at the global positions p L + 0..L-1               so q_m . k_n sees m - n
    logits   = LN_f(x^L) E^T,   CE on the chunk's targets       local; divided by the global count M
    backward the same list in reverse; the attention's through
             distributed.dilated_attention_backward             (gather again, reduce-scatter dK, dV)
    grads    = Allreduce_sum([dtheta_p ..., loss_p])            one flat buffer, one collective

Every parameter's gradient is a sum over token positions (a weight is used by every row), so the
ranks' partial sums add up to the single-process gradient; the attention backward has already
summed each key's ``dK, dV`` over every rank's queries. ``M`` (the unmasked targets of all ranks)
is one ``allreduce`` of the local counts, before the forward.

Memory per rank is ``O(L)``: nothing of size ``N`` is formed (positions are the chunk's). The
gradient all-reduce moves the parameter count (plus the loss), whatever ``N``.

Docs: ``docs/parallel.md``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from . import distributed
from . import model as lm
from . import nn
from .backends import backend_names, backend_spec
from .distributed import CommunicationStats
from .validation import check_tokens

__all__ = ["ParallelStats", "SequenceParallelAttention", "chunk", "evaluate", "loss_and_grads"]


@dataclass
class ParallelStats:
    """Bytes this rank moved in one call of [`loss_and_grads`][longnet_ref.parallel.loss_and_grads].

    Attributes:
        attention: The attention exchange, forward and backward of every layer (one record per
            collective, a [`CommunicationStats`][longnet_ref.distributed.CommunicationStats]).
        allreduce_bytes: The size of the one all-reduced buffer (every gradient and the loss).
            What goes on the wire is the MPI library's choice: a ring or Rabenseifner all-reduce
            sends and receives ``2 (P - 1) / P`` times it per rank.
    """

    attention: CommunicationStats = field(default_factory=CommunicationStats)
    allreduce_bytes: int = 0


@dataclass
class SequenceParallelAttention:
    """The ``core`` of ``nn.attention_forward``: attention over every rank's chunk.

    ``forward(q, k, v, branches, options)`` is
    [`distributed.dilated_attention`][longnet_ref.distributed.dilated_attention] on this rank's
    chunk ``(B, L, H, D)``, ``backward`` its exact gradient; both record their bytes in
    ``stats``.

    Attributes:
        comm: The mpi4py intra-communicator of the ranks that share the sequence.
        stats: Every collective's bytes, appended by each call.
    """

    comm: MPI.Comm
    stats: CommunicationStats = field(default_factory=CommunicationStats)

    def forward(self, q, k, v, branches, options):
        """``(o (B, L, H, Dv), lse (B, L, H))`` of this rank's rows (paper Eqs. 21-25)."""
        if branches is None:  # the model's config was checked; this guards a direct use
            raise ValueError("dense attention is not sequence-parallel: every rank would need all N keys")
        o, lse, stats = distributed.dilated_attention(q, k, v, *branches, comm=self.comm, return_lse=True, return_stats=True, **options)
        self.stats.records.extend(stats.records)
        return o, lse

    def backward(self, do, q, k, v, o, lse, branches, options):
        """``(dq, dk, dv)`` of this rank's rows, every rank's queries' contributions summed."""
        *grads, stats = distributed.dilated_attention_backward(do, q, k, v, o, lse, *branches, comm=self.comm, return_stats=True, **options)
        self.stats.records.extend(stats.records)
        return tuple(grads)


def chunk(x, comm: MPI.Comm) -> np.ndarray:
    """Rank ``p``'s contiguous chunk ``x[:, p N/P : (p + 1) N/P]`` of a ``(B, N, ...)`` array.

    Args:
        x: ``(B, N, ...)``: the whole sequence (token ids, targets or a mask).
        comm: The communicator of the ``P`` ranks.

    Returns:
        ``(B, N / P, ...)``, a contiguous copy.

    Raises:
        ValueError: ``x`` has fewer than 2 dimensions, or ``N`` is not divisible by ``P``.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (batch, sequence, ...), got shape {x.shape}")
    n, size, rank = x.shape[1], comm.Get_size(), comm.Get_rank()
    if n % size:
        raise ValueError(f"the sequence length N = {n} must be divisible by the number of ranks P = {size}")
    length = n // size
    return np.ascontiguousarray(x[:, rank * length : (rank + 1) * length])


def _fingerprint(params: dict) -> str:
    """A digest of every parameter's bytes: replicated parameters have the same one on every rank."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in params.items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8).data)
    return digest.hexdigest()


def _validate(config, params, tokens, targets, mask, comm):
    """Check every rank's inputs, then that the ranks agree; raise the same error on all ranks."""
    if not isinstance(comm, MPI.Comm) or comm.Is_inter():
        raise TypeError(f"comm must be an mpi4py intra-communicator, got {type(comm).__name__}")

    def local_checks():
        if not isinstance(config, lm.LongNetConfig):
            raise TypeError(f"config must be a LongNetConfig, got {type(config).__name__}")
        if config.attention == "dense":
            raise ValueError("attention 'dense' is not sequence-parallel (every rank would need all N keys): use 'dilated' or 'window'")
        if not backend_spec(config.backend).distributed:
            raise ValueError(f"backend must be one of {backend_names(distributed=True)} for sequence-parallel training, got {config.backend!r}")
        lm.check_params(config, params)
        local_tokens = check_tokens(tokens, config.vocab_size)
        local_targets = check_tokens(targets, config.vocab_size, "targets")
        if local_targets.shape != local_tokens.shape:
            raise ValueError(f"targets must have the tokens' shape {local_tokens.shape}, got {local_targets.shape}")
        local_mask = np.ones(local_tokens.shape, bool) if mask is None else np.asarray(mask)
        if local_mask.shape != local_tokens.shape or local_mask.dtype != bool:
            raise ValueError(f"mask must be a bool array of the tokens' shape {local_tokens.shape}, got {local_mask.dtype} {local_mask.shape}")
        return local_tokens, local_targets, local_mask

    tokens, targets, mask = distributed._collective_check(comm, local_checks)
    shapes = comm.allgather(tokens.shape)
    signatures = comm.allgather((config.to_dict(), _fingerprint(params)))

    def agreement():
        if len(set(shapes)) > 1:
            lengths = [shape[1] for shape in shapes]
            raise ValueError(
                f"every rank must hold a chunk (B, N/P) of the same shape, with N divisible by P = {len(shapes)}; "
                f"got chunks {[tuple(s) for s in shapes]} (N = {sum(lengths)})"
            )
        if any(s[0] != signatures[0][0] for s in signatures):
            raise ValueError("every rank must use the same LongNetConfig")
        if any(s[1] != signatures[0][1] for s in signatures):
            raise ValueError("every rank must hold the same parameters (they are replicated)")

    distributed._collective_check(comm, agreement)
    count = comm.allreduce(int(mask.sum()))  # M: the unmasked targets of all ranks

    def some_target():
        if count == 0:
            raise ValueError("mask selects no target on any rank: the mean loss is undefined")

    distributed._collective_check(comm, some_target)
    return tokens, targets, mask, count


def _step(config, params, tokens, targets, mask, count, comm, stats):
    """This rank's share of the loss and gradients, then the one all-reduce that sums them."""
    rank, length = comm.Get_rank(), tokens.shape[1]
    positions = rank * length + np.arange(length)  # (L,) global positions, for RoPE
    core = SequenceParallelAttention(comm, stats.attention)
    logits, cache = lm.forward(config, params, tokens, positions=positions, attention_core=core)  # (B, L, V)
    loss, ce_cache = nn.cross_entropy_forward(logits, targets, mask, count=count)  # sum over my targets / M
    grads = lm.backward(config, params, cache, nn.cross_entropy_backward(ce_cache))

    # one flat buffer: every gradient, then the loss; summed over the ranks in one collective
    sizes = [g.size for g in grads.values()]
    flat = np.empty(sum(sizes) + 1, np.dtype(config.dtype))
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    for (name, g), start, stop in zip(grads.items(), offsets[:-1], offsets[1:]):
        flat[start:stop] = g.ravel()
    flat[-1] = loss
    comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
    stats.allreduce_bytes += flat.nbytes
    summed = {name: flat[start:stop].reshape(g.shape) for (name, g), start, stop in zip(grads.items(), offsets[:-1], offsets[1:])}
    return float(flat[-1]), summed


def loss_and_grads(config: lm.LongNetConfig, params: dict, tokens, targets, mask=None, *, comm: MPI.Comm, return_stats: bool = False):
    """The whole sequence's mean cross-entropy and its gradients, from this rank's chunk (paper §3.1).

        loss  = (1/M) sum_{ranks p} sum_{(b, n) in mask_p} -log softmax(logits[b, n])[targets[b, n]]
        grads = sum_{ranks p} dloss_p / dtheta                     (identical on every rank)

    Collective: every rank of ``comm`` calls it with its own chunk. The result equals
    ``model.loss_and_grads`` on the whole sequence (to rounding: ``docs/parallel.md``).

    Args:
        config: The model; ``attention`` ``"dilated"`` or ``"window"`` (``"dense"`` needs every
            key on every rank and is refused), ``backend`` ``"numpy"`` or ``"numba"``.
        params: The parameters, replicated: the same on every rank.
        tokens: ``(B, L)`` integer: this rank's chunk, global positions ``[p L, (p + 1) L)``
            ([`chunk`][longnet_ref.parallel.chunk] cuts it from the whole ``(B, N)``).
        targets: ``(B, L)`` integer: the chunk's next tokens.
        mask: ``(B, L)`` bool or ``None`` (every target): which targets count.
        comm: The mpi4py intra-communicator of the ``P`` ranks.
        return_stats: Also return this rank's [`ParallelStats`][longnet_ref.parallel.ParallelStats].

    Returns:
        ``(loss, grads)``: the float mean over all ranks' unmasked targets and the gradient dict
        (the params' names and order); with ``return_stats`` also the stats, third.

    Raises:
        TypeError: ``comm`` is not an mpi4py intra-communicator (on the calling rank).
        InputTypeError: Every rank that failed failed with a type error; raised on all ranks.
        ValueError: Any other bad input on any rank (``"dense"`` attention, a backend without a
            distributed path, tokens out of range, shapes), chunks of different lengths (``N``
            not divisible by ``P``), ranks with different configs or parameters, or no target on
            any rank; raised on all ranks before any exchange of activations.
    """
    tokens, targets, mask, count = _validate(config, params, tokens, targets, mask, comm)
    stats = ParallelStats()
    loss, grads = distributed._abort_on_error(comm, lambda: _step(config, params, tokens, targets, mask, count, comm, stats))
    return (loss, grads, stats) if return_stats else (loss, grads)


def evaluate(config: lm.LongNetConfig, params: dict, tokens, targets, mask=None, *, comm: MPI.Comm) -> tuple[float, float]:
    """Mean loss and accuracy over all ranks' unmasked targets, forward only (held-out evaluation).

        loss     = (1/M) sum_p sum_{mask_p} -log softmax(logits)[target]
        accuracy = (1/M) sum_p sum_{mask_p} [argmax logits = target]

    Collective, with the arguments of [`loss_and_grads`][longnet_ref.parallel.loss_and_grads].

    Returns:
        ``(loss, accuracy)``, the same floats on every rank.
    """
    tokens, targets, mask, count = _validate(config, params, tokens, targets, mask, comm)

    def sums():
        length = tokens.shape[1]
        positions = comm.Get_rank() * length + np.arange(length)
        logits, _ = lm.forward(config, params, tokens, positions=positions, attention_core=SequenceParallelAttention(comm))
        loss, _ = nn.cross_entropy_forward(logits, targets, mask, count=count)  # my share of the mean
        hits = float((logits.argmax(-1) == targets)[mask].sum())
        return comm.allreduce(np.array([float(loss), hits]), op=MPI.SUM)  # the ranks' shares, summed

    loss, hits = distributed._abort_on_error(comm, sums)
    return float(loss), float(hits / count)
