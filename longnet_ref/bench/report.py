"""The benchmark's outputs: the printed tables, ``results.json`` and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from .presets import WeakScaling
    from .timing import Result


def _ratio(numerator, denominator):
    return f"{numerator / denominator:7.1f}x" if numerator else "      --"


def _vs_reference(result):
    """The interleaved median speed-up over the NumPy reference (spread in the footer's JSON)."""
    if "vs_reference" in result.extra:
        return f"{result.extra['vs_reference'][0]:7.1f}x"
    return _ratio(result.reference_forward_backward_s, result.forward_backward_s)


def format_spreads(results: Sequence[Result]) -> str:
    """``configuration: median (min-max)`` of the per-repeat speed-ups over the NumPy reference."""
    spreads = [
        f"{r.config.name}: {r.extra['vs_reference'][0]:.1f}x ({r.extra['vs_reference'][1]:.1f}-{r.extra['vs_reference'][2]:.1f})"
        for r in results
        if "vs_reference" in r.extra
    ]
    return ("vs numpy per repeat, median (min-max): " + "; ".join(spreads)) if spreads else ""


def format_table(results: Sequence[Result]) -> str:
    """One line per configuration: times, GFLOP/s, fraction of GEMM, speed-ups, peak memory.

        %GEMM = (FLOPs / time) / GEMM rate,   vs X = time of X / time of this backend

    Args:
        results: The measurements, as returned by [`run`][longnet_ref.bench.run].

    Returns:
        The table with a header, a rule and two lines of legend, joined by newlines; a ratio
        not measured prints ``--``, a memory not measured prints blank.
    """
    header = (
        f"{'configuration':28s} {'fwd s':>8s} {'GF/s':>6s} {'%GEMM':>6s} {'fwd+bwd s':>10s} {'GF/s':>6s} {'%GEMM':>6s}"
        f" {'us/token':>9s} {'vs numpy':>9s} {'vs dense':>9s} {'GEMM GF/s':>10s} {'peak mem':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.config.name:28s} {r.forward_s:8.3f} {r.forward_gflops:6.1f} {r.forward_fraction:6.1%}"
            f" {r.forward_backward_s:10.3f} {r.forward_backward_gflops:6.1f} {r.forward_backward_fraction:6.1%}"
            f" {r.forward_backward_s / r.config.n * 1e6:9.2f}"
            f" {_vs_reference(r):>9s}"
            f" {_ratio(r.dense_forward_backward_s, r.forward_backward_s):>9s}"
            f" {r.gemm_gflops:10.1f} {'' if r.peak_memory_ratio is None else f'{r.peak_memory_ratio:8.2f}x':>9s}"
        )
    lines.append("%GEMM: median over repeats of GFLOP/s / the GEMM rate measured just before each repeat (GEMM GF/s: median).")
    lines.append("vs numpy / vs dense: forward+backward speed-up over the NumPy reference / dense attention, same run;")
    lines.append("vs numpy (numba): both sides alternate repeat by repeat with the same thread count.")
    spreads = format_spreads(results)
    return "\n".join(lines + ([spreads] if spreads else []))


def save(results: Sequence[Result], output_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``results.json`` and, if matplotlib is installed, ``throughput.png`` and ``scaling.png``.

    ``scaling.png`` (time per token against ``N``) is drawn only when the results span more than
    one ``N``.

    Args:
        results: The measurements, as returned by [`run`][longnet_ref.bench.run].
        output_dir: The directory to write to; created (with parents) if missing.

    Returns:
        The paths written, ``results.json`` first.

    Raises:
        OSError: ``output_dir`` cannot be created or written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json"]
    written[0].write_text(json.dumps([r.as_dict() for r in results], indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r.config.name for r in results]
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r.forward_fraction for r in results], 0.4, label="forward")
    ax.bar(x + 0.2, [r.forward_backward_fraction for r in results], 0.4, label="forward+backward")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of this run's GEMM rate")
    ax.legend()
    fig.tight_layout()
    written.append(output_dir / "throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if len({r.config.n for r in results}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r.config.n for r in results]
        ax.semilogx(ns, [r.forward_s / r.config.n * 1e6 for r in results], "o-", base=2, label="forward")
        ax.semilogx(ns, [r.forward_backward_s / r.config.n * 1e6 for r in results], "s-", base=2, label="forward+backward")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time per token [us]")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        written.append(output_dir / "scaling.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def format_weak_scaling(rows: Sequence[dict], setup: WeakScaling, itemsize: int = 4) -> str:
    """The weak-scaling table of [`weak_scaling`][longnet_ref.bench.weak_scaling.weak_scaling] for ``setup``, with the predicted bytes.

        bytes per rank = sum over shared branches of B H (w - L) / r (D + Dv) itemsize

    the formula of the [`distributed`][longnet_ref.distributed] module's docstring (``B = 1``,
    ``D = Dv``), which depends on ``w / r`` but not on ``N``.

    Args:
        rows: One dict per rank count, as returned by [`weak_scaling`][longnet_ref.bench.weak_scaling.weak_scaling]
            (``ranks``, ``n``, ``forward_s``, ``forward_backward_s``, ``bytes_per_rank``).
        setup: The [`WeakScaling`][longnet_ref.bench.WeakScaling] the rows were measured with.
        itemsize: Bytes per element for the formula: 4 for float32, 8 for float64.

    Returns:
        The table, one line per row, then the formula's prediction (if a branch is shared) and
        a note on oversubscribed cores, joined by newlines.

    Raises:
        KeyError: A row lacks one of the fields above.
    """
    w, r, heads, dim = setup.segment_lengths, setup.dilation_rates, setup.heads, setup.dim
    lines = [
        (
            f"weak scaling: N = P x {setup.n_per_rank}, w = {list(w)}, r = {list(r)}, H = {heads}, D = {dim},"
            f" backend = {setup.backend}, median of {setup.repeats}"
        ),
        f"{'P':>3s} {'N':>8s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'fwd recv B/rank (max)':>22s} {'bwd moved B/rank (max)':>23s}",
    ]
    for row in rows:
        received = max(b[0] for b in row["bytes_per_rank"])
        backward = max(b[1] for b in row["bytes_per_rank"])
        lines.append(f"{row['ranks']:3d} {row['n']:8d} {row['forward_s']:8.3f} {row['forward_backward_s']:10.3f} {received:22,d} {backward:23,d}")
    chunk = setup.n_per_rank  # L = N / P
    shared = [(w_i, r_i) for w_i, r_i in zip(w, r) if w_i > chunk]
    if shared:
        formula = sum(heads * (w_i - chunk) // r_i * 2 * dim * itemsize for w_i, r_i in shared)
        lines.append(
            f"paper's claim: bytes per rank depend on w/r, not N. Docstring formula B H (w - L)/r (D + Dv) itemsize = {formula:,d} for every P >= w / L."
        )
    lines.append("time: with more ranks than cores, ranks share cores, so time per rank grows with P there.")
    return "\n".join(lines)
