"""``check``: run every section's probe on configurations Hypothesis draws, shrink each failure."""

from __future__ import annotations

import random
from typing import Any, Callable

from hypothesis import HealthCheck, find, settings
from hypothesis.errors import NoSuchExample, Unsatisfiable

from ..validation import InputTypeError, check_flag, validate_offset_rule
from .adapters import FRAMEWORKS, adapt
from .configs import Domain, classic_configs, search_space
from .properties import SECTIONS, ImplementationError, Kit, NotApplicable, measure_scale
from .report import Failure, Report, SectionResult

DTYPES = ("float32", "float64")


def _run_probe(probe, kit, cfg, seen):
    """``Finding`` or ``None``; counts the configurations the probe ran on in ``seen``."""
    try:
        finding = probe(kit, cfg)
    except NotApplicable as reason:
        seen["note"] = str(reason)
        return None
    except ImplementationError as error:
        from .properties import Finding

        seen["ran"] += 1
        return Finding(f"{cfg}: {error}")
    seen["ran"] += 1
    return finding


def _check_options(forward, backward, offsets, causal, dtype, max_examples, seed, framework):
    if not callable(forward):
        raise InputTypeError(f"forward must be callable, got {type(forward).__name__}")
    if backward is not None and not callable(backward):
        raise InputTypeError(f"backward must be callable or None, got {type(backward).__name__}")
    validate_offset_rule(offsets)
    if causal is not None:
        check_flag(causal, "causal")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer, got {max_examples!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputTypeError(f"seed must be an integer or None, got {seed!r}")
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")


def check(
    forward: Callable,
    backward: Callable | None = None,
    *,
    offsets: str = "paper",
    causal: bool | None = None,
    dtype: str = "float64",
    max_examples: int = 100,
    seed: int | None = None,
    domain: Any = None,
    framework: str = "numpy",
) -> Report:
    """Check an implementation of dilated attention against the specification, section by section.

    Args:
        forward: ``forward(q, k, v, segment_lengths, dilation_rates, *, causal) -> out``, with
            ``q, k (B, N, H, D)``, ``v (B, N, H, Dv)`` and ``out (B, N, H, Dv)`` arrays of ``framework``.
        backward: ``backward(dout, q, k, v, segment_lengths, dilation_rates, *, causal) -> (dq, dk, dv)``;
            when ``None``, PyTorch's autograd or ``jax.vjp`` stands in for it, and §5 is not
            applicable with NumPy or CuPy.
        offsets: the head-offset rule the implementation claims, ``"paper"`` or ``"torchscale"`` (SPEC §2).
        causal: check ``causal=False`` and ``True`` (``None``), or only the one given.
        dtype: the inputs' dtype, ``"float32"`` or ``"float64"``; tolerances follow it.
        max_examples: configurations Hypothesis draws per section (before shrinking a failure).
        seed: makes the run reproducible; drawn at random when ``None`` and reported.
        domain: what the implementation supports: ``None`` (everything), a predicate on a
            [`Config`][longnet_ref.conformance.configs.Config], flags from
            [`DOMAIN_FLAGS`][longnet_ref.conformance.configs.DOMAIN_FLAGS] and ``"max_n=K"``, or a
            list of them. Outside it a case is not applicable; inside it an exception is a failure.
        framework: ``"numpy"``, ``"torch"``, ``"jax"``, ``"cupy"`` or ``"array-api-strict"``;
            imported only when named.

    Returns:
        A [`Report`][longnet_ref.conformance.report.Report]: ``.ok``, ``.sections``, ``.failures``.

    Raises:
        ValueError: a bad option (``InputTypeError``, a ``TypeError`` too, for a wrong type),
            checked before anything runs; ``ImportError`` if ``framework`` is not installed.
    """
    _check_options(forward, backward, offsets, causal, dtype, max_examples, seed, framework)
    domain = domain if isinstance(domain, Domain) else Domain(domain)
    causal_choices = domain.causal_choices(causal)
    if not causal_choices:
        raise ValueError(f"causal={causal!r} is outside the declared domain")
    seed = random.randrange(2**32) if seed is None else seed
    adapted = adapt(forward, backward, framework)
    kit = Kit(adapted.forward, adapted.backward, domain, offsets, dtype, causal_choices)
    measured = measure_scale(kit)
    kit.scale_rule = measured or "1/sqrt(D)"
    strategy = search_space(domain, causal_choices)
    classics = classic_configs(domain, causal_choices)
    options = settings(max_examples=max_examples, database=None, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
    results, failures = [], []
    for index, (section, (title, probe)) in enumerate(SECTIONS.items()):
        seen = {"ran": 0, "note": ""}
        try:
            minimal = find(strategy, lambda cfg: _run_probe(probe, kit, cfg, seen) is not None, settings=options, random=random.Random(seed + index))
        except Unsatisfiable:
            results.append(SectionResult(section, title, "n/a", 0, "no drawn configuration is in the declared domain"))
            continue
        except NoSuchExample:
            # the search may not have met every classic configuration: try each of them too
            minimal = next((cfg for cfg in classics if _run_probe(probe, kit, cfg, seen) is not None), None)
            if minimal is None:
                status = "pass" if seen["ran"] else "n/a"
                results.append(SectionResult(section, title, status, seen["ran"], seen["note"] if status == "n/a" else ""))
                continue
        finding = _run_probe(probe, kit, minimal, {"ran": 0, "note": ""})
        results.append(SectionResult(section, title, "fail", seen["ran"]))
        failures.append(Failure(section, minimal.as_dict(), finding.max_error, finding.tolerance, finding.message))
    settings_used = {
        "offsets": offsets,
        "causal": "both" if causal is None else causal,
        "dtype": dtype,
        "framework": framework,
        "gradient": adapted.gradient_source,
        "max_examples": max_examples,
        "seed": seed,
        "scale measured": measured or "none of 1/sqrt(D), 1/D, 1",
    }
    return Report(results, failures, settings_used)
