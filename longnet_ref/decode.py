"""Exact incremental decoding of causal dilated attention with a bounded KV cache.

LongNet (Ding et al., arXiv 2307.02486) §2.2-2.3; SPEC §2-4. Docs: ``docs/decoding.md``.

With ``causal=True`` the query at position ``t`` attends, in branch ``i = (w_i, r_i)`` and head
``h``, only the keys of its *own* segment ``s = t // w_i`` that the head's offset selects and that
are not after it (SPEC §3):

    K_i(t) = { p in I(i, s, h) : p <= t }.

Segments are disjoint, so every key of an earlier segment is dead for all later queries of that
branch: when ``t`` starts a new segment the branch's rows can be dropped. Within a segment a head
keeps at most ``ceil(w_i / r_i)`` rows. The whole cache of one layer is therefore bounded by

    sum_i ceil(w_i / r_i)  rows of (k, v) per head and batch item,

independent of the position, where the dense cache grows as ``t``. Each step appends the row ``t``
to the branches whose offset selects it, attends the cached rows of each branch (the same stable
softmax as the parallel forward, ``reference.attention_from_scores``) and mixes the branches by their
log-sum-exp exactly as the parallel forward does (``reference.mix_branches``, paper Eqs. 9-10):

    LSE = log sum_i exp(lse_i),   out = sum_i exp(lse_i - LSE) o_i.

The contract is exactness: ``step`` at position ``t`` returns row ``t`` of
``dilated_attention(q, k, v, ..., causal=True)`` on the whole sequence.

The index sets (which head selects which row) come from ``index_sets.py`` only: ``head_offsets`` and
the scalar rules ``segment_size`` / ``segment_position``.
"""

from __future__ import annotations

import math

import numpy as np

from .attention import dilated_attention
from .backends import get_backend, to_backend_arrays, to_numpy
from .index_sets import head_offsets, segment_position, segment_size
from .dense import dense_attention
from .reference import attention_from_scores, mix_branches
from .validation import InputTypeError, check_array, check_dtype, check_flag, check_int, check_memory, resolve_scale
from .validation import validate_branches, validate_offset_rule


def _check_causal(causal) -> None:
    if not check_flag(causal, "causal"):
        raise ValueError(
            "causal=False cannot be decoded incrementally: a token's output would depend on tokens "
            "not generated yet; use dilated_attention(..., causal=False) on the whole sequence"
        )


def _as_index(heads: np.ndarray):
    """The heads ``heads`` (sorted, distinct) as a basic slice when they are evenly spaced.

    A slice is a view: the selected heads' cached rows are read in place, not copied. With
    ``offsets="paper"`` the heads of one offset are every ``r``-th head, with ``"torchscale"`` a
    contiguous block; any other set falls back to fancy indexing (a copy, same result).
    """
    if heads.size == 1:
        return slice(int(heads[0]), int(heads[0]) + 1)
    steps = np.diff(heads)
    if (steps == steps[0]).all():
        return slice(int(heads[0]), int(heads[-1]) + 1, int(steps[0]))
    return heads


class _Cache:
    """What both caches share: the sizes, the dtype, the position and the input checks."""

    def __init__(self, batch, num_heads, head_dim, value_dim, scale, dtype):
        self.batch = check_int(batch, "batch", minimum=1)
        self.num_heads = check_int(num_heads, "num_heads", minimum=1)
        self.head_dim = check_int(head_dim, "head_dim", minimum=1)
        self.value_dim = check_int(value_dim, "value_dim", minimum=1)
        self.dtype = check_dtype(dtype)
        self.scale = resolve_scale(scale, self.head_dim)
        self.position = 0

    def _check_step(self, q_t, k_t, v_t) -> None:
        """``q_t, k_t: (B, H, D)``, ``v_t: (B, H, Dv)`` in the cache's dtype, else a clear error."""
        heads = (self.batch, self.num_heads)
        for name, x, last in (("q_t", q_t, self.head_dim), ("k_t", k_t, self.head_dim), ("v_t", v_t, self.value_dim)):
            check_array(x, name, 3)
            if x.shape != heads + (last,):
                raise ValueError(f"{name} must have shape (B, H, {'Dv' if name == 'v_t' else 'D'}) = {heads + (last,)}, got {x.shape}")
            if x.dtype != self.dtype:
                raise InputTypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")

    def _check_sequence(self, name, x, last, length=None) -> None:
        """A ``(B, T, H, last)`` array of the cache's sizes and dtype."""
        check_array(x, name, 4)
        if (x.shape[0], x.shape[2], x.shape[3]) != (self.batch, self.num_heads, last) or (length is not None and x.shape[1] != length):
            expected = (self.batch, "T" if length is None else length, self.num_heads, last)
            raise ValueError(f"{name} must have shape (B, T, H, .) = {expected}, got {x.shape}")
        if x.dtype != self.dtype:
            raise InputTypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")

    def _check_prompt(self, q, k, v) -> None:
        self._check_sequence("q", q, self.head_dim)
        self._check_sequence("k", k, self.head_dim, q.shape[1])
        self._check_sequence("v", v, self.value_dim, q.shape[1])
        if self.position != 0:
            raise ValueError(f"prefill needs an empty cache, but this one is at position {self.position}: call reset() first")

    def _check_fill(self, k, v, start) -> int:
        self._check_sequence("k", k, self.head_dim)
        self._check_sequence("v", v, self.value_dim, k.shape[1])
        return check_int(start, "start", minimum=0)


class DilatedKVCache(_Cache):
    """The bounded KV cache of one causal dilated-attention layer (SPEC §2-4).

    Per branch ``i`` it preallocates ``ceil(w_i / r_i)`` rows of keys and values per batch item
    and head and never grows. ``count[i][h]`` rows of head ``h`` are live: the rows of the current
    segment of branch ``i`` that the head's offset selects, in position order.

    Args:
        batch: ``B``.
        num_heads: ``H``.
        head_dim: ``D`` of queries and keys.
        value_dim: ``Dv`` of values.
        segment_lengths: the branches' ``w_i`` (SPEC §2).
        dilation_rates: the branches' ``r_i``, as many as ``w_i``.
        offsets: ``"paper"`` or ``"torchscale"`` (SPEC §2).
        scale: score scale, ``1/sqrt(D)`` by default.
        dtype: float32 or float64; every input must have it.
        causal: must be True (there is no incremental non-causal attention); a False is rejected.
    """

    def __init__(
        self,
        batch,
        num_heads,
        head_dim,
        value_dim,
        segment_lengths,
        dilation_rates,
        *,
        offsets="paper",
        scale=None,
        dtype=np.float64,
        causal=True,
    ):
        super().__init__(batch, num_heads, head_dim, value_dim, scale, dtype)
        _check_causal(causal)
        self.branches = validate_branches(segment_lengths, dilation_rates)
        self.offsets = validate_offset_rule(offsets)
        self.segment_lengths = tuple(b.segment_length for b in self.branches)
        self.dilation_rates = tuple(b.dilation for b in self.branches)
        # o_i(h): the offset of every head in every branch (SPEC §2), from index_sets.py.
        self.head_offsets = tuple(tuple(int(o) for o in head_offsets(self.num_heads, b.dilation, self.offsets)) for b in self.branches)
        # R_i = ceil(w_i / r_i): the most rows any offset selects in one segment.
        self.rows = tuple(math.ceil(b.segment_length / b.dilation) for b in self.branches)
        shape = lambda rows, dim: (self.batch, self.num_heads, rows, dim)  # (B, H, R_i, .)
        check_memory(
            self.batch * self.num_heads * sum(self.rows) * (self.head_dim + self.value_dim) * self.dtype.itemsize,
            f"DilatedKVCache(segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}), "
            "B H sum_i ceil(w_i / r_i) (D + Dv) values,",
        )
        # Zeros, not empty: a row past the live count is masked out of the softmax, but it still
        # enters the product P @ V with weight 0, and 0 * (uninitialised NaN) would be NaN.
        # np.full, not np.zeros: zeros of this size come from the OS as untouched pages that all
        # map one shared zero page, so the first segment's steps would read a cache that is not
        # really in memory and run faster than every later one (measured: 1.5x at t = 1K). Written
        # zeros make the cost per token the same from the first step on.
        self.keys = tuple(np.full(shape(r, self.head_dim), 0, self.dtype) for r in self.rows)
        self.values = tuple(np.full(shape(r, self.value_dim), 0, self.dtype) for r in self.rows)
        self.count = tuple(np.zeros(self.num_heads, np.int64) for _ in self.branches)  # (H,) live rows
        # Whether a non-finite value row was ever written to branch i. Rows past the live count
        # enter P @ V with weight exactly 0, which is harmless unless the row holds a NaN or Inf
        # (0 * NaN = NaN); only then does a step pay for the NaN-safe product (SPEC §7).
        self.nonfinite_values = [False] * len(self.branches)

    @property
    def allocated_rows(self) -> int:
        """Rows of keys (and of values) allocated per batch item and head: ``sum_i ceil(w_i / r_i)``."""
        return sum(self.rows)

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value rows the cache holds (allocated once, never grown)."""
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def reset(self) -> None:
        """Back to position 0 with no live rows (the memory is kept)."""
        self.position = 0
        for i, count in enumerate(self.count):
            count[:] = 0
            if self.nonfinite_values[i]:
                self.values[i][:] = 0
                self.nonfinite_values[i] = False

    def live_rows(self, n: int, branch: int) -> np.ndarray:
        """``count`` after positions ``0..n-1``: rows of segment ``(n-1) // w`` each head selects (SPEC §2).

        ``segment_size`` counts the rows of a segment inside a sequence of length ``n``; with
        ``n = t + 1`` that is exactly the causal prefix of ``t``'s segment.
        """
        w, r = self.segment_lengths[branch], self.dilation_rates[branch]
        if n == 0:
            return np.zeros(self.num_heads, np.int64)
        s = (n - 1) // w  # the segment of the last position
        return np.array([segment_size(n, w, r, o, s) for o in self.head_offsets[branch]], np.int64)  # (H,)

    def held_positions(self) -> list[list[np.ndarray]]:
        """The positions whose rows the cache holds, per branch and head: ``I(i, s, h)`` up to ``t - 1``."""
        held = []
        for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates)):
            s = max(self.position - 1, 0) // w
            held.append([segment_position(w, r, o, s, np.arange(c)) for o, c in zip(self.head_offsets[i], self.count[i])])
        return held

    def step(self, q_t, k_t, v_t):
        """Attention output of position ``t = self.position``, then advance to ``t + 1``.

        Per branch ``i``: the live count becomes the rows of ``t``'s segment up to ``t`` (0 or 1
        when ``t`` starts a segment: the old rows are dropped); the heads whose newest row is ``t``
        append ``(k_t, v_t)`` and attend their live rows (paper Eq. 6); the other heads get
        ``lse_i = -inf`` from this branch. The branches are mixed by ``mix_branches`` (Eqs. 9-10).

        ``q_t, k_t: (B, H, D)``, ``v_t: (B, H, Dv)`` -> ``out_t (B, H, Dv)``, ``lse_t (B, H)``;
        a position no branch covers for a head gets ``out = 0``, ``lse = -inf`` (SPEC §4).
        """
        self._check_step(q_t, k_t, v_t)
        t = self.position
        branch_out = np.zeros((len(self.branches), self.batch, self.num_heads, self.value_dim), self.dtype)  # o_i
        branch_lse = np.full((len(self.branches), self.batch, self.num_heads), -np.inf, self.dtype)  # lse_i
        for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates)):
            count = self.count[i]
            count[:] = self.live_rows(t + 1, i)  # (H,)
            # A head selects t iff its newest live row is t (SPEC §2 via segment_position).
            newest = segment_position(w, r, np.array(self.head_offsets[i]), t // w, count - 1)  # (H,)
            heads = np.flatnonzero((count > 0) & (newest == t))  # (Hs,) heads this branch covers at t
            if heads.size == 0:
                continue
            at = _as_index(heads)
            keys, values = self.keys[i][:, at], self.values[i][:, at]  # (B, Hs, R_i, .) views when at is a slice
            rows = count[heads] - 1  # (Hs,) where row t goes
            keys[:, np.arange(heads.size), rows] = k_t[:, heads]
            values[:, np.arange(heads.size), rows] = v_t[:, heads]
            if not isinstance(at, slice):  # fancy indexing copied: write the rows back to the cache
                self.keys[i][:, heads, rows] = k_t[:, heads]
                self.values[i][:, heads, rows] = v_t[:, heads]
            self.nonfinite_values[i] |= not np.isfinite(v_t[:, heads]).all()
            # S = scale q_t K^T over the live rows of the segment (paper Eq. 6), -inf elsewhere.
            scores = self.scale * (q_t[:, heads, None, :] @ np.swapaxes(keys, -1, -2))  # (B, Hs, 1, R_i)
            live = (np.arange(self.rows[i]) < count[heads, None])[None, :, None, :]  # (1, Hs, 1, R_i)
            attended = live if self.nonfinite_values[i] else None  # None: every value row is finite, plain P @ V
            out_i, lse_i = attention_from_scores(np.where(live, scores, -np.inf), values, attended)  # (B, Hs, 1, Dv), (B, Hs, 1)
            branch_out[i][:, heads] = out_i[:, :, 0]
            branch_lse[i][:, heads] = lse_i[:, :, 0]
        out, lse = mix_branches(branch_out, branch_lse)  # (B, H, Dv), (B, H)
        self.position = t + 1
        return out, lse

    def prefill(self, q, k, v, *, backend="numpy"):
        """Causal forward of a prompt with the parallel ``dilated_attention``, then [`fill`][].

        ``q, k: (B, T, H, D)``, ``v: (B, T, H, Dv)`` -> ``out (B, T, H, Dv)``, ``lse (B, T, H)``;
        the cache is left at position ``T``, holding only the current segments' rows. ``backend``
        is any registered name: the prompt goes to the backend's array library (CuPy on the GPU)
        and the results come back as NumPy arrays, like the cache.
        """
        get_backend(backend)  # an unknown name, or a GPU backend without CuPy, before any work
        self._check_prompt(q, k, v)
        out, lse = dilated_attention(
            *(to_backend_arrays(x, backend) for x in (q, k, v)),
            self.segment_lengths,
            self.dilation_rates,
            causal=True,
            scale=self.scale,
            offsets=self.offsets,
            backend=backend,
            return_lse=True,
        )
        self.fill(k, v)
        return to_numpy(out), to_numpy(lse)

    def first_needed_position(self, n: int) -> int:
        """The earliest position whose row the cache holds at position ``n``: the oldest current segment's start."""
        return min(((n - 1) // w) * w for w in self.segment_lengths) if n > 0 else 0

    def fill(self, k, v, *, start=0):
        """Put the cache in the state ``step`` leaves after positions ``0..T-1``, computing no output.

        ``k (B, L, H, D)`` and ``v (B, L, H, Dv)`` hold the keys and values of positions
        ``start .. T-1`` with ``T = start + L``. Only the current segment of each branch is read,
        so ``start`` may skip everything before [`first_needed_position`][] ``(T)``: reaching
        position ``2**20`` needs the last ``max_i w_i`` rows, not ``2**20`` steps. This is how
        the benchmark builds a cache far into a sequence; a test checks it equals stepping.
        """
        start = self._check_fill(k, v, start)
        n = start + k.shape[1]  # T
        needed = self.first_needed_position(n)
        if start > needed:
            raise ValueError(f"start must be <= {needed} (the oldest row the cache holds at position {n}), got {start}")
        self.reset()
        for i, (w, r) in enumerate(zip(self.segment_lengths, self.dilation_rates)):
            self.count[i][:] = self.live_rows(n, i)
            s = max(n - 1, 0) // w
            for h, (o, c) in enumerate(zip(self.head_offsets[i], self.count[i])):
                positions = segment_position(w, r, o, s, np.arange(c)) - start  # (c,)
                self.keys[i][:, h, :c] = k[:, positions, h]
                self.values[i][:, h, :c] = v[:, positions, h]
            self.nonfinite_values[i] = not np.isfinite(self.values[i]).all()
        self.position = n


class DenseKVCache(_Cache):
    """The dense baseline: every key and value so far, ``O(t)`` memory and work per token.

    ``capacity`` preallocates that many positions (a step past it is an error); ``None`` grows
    the buffers by doubling, as a dynamic array does.
    """

    def __init__(self, batch, num_heads, head_dim, value_dim, *, scale=None, dtype=np.float64, capacity=None, causal=True):
        super().__init__(batch, num_heads, head_dim, value_dim, scale, dtype)
        _check_causal(causal)
        self.growable = capacity is None
        capacity = 16 if capacity is None else check_int(capacity, "capacity", minimum=1)
        check_memory(
            self.batch * self.num_heads * capacity * (self.head_dim + self.value_dim) * self.dtype.itemsize,
            f"DenseKVCache(capacity={capacity}), B H capacity (D + Dv) values,",
        )
        self.keys = np.zeros((self.batch, self.num_heads, capacity, self.head_dim), self.dtype)  # (B, H, C, D)
        self.values = np.zeros((self.batch, self.num_heads, capacity, self.value_dim), self.dtype)  # (B, H, C, Dv)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value buffers (allocated; grows with the position)."""
        return self.keys.nbytes + self.values.nbytes

    def reset(self) -> None:
        self.position = 0

    def _reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        if not self.growable:
            raise ValueError(f"capacity={self.capacity} positions is full: cannot hold position {n - 1}")
        grown = max(n, 2 * self.capacity)
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = np.zeros(old.shape[:2] + (grown,) + old.shape[3:], self.dtype)
            new[:, :, : self.position] = old[:, :, : self.position]
            setattr(self, name, new)

    def step(self, q_t, k_t, v_t):
        """Dense causal attention of position ``t``: ``out = softmax(scale q_t K_{0..t}^T) V_{0..t}``.

        ``q_t, k_t: (B, H, D)``, ``v_t: (B, H, Dv)`` -> ``out_t (B, H, Dv)``, ``lse_t (B, H)``.
        """
        self._check_step(q_t, k_t, v_t)
        t = self.position
        self._reserve(t + 1)
        self.keys[:, :, t], self.values[:, :, t] = k_t, v_t
        keys, values = self.keys[:, :, : t + 1], self.values[:, :, : t + 1]  # (B, H, t+1, .)
        scores = self.scale * (q_t[:, :, None, :] @ np.swapaxes(keys, -1, -2))  # (B, H, 1, t+1)
        out, lse = attention_from_scores(scores, values)  # (B, H, 1, Dv), (B, H, 1)
        self.position = t + 1
        return out[:, :, 0], lse[:, :, 0]

    def prefill(self, q, k, v):
        """Causal ``dense_attention`` of a prompt, then [`fill`][]: ``(out (B, T, H, Dv), lse (B, T, H))``."""
        self._check_prompt(q, k, v)
        out, lse = dense_attention(q, k, v, causal=True, scale=self.scale, return_lse=True)
        self.fill(k, v)
        return out, lse

    def fill(self, k, v, *, start=0):
        """Put the cache at position ``T`` holding ``k (B, T, H, D)``, ``v (B, T, H, Dv)``; no output.

        Every row is needed by the dense cache, so ``start`` must be 0.
        """
        if self._check_fill(k, v, start) != 0:
            raise ValueError(f"start must be 0 for the dense cache (it keeps every row), got {start}")
        n = k.shape[1]
        self.position = 0
        self._reserve(n)
        self.keys[:, :, :n] = np.swapaxes(k, 1, 2)
        self.values[:, :, :n] = np.swapaxes(v, 1, 2)
        self.position = n
