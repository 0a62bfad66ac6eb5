"""The documentation's figures, drawn from the library itself: ``longnet-ref pattern``.

Every picture is computed by the same functions the tests check (``config``,
``multiplicity``, ``complexity``), so the docs cannot show a pattern the code does not use.
The docs build (``docs/hooks.py``) fails if one of ``FIGURES`` is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import complexity
from .config import head_offsets, segment_rows, validate_branches
from .multiplicity import multiplicity

FIGURES = ("selected_rows.png", "pattern.png", "pattern_causal.png", "multiplicity.png", "flops.png", "path_length.png")

# The paper's Figures 2-3 in miniature: N = 32, three geometric branches, four heads.
N, HEADS, SEGMENT_LENGTHS, DILATION_RATES = 32, 4, (8, 16, 32), (1, 2, 4)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def selected_rows(path, offsets="paper"):
    """Which rows each head keeps in each branch (SPEC §2): one strip per (branch, head)."""
    plt = _pyplot()
    branches = validate_branches(SEGMENT_LENGTHS, DILATION_RATES)
    fig, axes = plt.subplots(len(branches), 1, figsize=(9, 1.1 * HEADS * len(branches) / 2.2), sharex=True)
    for ax, branch in zip(axes, branches):
        picture = np.zeros((HEADS, N))
        for h, o in enumerate(head_offsets(HEADS, branch.dilation, offsets)):
            positions, valid = segment_rows(N, branch.segment_length, branch.dilation, int(o))
            picture[h, positions[valid]] = 1 + h % 4
        ax.imshow(np.where(picture > 0, picture, np.nan), cmap="tab10", vmin=0, vmax=10, aspect="auto", interpolation="nearest")
        for start in range(0, N + 1, branch.segment_length):
            ax.axvline(start - 0.5, color="black", linewidth=1.5)
        ax.set_yticks(range(HEADS), [f"head {h}" for h in range(HEADS)], fontsize=7)
        ax.set_title(f"w = {branch.segment_length}, r = {branch.dilation}  (offset h mod r)", fontsize=9)
        ax.set_xticks(range(0, N, 4))
        ax.grid(False)
    axes[-1].set_xlabel("position in the sequence (black lines: segment boundaries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pattern(path, causal=False):
    """The attention pattern ``K_i(p)`` of every branch (rows) and head (columns), like paper Figs. 2-3."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(SEGMENT_LENGTHS), HEADS, figsize=(2.2 * HEADS, 2.3 * len(SEGMENT_LENGTHS)))
    for i, (w, r) in enumerate(zip(SEGMENT_LENGTHS, DILATION_RATES)):
        counts = multiplicity(N, HEADS, [w], [r], causal=causal)  # (H, N, N), 0/1 for one branch
        for h in range(HEADS):
            ax = axes[i, h]
            ax.imshow(counts[h], cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"w={w}, r={r}\nquery", fontsize=8)
    fig.suptitle(f"{'causal ' if causal else ''}dilated attention, N = {N}: query rows x key columns", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def multiplicity_map(path):
    """The multiplicity ``m_h(p, k)`` of the mixture: keys counted once per branch that sees them."""
    plt = _pyplot()
    counts = multiplicity(N, HEADS, SEGMENT_LENGTHS, DILATION_RATES)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for h, ax in enumerate(axes):
        image = ax.imshow(counts[h], cmap="viridis", vmin=0, vmax=len(SEGMENT_LENGTHS), interpolation="nearest")
        ax.set_title(f"head {h}: m(p, k)", fontsize=10)
        ax.set_xlabel("key k")
        ax.set_ylabel("query p")
    fig.colorbar(image, ax=axes, ticks=range(len(SEGMENT_LENGTHS) + 1), shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def flops_vs_n(path):
    """Exact forward FLOPs of a fixed geometric configuration vs dense attention (log-log)."""
    plt = _pyplot()
    w, r, heads, dim = [2048, 4096, 8192, 16384], [1, 2, 4, 8], 8, 64
    ns = [2**e for e in range(14, 25)]
    dilated = [complexity.dilated_flops(n, heads, dim, w, r).total for n in ns]
    dense = [complexity.dense_flops(n, heads, dim).total for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.loglog(ns, dense, "s-", base=2, label="dense attention: 4 N^2 H D")
    ax.loglog(ns, dilated, "o-", base=2, label=f"dilated, w={w}, r={r}")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward FLOPs (QK^T + PV)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def path_length_vs_n(path, first_segment_length=64, ratio=2, heads=4):
    """Measured layers to link every pair of tokens vs paper Eq. 20 (geometric w and r)."""
    plt = _pyplot()
    ns = [2**e for e in range(8, 15)]
    measured, first_to_last = [], []
    for n in ns:
        w, r = complexity.geometric_configuration(n, first_segment_length, ratio)
        measured.append(complexity.path_length(n, heads, w, r))
        first_to_last.append(complexity.path_length(n, heads, w, r, source=0))
    predicted = [complexity.predicted_path_length(n, first_segment_length, ratio) for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(ns, predicted, "k--", base=2, label="paper Eq. 20: log_a(N (a-1) / w0)")
    ax.semilogx(ns, measured, "o-", base=2, label="measured: every token reaches every token")
    ax.semilogx(ns, first_to_last, "s-", base=2, label="measured: token 0 reaches token N-1")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("layers")
    ax.set_title(f"w0 = {first_segment_length}, a = {ratio}, {heads} heads", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def generate(output_dir) -> list[Path]:
    """Draw every figure of ``FIGURES`` into ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    makers = dict(zip(FIGURES, (
        selected_rows, pattern, lambda p: pattern(p, causal=True), multiplicity_map, flops_vs_n, path_length_vs_n,
    )))
    for name, make in makers.items():
        make(output_dir / name)
    return [output_dir / name for name in FIGURES]


# --- Decoding with a bounded cache (docs/decoding.md) ----------------------------------------


def decode_cache(path, position=26):
    """Which rows the bounded KV cache holds after decoding positions ``0..t`` (``longnet_ref.decode``).

    One strip per (branch, head), like :func:`selected_rows`: grey marks every row the head
    selects up to ``t``, colour the rows the cache still holds (its current segment's rows); all
    grey rows left of a segment boundary were dropped when the segment ended.
    """
    from matplotlib.colors import ListedColormap

    from .decode import DilatedKVCache

    plt = _pyplot()
    colours = ListedColormap(["#d0d0d0", "tab:blue", "tab:orange", "tab:green", "tab:red"])  # 0: dropped
    cache = DilatedKVCache(1, HEADS, 1, 1, SEGMENT_LENGTHS, DILATION_RATES)
    keys = np.zeros((1, position + 1, HEADS, 1))  # (B, t+1, H, D): only the positions matter here
    cache.fill(keys, keys)
    held = cache.held_positions()
    branches = validate_branches(SEGMENT_LENGTHS, DILATION_RATES)
    fig, axes = plt.subplots(len(branches), 1, figsize=(9, 1.1 * HEADS * len(branches) / 2.2), sharex=True)
    for i, (ax, branch) in enumerate(zip(axes, branches)):
        picture = np.full((HEADS, N), np.nan)
        for h, o in enumerate(head_offsets(HEADS, branch.dilation)):
            positions, valid = segment_rows(position + 1, branch.segment_length, branch.dilation, int(o))
            picture[h, positions[valid]] = 0  # selected so far
            picture[h, held[i][h]] = 1 + h % 4  # still in the cache
        ax.imshow(picture, cmap=colours, vmin=-0.5, vmax=4.5, aspect="auto", interpolation="nearest")
        for start in range(0, N + 1, branch.segment_length):
            ax.axvline(start - 0.5, color="black", linewidth=1.5)
        ax.axvline(position + 0.5, color="red", linewidth=1.5, linestyle="--")
        ax.set_yticks(range(HEADS), [f"head {h}" for h in range(HEADS)], fontsize=7)
        ax.set_title(
            f"w = {branch.segment_length}, r = {branch.dilation}: at most ceil(w/r) = {cache.rows[i]} rows per head",
            fontsize=9,
        )
        ax.set_xticks(range(0, N, 4))
        ax.grid(False)
    axes[-1].set_xlabel(f"position (colour: held in the cache after t = {position}; grey: selected, dropped; red: t)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = FIGURES + ("decode_cache.png",)
_generate_before_decode_cache = generate


def generate(output_dir) -> list[Path]:  # extends the generate above by one figure
    """Draw every figure of ``FIGURES`` into ``output_dir``."""
    paths = _generate_before_decode_cache(output_dir)  # draws the figures before this one
    decode_cache(Path(output_dir) / "decode_cache.png")
    return paths
