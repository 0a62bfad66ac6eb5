"""The properties, one group per section of the specification (``docs/spec.md`` §1-§8).

Each group is a probe: given a configuration it calls the implementation on inputs built to
expose one kind of mistake, and returns a [`Finding`][longnet_ref.conformance.properties.Finding]
when the implementation breaks that section, ``None`` when it keeps it. The probes are built so
that a mistake shows in the section where it lives, and only there:

- §1 compares the output's shape and dtype, and plain dense attention (one branch ``w = N``,
  ``r = 1``) at the default scale ``1/sqrt(D)``. Every later value check uses the scale the
  implementation was measured to use (see [`measure_scale`][longnet_ref.conformance.properties.measure_scale]),
  so a wrong scale is reported once, here.
- §2 reads which keys each row attends from one-hot values (``v_j = e_j``: ``out(p)`` is then the
  row's attention weights), which does not depend on the scale or on how branches are mixed.
- §3 takes one branch at a time with all scores equal (every query one vector, every key
  another: every attended key weighs the same, whatever the scale; the common score is not 0,
  so no ``lse`` is exactly 0), so a padding key in a softmax or a missing diagonal changes the
  values; and checks that no future key changes a row.
- §4 mixes branches; it runs only on configurations whose index sets (§2) and single branches
  (§3) are right, so what remains is the mixture (counts, weights, uncovered rows).
- §5 compares the backward with central differences of the implementation's OWN forward, so a
  forward mistake does not show as a gradient mistake; where the forward is right it also
  compares with the oracle's exact gradient.
- §6 the call contract: one array out, inputs not modified, ``(dq, dk, dv)`` shaped as ``q, k, v``.
- §7 a NaN in one key reaches exactly the rows that attend it (on configurations whose index sets
  are right).
- §8 with ``offsets="torchscale"``: where SPEC §8 says torchscale and the spec agree, the output
  is the spec's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from .oracle import forward as oracle_forward, gradients as oracle_gradients, multiplicity as oracle_multiplicity
from .configs import Config, Domain, random_inputs
from .tolerances import FINITE_DIFFERENCES, GRADIENTS, SUPPORT, VALUES

CANDIDATE_SCALES = {"1/sqrt(D)": lambda d: 1 / math.sqrt(d), "1/D": lambda d: 1 / d, "1": lambda d: 1.0}
"""Score scales the kit recognises by name (SPEC §1 fixes ``1/sqrt(D)``)."""


@dataclass
class Finding:
    """One broken property: what was seen, the largest error and the tolerance it broke."""

    message: str
    max_error: float = float("nan")
    tolerance: str = ""


class NotApplicable(Exception):
    """The probe cannot run on this configuration (outside the declared domain, no gradient)."""


class ImplementationError(Exception):
    """The implementation raised inside its domain: a failure, reported with its message."""


@dataclass
class Kit:
    """What every probe needs: the adapted functions, the options, the measured scale."""

    forward_fn: Callable
    backward_fn: Callable | None
    domain: Domain
    offsets: str
    dtype: str
    causal_choices: list
    scale_rule: str = "1/sqrt(D)"

    # -- calling the implementation -------------------------------------------------------
    def forward(self, cfg: Config, q, k, v, causal: bool | None = None) -> np.ndarray:
        if not self.domain.contains(cfg):
            raise NotApplicable(f"outside the declared domain: {cfg}")
        try:
            return self.forward_fn(q, k, v, cfg.segment_lengths, cfg.dilation_rates, cfg.causal if causal is None else causal)
        except NotApplicable:
            raise
        except Exception as error:  # noqa: BLE001 (any exception inside the domain is a failure)
            raise ImplementationError(f"forward raised {type(error).__name__}: {error}") from error

    def backward(self, cfg: Config, dout, q, k, v):
        try:
            return self.backward_fn(dout, q, k, v, cfg.segment_lengths, cfg.dilation_rates, cfg.causal)
        except Exception as error:  # noqa: BLE001
            raise ImplementationError(f"backward raised {type(error).__name__}: {error}") from error

    def shaped_forward(self, cfg: Config, q, k, v, causal: bool | None = None) -> np.ndarray:
        """The forward, or ``NotApplicable`` when its output cannot be read (shape: §1's)."""
        out = self.forward(cfg, q, k, v, causal)
        if getattr(out, "shape", None) != expected_shape(cfg):
            raise NotApplicable("the output has the wrong shape (reported in §1)")
        return out

    # -- the oracle ------------------------------------------------------------------------
    def counts(self, cfg: Config, causal: bool | None = None, rule: str | None = None) -> np.ndarray:
        causal = cfg.causal if causal is None else causal
        return oracle_multiplicity(cfg.n, cfg.heads, cfg.segment_lengths, cfg.dilation_rates, causal, rule or self.offsets)

    def scale(self, head_dim: int) -> float:
        return CANDIDATE_SCALES[self.scale_rule](head_dim)

    def expected(self, cfg: Config, q, k, v, causal: bool | None = None, counts=None) -> np.ndarray:
        m = self.counts(cfg, causal) if counts is None else counts
        return oracle_forward(q, k, v, m, self.scale(cfg.head_dim))

    def in_dtype(self, *arrays):
        return tuple(np.asarray(x).astype(self.dtype) for x in arrays)


def expected_shape(cfg: Config) -> tuple:
    return (cfg.batch, cfg.n, cfg.heads, cfg.value_dim)


def compare(actual, expected, tol: dict):
    """``(ok, max_error, (b, p, h) of the worst row)``; NaN must meet NaN."""
    actual = np.asarray(actual, dtype=np.float64)
    both_nan = np.isnan(actual) & np.isnan(expected)
    error = np.where(both_nan, 0.0, np.abs(actual - expected))
    error = np.where(np.isnan(error), np.inf, error)
    bound = tol["atol"] + tol["rtol"] * np.abs(np.nan_to_num(expected))
    excess = error - bound
    if excess.size == 0:
        return True, 0.0, None
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    return bool(np.all(excess <= 0)), float(np.max(error)), tuple(int(i) for i in worst[:3])


def tolerance_text(tol: dict) -> str:
    return ", ".join(f"{name}={value:g}" for name, value in tol.items())


def _row_text(where) -> str:
    b, p, h = where
    return f"row p={p} (batch {b}, head {h})"


# -- measuring the scale -----------------------------------------------------------------------


def dense_config(kit: Kit, cfg: Config) -> Config:
    """One branch with ``w = N`` and ``r = 1``: plain dense softmax attention (SPEC §2-§4),
    non-causal unless the kit checks only ``causal=True`` (a causal-mask mistake is §3's)."""
    return replace(cfg.with_branches([cfg.n], [1]), causal=False if False in kit.causal_choices else cfg.causal)


def scale_names_matching(kit: Kit, cfg: Config, out, q, k, v, causal: bool) -> list[str]:
    """The named scales with which dense attention reproduces ``out``."""
    m = kit.counts(cfg, causal)
    tol = VALUES[kit.dtype]
    return [name for name, rule in CANDIDATE_SCALES.items() if compare(out, oracle_forward(q, k, v, m, rule(cfg.head_dim)), tol)[0]]


def measure_scale(kit: Kit) -> str | None:
    """The score scale the implementation uses, found on a small dense problem (``D = 4``,
    where ``1/sqrt(D)``, ``1/D`` and ``1`` differ); ``None`` if none of them fits or no such
    problem is in the domain. Later sections compare against the oracle at this scale."""
    for heads in (1, 2, 4):
        for head_dim in (4, 8, 16):
            n = min(6, kit.domain.max_n)
            cfg = Config(1, n, heads, head_dim, head_dim, (n,), (1,), kit.causal_choices[0], 0)
            if not kit.domain.contains(cfg):
                continue
            q, k, v = random_inputs(cfg, kit.dtype)
            try:
                out = kit.forward(cfg, q, k, v)
            except (ImplementationError, NotApplicable):
                return None
            if getattr(out, "shape", None) != expected_shape(cfg):
                return None
            names = scale_names_matching(kit, cfg, out, q, k, v, cfg.causal)
            return names[0] if names else None
    return None


# -- §1 ----------------------------------------------------------------------------------------


def tensors_and_layout(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §1: ``out`` is ``(B, N, H, Dv)`` in the inputs' dtype; scores are scaled by ``1/sqrt(D)``."""
    q, k, v = random_inputs(cfg, kit.dtype)
    out = kit.forward(cfg, q, k, v)
    if not isinstance(out, np.ndarray):
        return Finding(f"{cfg}: forward returned {type(out).__name__}, not an array")
    if out.shape != expected_shape(cfg):
        return Finding(f"{cfg}: out has shape {out.shape}; SPEC §1: (B, N, H, Dv) = {expected_shape(cfg)}")
    if out.dtype != np.dtype(kit.dtype):
        return Finding(f"{cfg}: out has dtype {out.dtype}; the inputs are {kit.dtype}")
    dense = dense_config(kit, cfg)
    if not kit.domain.contains(dense):
        return None
    q, k, v = random_inputs(dense, kit.dtype)
    out = kit.forward(dense, q, k, v)
    m = kit.counts(dense)
    tol = VALUES[kit.dtype]
    ok, error, where = compare(out, oracle_forward(q, k, v, m, 1 / math.sqrt(dense.head_dim)), tol)
    if ok:
        return None
    others = [name for name in scale_names_matching(kit, dense, out, q, k, v, dense.causal) if name != "1/sqrt(D)"]
    reason = f"it is dense attention with scale {others[0]}" if others else "it is not dense softmax attention at any of the scales 1/sqrt(D), 1/D, 1"
    return Finding(
        f"{dense} (one branch w=N, r=1: dense attention): {_row_text(where)} differs from softmax(q.k / sqrt(D)) v; {reason}",
        error,
        tolerance_text(tol),
    )


# -- §2 ----------------------------------------------------------------------------------------


def one_hot_config(kit: Kit, cfg: Config) -> Config:
    """``cfg`` with ``Dv = N`` (or ``D = Dv = N``), so that values can be one-hot over keys."""
    for candidate in (Config(**{**cfg.__dict__, "value_dim": cfg.n}), Config(**{**cfg.__dict__, "value_dim": cfg.n, "head_dim": cfg.n})):
        if kit.domain.contains(candidate):
            return candidate
    raise NotApplicable("no one-hot probe (Dv = N) in the declared domain")


def attended_keys(kit: Kit, cfg: Config, causal: bool):
    """Run the one-hot probe: ``(attended (B, N, H, N) bool, weights, q, k, v, probe config)``."""
    probe = one_hot_config(kit, cfg)
    rng = np.random.default_rng(probe.seed)
    q = 0.3 * rng.standard_normal((probe.batch, probe.n, probe.heads, probe.head_dim))
    k = 0.3 * rng.standard_normal((probe.batch, probe.n, probe.heads, probe.head_dim))
    v = np.broadcast_to(np.eye(probe.n)[None, :, None, :], (probe.batch, probe.n, probe.heads, probe.n))  # v_j = e_j
    q, k, v = kit.in_dtype(q, k, v)
    out = kit.shaped_forward(probe, q, k, v, causal)
    return np.abs(np.asarray(out, np.float64)) > SUPPORT[kit.dtype], out, q, k, v, probe


def support_finding(kit: Kit, cfg: Config, causal: bool, section: str) -> Finding | None:
    """Compare which keys each covered row attends with SPEC §2-§3's ``K(p)`` (union over branches)."""
    attended, out, q, k, v, probe = attended_keys(kit, cfg, causal)
    m = kit.counts(probe, causal)  # (H, N, N)
    spec = np.broadcast_to(m[None] > 0, (probe.batch, probe.heads, probe.n, probe.n)).transpose(0, 2, 1, 3)  # (B, N, H, N)
    covered = spec.any(axis=-1)
    wrong = covered[..., None] & (attended != spec)
    if not wrong.any():
        return None
    b, p, h = (int(i) for i in np.argwhere(wrong.any(axis=-1))[0])
    got, want = np.flatnonzero(attended[b, p, h]).tolist(), np.flatnonzero(spec[b, p, h]).tolist()
    message = f"{probe}: head {h}, row {p} attends keys {got}; SPEC {section} gives {want}"
    if causal and p in want and p not in got and set(got) == set(want) - {p}:
        message += " (the diagonal key k = p is missing from the causal mask)"
    elif causal and any(key > p for key in got):
        message += " (future keys k > p are attended)"
    other = "torchscale" if kit.offsets == "paper" else "paper"
    m_other = kit.counts(probe, causal, other)
    if np.array_equal(
        attended & covered[..., None], np.broadcast_to(m_other[None] > 0, spec.shape[:1] + m_other.shape).transpose(0, 2, 1, 3) & covered[..., None]
    ):
        message += f" (these are the head offsets of the {other!r} rule; the kit checks offsets={kit.offsets!r})"
    _, error, _ = compare(out, kit.expected(probe, q, k, v, causal), VALUES[kit.dtype])
    return Finding(message, error, f"a key is attended when its weight > {SUPPORT[kit.dtype]:g}")


def index_sets(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §2: each head keeps rows ``o + t r`` of each segment, ``o`` by the offsets rule."""
    causal = False if False in kit.causal_choices else cfg.causal
    return support_finding(kit, cfg, causal, "§2")


def support_right(kit: Kit, cfg: Config, causal: bool) -> bool:
    """A precondition: the index sets are right here (or cannot be probed in the domain)."""
    try:
        return support_finding(kit, cfg, causal, "§2") is None
    except NotApplicable:
        return True
    except ImplementationError:
        return False


# -- §3 ----------------------------------------------------------------------------------------


def single_branches(kit: Kit, cfg: Config):
    """Each branch of ``cfg`` alone, where the domain allows it."""
    for w, r in zip(cfg.segment_lengths, cfg.dilation_rates):
        one = cfg.with_branches([w], [r])
        if kit.domain.contains(one):
            yield one


def future_keys_finding(kit: Kit, cfg: Config) -> Finding | None:
    """Causal: replace the keys and values at positions ``>= c``; rows ``< c`` must not change."""
    if not cfg.causal or cfg.n < 2:
        return None
    q, k, v = random_inputs(cfg, kit.dtype)
    cut = 1 + cfg.seed % (cfg.n - 1)
    rng = np.random.default_rng(cfg.seed + 1)
    k2, v2 = k.copy(), v.copy()
    k2[:, cut:] = 3 * rng.standard_normal(k2[:, cut:].shape)
    v2[:, cut:] = 3 * rng.standard_normal(v2[:, cut:].shape)
    before = kit.shaped_forward(cfg, q, k, v)
    after = kit.shaped_forward(cfg, q, *kit.in_dtype(k2, v2))
    tol = VALUES[kit.dtype]
    ok, error, where = compare(after[:, :cut], np.asarray(before[:, :cut], np.float64), tol)
    if ok:
        return None
    return Finding(f"{cfg}: changing keys and values at positions >= {cut} changed {_row_text(where)}, a row before them", error, tolerance_text(tol))


def ragged(cfg: Config) -> bool:
    return any(cfg.n % w != 0 and cfg.n > w or min(w, cfg.n) % r != 0 for w, r in zip(cfg.segment_lengths, cfg.dilation_rates))


def equal_scores(kit: Kit, cfg: Config):
    """``q, k`` whose scores are all equal (``q_p = 0.5 (1, ..., 1)``, ``k_j = (1, ..., 1)``):
    softmax weights are then uniform over a row's keys for any scale, and ``lse = s + log K != 0``."""
    shape = (cfg.batch, cfg.n, cfg.heads, cfg.head_dim)
    return kit.in_dtype(np.full(shape, 0.5), np.ones(shape))


def equal_scores_finding(kit: Kit, one: Config) -> Finding | None:
    """One branch with all scores equal: each row is the plain mean of its keys' values."""
    q, k = equal_scores(kit, one)
    v = random_inputs(one, kit.dtype)[2]
    out = kit.shaped_forward(one, q, k, v)
    tol = VALUES[kit.dtype]
    ok, error, where = compare(out, kit.expected(one, q, k, v), tol)
    if ok:
        return None
    b, p, h = where
    keys = np.flatnonzero(kit.counts(one)[h, p]).tolist()
    message = f"{one}: with all scores equal {_row_text(where)} must be the mean of the values of keys {keys}"
    if ragged(one):
        message += "; this configuration has a short segment (N % w != 0 or a segment not divisible by r): do zero-padding keys enter the softmax?"
    return Finding(message, error, tolerance_text(tol))


def one_branch(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §3: within one branch a row attends exactly ``K_i(p)`` (``k <= p`` when causal), and
    no padding enters a softmax."""
    finding = future_keys_finding(kit, cfg)
    if finding:
        return finding
    for one in single_branches(kit, cfg):
        if not support_right(kit, one, False):
            continue  # the index sets are wrong: §2 reports it
        if one.causal:
            try:
                finding = support_finding(kit, one, True, "§3 (causal: keys k <= p)")
            except NotApplicable:
                finding = None
            if finding:
                return finding
        finding = equal_scores_finding(kit, one)
        if finding:
            return finding
    return None


def branches_right(kit: Kit, cfg: Config) -> bool:
    """A precondition of §4 and §7: §2 and §3 hold on this configuration."""
    if not support_right(kit, cfg, False) or (cfg.causal and not support_right(kit, cfg, True)):
        return False
    try:
        return all(equal_scores_finding(kit, one) is None for one in single_branches(kit, cfg))
    except NotApplicable:
        return True
    except ImplementationError:
        return False


# -- §4 ----------------------------------------------------------------------------------------


def mixture_diagnosis(kit: Kit, cfg: Config, out, q, k, v) -> str:
    """Name the classic mixture mistakes that reproduce ``out``."""
    tol = VALUES[kit.dtype]
    m = kit.counts(cfg)
    if compare(out, kit.expected(cfg, q, k, v, counts=(m > 0).astype(np.int64)), tol)[0]:
        return " (it counts a key that several branches give once: the union of the branches' keys, not their sum, Eq. 10)"
    outs, covers = [], []
    for w, r in zip(cfg.segment_lengths, cfg.dilation_rates):
        one = cfg.with_branches([w], [r])
        outs.append(kit.expected(one, q, k, v))
        covers.append(kit.counts(one).sum(axis=-1).T[None, :, :, None] > 0)  # (1, N, H, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        average = sum(c * o for c, o in zip(covers, outs)) / sum(c.astype(float) for c in covers)
    if compare(out, np.nan_to_num(average), tol)[0]:
        return " (it averages the branches' outputs instead of weighting them by their softmax denominators, Eq. 10)"
    return ""


def mixture(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §4: branches mixed by their softmax denominators (Eq. 10), a key counted once per
    branch that gives it; a row no branch covers has ``out = 0``."""
    if not branches_right(kit, cfg):
        raise NotApplicable("§2 or §3 fails on this configuration and reports it")
    tol = VALUES[kit.dtype]
    q, k, v = random_inputs(cfg, kit.dtype)
    out = kit.shaped_forward(cfg, q, k, v)
    uncovered = np.broadcast_to((kit.counts(cfg).sum(axis=-1) == 0).T[None, :, :, None], out.shape)  # (B, N, H, Dv)
    bad = uncovered & ~(np.asarray(out) == 0)
    if bad.any():
        b, p, h, _ = (int(i) for i in np.argwhere(bad)[0])
        return Finding(
            f"{cfg}: row p={p} (batch {b}, head {h}) is covered by no branch; SPEC §4 gives out = 0, got {np.asarray(out)[b, p, h].tolist()}",
            float(np.nanmax(np.abs(np.where(bad, out, 0)))) if np.isfinite(np.where(bad, out, 0)).all() else float("inf"),
            "exactly 0",
        )
    for name, (qq, kk, vv) in (("all scores equal", (*equal_scores(kit, cfg), v)), ("random inputs", (q, k, v))):
        out = kit.shaped_forward(cfg, qq, kk, vv)
        ok, error, where = compare(out, kit.expected(cfg, qq, kk, vv), tol)
        if not ok:
            return Finding(
                f"{cfg}, {name}: {_row_text(where)} differs from the mixture of SPEC §4{mixture_diagnosis(kit, cfg, out, qq, kk, vv)}",
                error,
                tolerance_text(tol),
            )
    return None


# -- §5 ----------------------------------------------------------------------------------------


def backward(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §5: the exact gradient, including the mixture weights' dependence on the scores."""
    if kit.backward_fn is None:
        raise NotApplicable("no backward given, and the framework has no autodiff in the kit")
    q, k, v = random_inputs(cfg, kit.dtype)
    rng = np.random.default_rng(cfg.seed + 2)
    dout = kit.in_dtype(rng.standard_normal(expected_shape(cfg)))[0]
    kit.shaped_forward(cfg, q, k, v)
    grads = kit.backward(cfg, dout, q, k, v)
    if [np.shape(g) for g in grads] != [q.shape, k.shape, v.shape]:
        raise NotApplicable("the gradients have the wrong shapes (reported in §6)")
    fd = FINITE_DIFFERENCES[kit.dtype]
    inputs = {"q": q, "k": k, "v": v}
    for (name, x), grad in zip(inputs.items(), grads):
        direction = rng.standard_normal(x.shape)
        plus, minus = kit.in_dtype(x + fd["eps"] * direction, x - fd["eps"] * direction)
        step = np.asarray(plus, np.float64) - np.asarray(minus, np.float64)  # 2 eps direction, as rounded

        def loss(value, name=name):
            args = {**inputs, name: value}
            return float(np.sum(np.asarray(dout, np.float64) * np.asarray(kit.shaped_forward(cfg, args["q"], args["k"], args["v"]), np.float64)))

        differences = loss(plus) - loss(minus)
        predicted = float(np.sum(np.asarray(grad, np.float64) * step))
        if not abs(differences - predicted) <= 2 * fd["eps"] * fd["atol"] + fd["rtol"] * abs(predicted):
            return Finding(
                f"{cfg}: along a random direction of {name}, the backward gives {predicted / (2 * fd['eps']):.6g} and central "
                f"differences of the forward {differences / (2 * fd['eps']):.6g}: the backward is not the derivative of the forward"
                + (" (are the mixture weights treated as constants?)" if name != "v" and len(cfg.segment_lengths) > 1 else ""),
                abs(differences - predicted) / (2 * fd["eps"]),
                tolerance_text({k_: fd[k_] for k_ in ("eps", "rtol", "atol")}),
            )
    out = kit.shaped_forward(cfg, q, k, v)
    if not compare(out, kit.expected(cfg, q, k, v), VALUES[kit.dtype])[0]:
        return None  # the forward is wrong here: its own section reports it
    exact = oracle_gradients(dout, q, k, v, kit.counts(cfg), kit.scale(cfg.head_dim))
    tol = GRADIENTS[kit.dtype]
    for name, grad, want in zip("qkv", grads, exact):
        ok, error, where = compare(grad, want, tol)
        if not ok:
            return Finding(f"{cfg}: d{name} at {_row_text(where)} differs from the exact gradient (SPEC §5)", error, tolerance_text(tol))
    return None


# -- §6 ----------------------------------------------------------------------------------------


def call_contract(kit: Kit, cfg: Config) -> Finding | None:
    """The call contract: the forward leaves its inputs unchanged; the backward returns
    ``(dq, dk, dv)`` shaped like ``q, k, v`` in their dtype."""
    q, k, v = random_inputs(cfg, kit.dtype)
    copies = [x.copy() for x in (q, k, v)]
    kit.forward(cfg, q, k, v)
    for name, x, saved in zip("qkv", (q, k, v), copies):
        if not np.array_equal(x, saved, equal_nan=True):
            return Finding(f"{cfg}: the forward modified its input {name} in place")
    if kit.backward_fn is None:
        return None
    dout = kit.in_dtype(np.random.default_rng(cfg.seed + 2).standard_normal(expected_shape(cfg)))[0]
    grads = kit.backward(cfg, dout, q, k, v)
    for name, grad, x in zip("qkv", grads, (q, k, v)):
        if np.shape(grad) != x.shape:
            return Finding(f"{cfg}: d{name} has shape {np.shape(grad)}; {name} has {x.shape}")
        if np.asarray(grad).dtype != x.dtype:
            return Finding(f"{cfg}: d{name} has dtype {np.asarray(grad).dtype}; {name} has {x.dtype}")
    return None


# -- §7 ----------------------------------------------------------------------------------------


def nan_locality(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §7: a NaN in one key reaches exactly the rows that attend that key."""
    if not branches_right(kit, cfg):
        raise NotApplicable("which rows attend a key is wrong here: §2 or §3 reports it")
    q, k, v = random_inputs(cfg, kit.dtype)
    rng = np.random.default_rng(cfg.seed + 3)
    b0, j, h0 = (int(rng.integers(x)) for x in (cfg.batch, cfg.n, cfg.heads))
    clean = np.asarray(kit.shaped_forward(cfg, q, k, v), np.float64)
    k_nan = k.copy()
    k_nan[b0, j, h0, 0] = np.nan
    dirty = np.asarray(kit.shaped_forward(cfg, q, k_nan, v), np.float64)
    attends = np.zeros(clean.shape[:3], dtype=bool)  # (B, N, H)
    attends[b0, :, h0] = kit.counts(cfg)[h0, :, j] > 0
    reached = ~np.isfinite(dirty).all(axis=-1)
    where = f"a NaN in key {j} (batch {b0}, head {h0})"
    missed = attends & ~reached
    if missed.any():
        b, p, h = (int(i) for i in np.argwhere(missed)[0])
        return Finding(f"{cfg}: {where} did not reach row p={p}, which attends it (SPEC §7: as in dense attention)", float("nan"), "non-finite")
    spread = ~attends & reached
    if spread.any():
        b, p, h = (int(i) for i in np.argwhere(spread)[0])
        return Finding(f"{cfg}: {where} reached row p={p} (batch {b}, head {h}), which does not attend it", float("inf"), "finite, unchanged")
    tol = VALUES[kit.dtype]
    ok, error, rows = compare(np.where(attends[..., None], 0, dirty), np.where(attends[..., None], 0, clean), tol)
    if not ok:
        return Finding(f"{cfg}: {where} changed {_row_text(rows)}, which does not attend it", error, tolerance_text(tol))
    return None


# -- §8 ----------------------------------------------------------------------------------------


def torchscale_agrees(cfg: Config) -> bool:
    """SPEC §8: torchscale and the spec agree unless a non-causal segment is padded (row 2) or
    ``w % r != 0`` with ``N > w`` (row 4)."""
    for w, r in zip(cfg.segment_lengths, cfg.dilation_rates):
        segment = min(w, cfg.n)
        if not cfg.causal and (cfg.n % segment != 0 or segment % r != 0):
            return False
        if w % r != 0 and cfg.n > w:
            return False
    return True


def torchscale_compatibility(kit: Kit, cfg: Config) -> Finding | None:
    """SPEC §8 (``offsets="torchscale"``): where torchscale agrees with the spec, so must the implementation."""
    if kit.offsets != "torchscale":
        raise NotApplicable('only with offsets="torchscale"')
    if not torchscale_agrees(cfg):
        raise NotApplicable("a configuration where torchscale differs from the spec (SPEC §8 rows 2, 4)")
    q, k, v = random_inputs(cfg, kit.dtype)
    out = kit.shaped_forward(cfg, q, k, v)
    tol = VALUES[kit.dtype]
    ok, error, where = compare(out, kit.expected(cfg, q, k, v), tol)
    if ok:
        return None
    return Finding(f"{cfg}: {_row_text(where)} differs from the spec where SPEC §8 says torchscale agrees with it", error, tolerance_text(tol))


SECTIONS = {
    "§1": ("Tensors and layout: shape, dtype, scale 1/sqrt(D)", tensors_and_layout),
    "§2": ("Branches, segments, dilation, offsets", index_sets),
    "§3": ("One branch: causality, ragged segments", one_branch),
    "§4": ("The mixture (Eq. 10), uncovered rows", mixture),
    "§5": ("Backward: the exact gradient", backward),
    "§6": ("Call contract", call_contract),
    "§7": ("NaN/Inf locality", nan_locality),
    "§8": ("torchscale compatibility", torchscale_compatibility),
}
"""Section number -> (title, probe), in the order of ``docs/spec.md``."""
