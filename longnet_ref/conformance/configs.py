"""The configurations the kit draws, and the domain an implementation declares.

A configuration is one call: shapes ``B, N, H, D, Dv``, the branches ``(w_i, r_i)``, ``causal``
and the seed of the inputs. Hypothesis draws them and shrinks a failing one toward the smallest
(``N``, ``H``, ``D`` -> 1, one branch, ``r`` -> 1), so a counterexample is as small as the mistake
allows. The draws include ragged ``N`` (``N % w != 0``), ``w % r != 0``, ``r > w``, ``H < r`` and
``Dv != D`` unless the domain excludes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

MAX_N = 24
MAX_BRANCHES = 3
MAX_DILATION = 4
MAX_HEADS = 4
MAX_HEAD_DIM = 4

DOMAIN_FLAGS = {
    "n_multiple_of_w": "N is a multiple of every segment length w",
    "w_multiple_of_r": "every segment length w is a multiple of its dilation r",
    "h_multiple_of_r": "the number of heads H is a multiple of every dilation r",
    "dv_equals_d": "values have the head dimension of queries and keys (Dv == D)",
    "one_branch": "a single branch (w, r)",
    "one_head": "a single head (H == 1)",
    "non_causal": "causal=False only",
    "causal_only": "causal=True only",
}
"""The named flags ``domain`` accepts (besides ``"max_n=K"`` and a predicate)."""


@dataclass(frozen=True)
class Config:
    """One call of the implementation: ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)``, the branches."""

    batch: int
    n: int
    heads: int
    head_dim: int
    value_dim: int
    segment_lengths: tuple
    dilation_rates: tuple
    causal: bool
    seed: int

    def as_dict(self) -> dict:
        out = asdict(self)
        out["segment_lengths"], out["dilation_rates"] = list(self.segment_lengths), list(self.dilation_rates)
        return out

    def with_branches(self, segment_lengths, dilation_rates) -> "Config":
        return replace(self, segment_lengths=tuple(segment_lengths), dilation_rates=tuple(dilation_rates))

    def __str__(self) -> str:
        return (
            f"B={self.batch} N={self.n} H={self.heads} D={self.head_dim} Dv={self.value_dim} "
            f"w={list(self.segment_lengths)} r={list(self.dilation_rates)} causal={self.causal} seed={self.seed}"
        )


class Domain:
    """What an implementation claims to support: named flags, ``"max_n=K"``, and/or a predicate.

    ``domain`` may be ``None`` (everything), a predicate ``Config -> bool``, a string or a list
    of strings from [`DOMAIN_FLAGS`][longnet_ref.conformance.configs.DOMAIN_FLAGS] and
    ``"max_n=K"``, or a list mixing strings and predicates.
    """

    def __init__(self, domain: Any = None):
        items = [] if domain is None else [domain] if (isinstance(domain, str) or callable(domain)) else list(domain)
        self.flags, self.predicates, self.max_n = set(), [], MAX_N
        for item in items:
            if callable(item):
                self.predicates.append(item)
            elif isinstance(item, str) and item.startswith("max_n="):
                try:
                    self.max_n = min(MAX_N, int(item.removeprefix("max_n=")))
                except ValueError:
                    raise ValueError(f"domain: max_n must be an integer, got {item!r}") from None
                if self.max_n < 1:
                    raise ValueError(f"domain: max_n must be positive, got {item!r}")
            elif isinstance(item, str) and item in DOMAIN_FLAGS:
                self.flags.add(item)
            else:
                raise ValueError(f"domain: unknown flag {item!r}; known: {sorted(DOMAIN_FLAGS)}, 'max_n=K', or a predicate")
        if {"non_causal", "causal_only"} <= self.flags:
            raise ValueError("domain: 'non_causal' and 'causal_only' exclude every configuration")

    def causal_choices(self, causal: bool | None) -> list[bool]:
        """The ``causal`` values to draw: the kit's ``causal`` option within the domain."""
        choices = [False, True] if causal is None else [causal]
        if "non_causal" in self.flags:
            choices = [c for c in choices if not c]
        if "causal_only" in self.flags:
            choices = [c for c in choices if c]
        return choices

    def contains(self, cfg: Config) -> bool:
        """Whether the implementation claims ``cfg`` (a probe outside it is not applicable)."""
        f = self.flags
        pairs = list(zip(cfg.segment_lengths, cfg.dilation_rates))
        checks = [
            cfg.n <= self.max_n,
            "n_multiple_of_w" not in f or all(cfg.n % w == 0 for w, _ in pairs),
            "w_multiple_of_r" not in f or all(w % r == 0 for w, r in pairs),
            "h_multiple_of_r" not in f or all(cfg.heads % r == 0 for _, r in pairs),
            "dv_equals_d" not in f or cfg.value_dim == cfg.head_dim,
            "one_branch" not in f or len(pairs) == 1,
            "one_head" not in f or cfg.heads == 1,
            "non_causal" not in f or not cfg.causal,
            "causal_only" not in f or cfg.causal,
        ]
        return all(checks) and all(bool(p(cfg)) for p in self.predicates)


def _divisors(x: int) -> list[int]:
    return [d for d in range(1, x + 1) if x % d == 0]


@st.composite
def configs(draw, domain: Domain, causal_choices: list[bool]) -> Config:
    """A configuration inside ``domain``, built to satisfy its flags (few rejections)."""
    f = domain.flags
    n = draw(st.integers(1, domain.max_n))
    branches = 1 if "one_branch" in f else draw(st.integers(1, MAX_BRANCHES))
    segment_lengths, dilation_rates = [], []
    for _ in range(branches):
        if "n_multiple_of_w" in f:
            w = draw(st.sampled_from(_divisors(n)))
        else:
            w = draw(st.integers(1, domain.max_n + 2))
        r = draw(st.sampled_from([d for d in _divisors(w) if d <= MAX_DILATION])) if "w_multiple_of_r" in f else draw(st.integers(1, MAX_DILATION))
        segment_lengths.append(w)
        dilation_rates.append(r)
    if "one_head" in f:
        heads = 1
    elif "h_multiple_of_r" in f:
        heads = math.lcm(*dilation_rates) * draw(st.integers(1, 2))
    else:
        heads = draw(st.integers(1, MAX_HEADS))
    head_dim = draw(st.integers(1, MAX_HEAD_DIM))
    value_dim = head_dim if "dv_equals_d" in f else draw(st.integers(1, MAX_HEAD_DIM))
    cfg = Config(
        batch=draw(st.integers(1, 2)),
        n=n,
        heads=heads,
        head_dim=head_dim,
        value_dim=value_dim,
        segment_lengths=tuple(segment_lengths),
        dilation_rates=tuple(dilation_rates),
        causal=draw(st.sampled_from(causal_choices)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    assume(domain.contains(cfg))
    return cfg


CLASSIC_BRANCHES = [
    (2, 1, (1, 2), (1, 1)),  # two branches sharing a key: the mixture counts it twice
    (2, 3, (2,), (2,)),  # H = 3, r = 2: the "paper" and "torchscale" offsets differ (heads 1, 2)
    (3, 1, (2,), (1,)),  # ragged N: a short last segment
    (4, 2, (2,), (2,)),  # r = w: rows a head's branch does not cover
    (5, 3, (3, 5), (2, 1)),  # w % r != 0 with N > w; H not a multiple of r
]
"""``(N, H, w, r)`` of the configurations every search also tries: each exposes a classic mistake
on few rows, so a small ``max_examples`` still meets them (Hypothesis may still shrink further)."""


def classic_configs(domain: Domain, causal_choices: list[bool]) -> list[Config]:
    """The classic configurations inside ``domain`` (``D = 2``, ``Dv = 3`` unless ``Dv == D`` is declared)."""
    value_dim = 2 if "dv_equals_d" in domain.flags else 3
    candidates = [Config(1, n, heads, 2, value_dim, w, r, causal, 0) for n, heads, w, r in CLASSIC_BRANCHES for causal in causal_choices]
    return [cfg for cfg in candidates if domain.contains(cfg)]


def search_space(domain: Domain, causal_choices: list[bool]):
    """What Hypothesis draws from: random configurations, or one of the classic ones."""
    classics = classic_configs(domain, causal_choices)
    drawn = configs(domain, causal_choices)
    return st.one_of(drawn, st.sampled_from(classics)) if classics else drawn


def random_inputs(cfg: Config, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit-normal ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)`` from the configuration's seed."""
    rng = np.random.default_rng(cfg.seed)
    q = rng.standard_normal((cfg.batch, cfg.n, cfg.heads, cfg.head_dim))
    k = rng.standard_normal((cfg.batch, cfg.n, cfg.heads, cfg.head_dim))
    v = rng.standard_normal((cfg.batch, cfg.n, cfg.heads, cfg.value_dim))
    return tuple(x.astype(dtype) for x in (q, k, v))
