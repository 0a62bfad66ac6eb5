"""Training data: a synthetic long-range task generated on the fly, and byte-level text.

**Passkey retrieval.** Every sequence is filler noise with one *passkey* hidden near its start;
the last token is a query marker and the model must answer the passkey there:

    position:  0 ... p ...           N-1
    token:     f  f  K  f  f ... f   ?      ->  target at N-1: K

- ``K`` is one of ``num_keys`` passkey tokens, which never occur as filler, so recognising it
  needs no position: a query that can *see* ``K`` can copy it;
- ``p`` is uniform in ``[0, N * reach_fraction)``: the answer lies at least ``N (1 -
  reach_fraction) - 1`` tokens back, out of reach of any local window narrower than that;
- ``span`` (default 1) writes the passkey ``span`` times in a row (``p .. p + span - 1``): with
  ``span >= max r_i`` every residue class mod ``r`` holds a copy, so a dilated head reaches one
  in a single layer (see ``docs/model.md``);
- the loss counts the answer position only (``mask``), so chance is ``ln num_keys`` nats.

The task is chosen to be easy for dense attention (one attention layer can solve it: put
the query's weight on the one passkey token) so that what a model fails to learn says
something about its *reach*, not about the task (docs: ``docs/model.md``).

**Text.** Any file read as bytes (vocabulary 256); a batch is ``B`` random windows of
``N + 1`` bytes, inputs ``[:-1]``, targets ``[1:]`` (next-byte prediction).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .validation import InputTypeError, check_int, check_real, check_rng

QUERY = 0  # the marker that asks for the passkey (token 0)


@dataclass(frozen=True)
class Batch:
    tokens: np.ndarray  # (B, N) int64 inputs
    targets: np.ndarray  # (B, N) int64 next tokens (passkey: the answer at N-1, 0 elsewhere)
    mask: np.ndarray  # (B, N) bool: positions the loss counts


@dataclass(frozen=True)
class PasskeyTask:
    """Passkey retrieval at context length ``n``.

    Vocabulary: ``0`` the query marker, ``1 .. num_keys`` the passkeys, then ``num_fillers`` filler
    tokens: ``vocab_size = 1 + num_keys + num_fillers``.
    """

    n: int
    num_keys: int = 8
    num_fillers: int = 16
    reach_fraction: float = 0.25
    span: int = 1

    def __post_init__(self):
        for name in ("num_keys", "num_fillers", "span"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.n, "n", minimum=2)  # a passkey and the query
        check_real(self.reach_fraction, "reach_fraction", above=0)
        if not 0 < self.reach_fraction < 1:  # 1 would leave no room for the key before the query
            raise ValueError(f"reach_fraction must lie in (0, 1), got {self.reach_fraction!r}")
        if self.max_position + self.span > self.n - 1:
            raise ValueError(f"span {self.span} does not fit before the query: n * reach_fraction + span must be < n")

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_fillers

    @property
    def chance_loss(self) -> float:
        return float(np.log(self.num_keys))

    @property
    def max_position(self) -> int:
        """The passkey lies in ``[0, max_position)``, at least ``n - max_position`` tokens before the query."""
        return max(1, min(self.n - 1, int(self.n * self.reach_fraction)))

    @staticmethod
    def shortest(span: int = 1, reach_fraction: float = 0.25) -> int:
        """The smallest ``n`` whose sequences hold ``span`` copies of the key before the query."""
        n = 2
        while max(1, min(n - 1, int(n * reach_fraction))) + span > n - 1:
            n += 1
        return n

    def batch(self, batch_size: int, rng: np.random.Generator, keys=None) -> Batch:
        """``batch_size`` sequences drawn from ``rng``; ``keys (B,)`` in ``1 .. num_keys`` fixes their
        passkeys (the draws from ``rng`` are the same either way)."""
        batch_size, rng = check_int(batch_size, "batch_size", minimum=1), check_rng(rng)
        B, N = batch_size, self.n
        first_filler = 1 + self.num_keys
        tokens = rng.integers(first_filler, self.vocab_size, size=(B, N))  # (B, N) filler
        drawn = rng.integers(1, first_filler, size=B)  # (B,) the passkeys
        if keys is None:
            keys = drawn
        else:
            keys = np.broadcast_to(np.asarray(keys), (B,))
            if not np.issubdtype(keys.dtype, np.integer) or keys.min() < 1 or keys.max() > self.num_keys:
                raise ValueError(f"keys must be integers in [1, {self.num_keys}], got {keys.tolist()}")
        where = rng.integers(0, self.max_position, size=B)  # (B,) their (first) positions
        for copy in range(self.span):
            tokens[np.arange(B), where + copy] = keys
        tokens[:, -1] = QUERY
        targets = np.zeros((B, N), np.int64)
        targets[:, -1] = keys
        mask = np.zeros((B, N), bool)
        mask[:, -1] = True
        return Batch(tokens.astype(np.int64), targets, mask)


def accuracy(logits, batch: Batch) -> float:
    """Fraction of the masked positions where the arg-max of the logits is the target."""
    return float((logits.argmax(-1) == batch.targets)[batch.mask].mean())


def read_text(path) -> np.ndarray:
    """A file's bytes as a ``uint8`` array; a clear ``ValueError`` if it is missing or empty."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"text file {path!r} does not exist (or is not a file)")
    with open(path, "rb") as f:
        data = np.frombuffer(f.read(), np.uint8)
    if data.size == 0:
        raise ValueError(f"text file {path!r} is empty")
    return data


@dataclass(frozen=True)
class TextTask:
    """Next-byte prediction on a byte string; vocabulary 256."""

    data: np.ndarray  # (T,) uint8
    n: int
    vocab_size: int = 256

    @classmethod
    def from_file(cls, path, n: int) -> TextTask:
        return cls(read_text(path), n)

    def __post_init__(self):
        if not isinstance(self.data, np.ndarray) or self.data.ndim != 1 or self.data.dtype != np.uint8:
            raise InputTypeError(f"data must be a 1-D uint8 array of bytes (read_text(path)), got {type(self.data).__name__}")
        check_int(self.n, "n", minimum=1)
        if self.data.size < self.n + 1:
            raise ValueError(f"the text has {self.data.size} bytes, fewer than n + 1 = {self.n + 1}: use a longer text or a smaller n")

    @property
    def chance_loss(self) -> float:
        return float(np.log(self.vocab_size))

    def batch(self, batch_size: int, rng: np.random.Generator) -> Batch:
        batch_size, rng = check_int(batch_size, "batch_size", minimum=1), check_rng(rng)
        starts = rng.integers(0, self.data.size - self.n, size=batch_size)  # (B,)
        windows = self.data[starts[:, None] + np.arange(self.n + 1)].astype(np.int64)  # (B, N + 1)
        return Batch(windows[:, :-1], windows[:, 1:], np.ones((batch_size, self.n), bool))
