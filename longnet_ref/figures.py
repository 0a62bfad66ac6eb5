"""The documentation's figures, drawn from the library itself: ``longnet-ref pattern``.

Every picture is computed by the same functions the tests check (``config``,
``multiplicity``, ``complexity``), so the docs cannot show a pattern the code does not use.
The docs build (``docs/hooks.py``) fails if one of ``FIGURES`` is missing, and
``tests/test_docs.py`` checks that every figure a page shows is one of ``FIGURES``.

Each function below draws one figure into ``path`` (a PNG file) and returns nothing;
[`generate`][longnet_ref.figures.generate] draws them all. Docs: ``docs/overview.md`` (the overview figure),
``docs/segments.md``, ``docs/mixture.md``, ``docs/complexity.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import complexity
from .index_sets import head_offsets, segment_rows
from .validation import validate_branches
from .multiplicity import multiplicity

FIGURES = (
    "overview.png", "selected_rows.png", "pattern.png", "pattern_causal.png", "multiplicity.png", "flops.png",
    "path_length.png", "distributed.png", "decode_cache.png", "tensor_core_tiles.png",
)

# Figures of experiments (training runs, benchmarks): too slow for ``longnet-ref pattern``, so each
# is drawn by the command beside it, from logs committed under ``benchmarks/results/``; the docs
# build checks that they exist, like the figures above.
EXPERIMENT_FIGURES = {
    "model_passkey.png": "python benchmarks/model_figures.py passkey --plot-only --runs benchmarks/results/model-runs",
    "model_text_loss.png": "python benchmarks/model_figures.py text --plot-only --runs benchmarks/results/model-runs",
    "model_step_time.png": "python benchmarks/train_bench.py --numba-threads 1 --plot docs/figures/model_step_time.png",
}

# The paper's Figures 2-3 in miniature: N = 32, three geometric branches, four heads.
N, HEADS, SEGMENT_LENGTHS, DILATION_RATES = 32, 4, (8, 16, 32), (1, 2, 4)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_ticks(ax, n, step):
    """Tick labels every ``step`` positions on both axes of an ``n x n`` (query, key) picture."""
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=7)


# One colour per branch (overview) and per head: the paper's Figures 2-3 use colour the same way.
BRANCH_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
HEAD_COLOURS = ("#d62728", "#2ca02c", "#1f77b4", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def overview(path: str | Path) -> None:
    """Dilated attention in one picture, in the spirit of the paper's Figures 2 and 3.

    Top row (Fig. 2): ``N = 16``, head 0, the branches ``(w, r) = (4, 1), (8, 2), (16, 4)`` one by
    one, then all three together, coloured by branch (a key two branches share shows the colour
    of the last one and is counted twice, see ``multiplicity``). Bottom row (Fig. 3): the
    ``(16, 4)`` branch for heads 0-3, whose offsets ``h mod 4`` differ, then the four together:
    every row is covered by exactly one head.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.colors import to_rgba

    plt = _pyplot()
    n, heads, lengths, rates = 16, 4, (4, 8, 16), (1, 2, 4)
    fig, axes = plt.subplots(2, 4, figsize=(11, 6.4))

    def show(ax, masks_and_colours, title):
        picture = np.ones((n, n, 4))  # white RGBA
        for mask, colour in masks_and_colours:
            picture[mask] = to_rgba(colour)
        ax.imshow(picture, interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="#dddddd", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
        _grid_ticks(ax, n, 4)
        ax.set_title(title, fontsize=9)

    per_branch = [multiplicity(n, heads, [w], [r])[0] > 0 for w, r in zip(lengths, rates)]  # head 0, (N, N)
    for i, (w, r) in enumerate(zip(lengths, rates)):
        show(axes[0, i], [(per_branch[i], BRANCH_COLOURS[i])], f"branch {i}: w = {w}, r = {r} (head 0)")
    show(axes[0, 3], [(m, BRANCH_COLOURS[i]) for i, m in enumerate(per_branch)], "all three branches (head 0)")

    w, r = lengths[-1], rates[-1]
    per_head = multiplicity(n, heads, [w], [r]) > 0  # (H, N, N), one branch
    for h in range(3):
        show(axes[1, h], [(per_head[h], HEAD_COLOURS[h])], f"w = {w}, r = {r}: head {h}, offset {h % r}")
    show(axes[1, 3], [(per_head[h], HEAD_COLOURS[h]) for h in range(heads)], f"w = {w}, r = {r}: heads 0-3 together")
    for ax in axes[:, 0]:
        ax.set_ylabel("query p", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("key k", fontsize=8)
    fig.suptitle("Dilated attention, N = 16: segments and dilation (top), per-head offsets (bottom)", fontsize=10)
    fig.tight_layout(h_pad=2.0)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def selected_rows(path: str | Path, offsets: str = "paper") -> None:
    """Which rows each head keeps in each branch (SPEC §2): one strip per (branch, head).

    ``N = 32``, four heads, ``(w, r) = (8, 1), (16, 2), (32, 4)``; ``offsets`` is the rule of
    ``index_sets.head_offsets``.

    Args:
        path: the PNG file to write.
        offsets: ``"paper"`` or ``"torchscale"``.
    """
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
        rule = "h mod r" if offsets == "paper" else "torchscale blocks"
        ax.set_title(f"w = {branch.segment_length}, r = {branch.dilation}  (offset: {rule})", fontsize=9)
        ax.set_xticks(range(0, N, 4))
        ax.grid(False)
    axes[-1].set_xlabel("position in the sequence (black lines: segment boundaries)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pattern(path: str | Path, causal: bool = False) -> None:
    """The attention pattern ``K_i(p)`` of every branch (rows) and head (columns), like paper Figs. 2-3.

    ``N = 32``, four heads, ``(w, r) = (8, 1), (16, 2), (32, 4)``; a filled cell ``(p, k)`` is a
    key ``k`` that query ``p`` attends in that branch and head.

    Args:
        path: the PNG file to write.
        causal: draw the causal patterns (keys ``k <= p``).
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(SEGMENT_LENGTHS), HEADS, figsize=(2.2 * HEADS, 2.3 * len(SEGMENT_LENGTHS)))
    for i, (w, r) in enumerate(zip(SEGMENT_LENGTHS, DILATION_RATES)):
        counts = multiplicity(N, HEADS, [w], [r], causal=causal)  # (H, N, N), 0/1 for one branch
        for h in range(HEADS):
            ax = axes[i, h]
            ax.imshow(counts[h], cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
            _grid_ticks(ax, N, 8)
            if i == 0:
                ax.set_title(f"head {h} (offsets {', '.join(str(h % r_) for r_ in DILATION_RATES)})", fontsize=8)
            if h == 0:
                ax.set_ylabel(f"w={w}, r={r}\nquery p", fontsize=8)
            if i == len(SEGMENT_LENGTHS) - 1:
                ax.set_xlabel("key k", fontsize=8)
    fig.suptitle(f"{'causal ' if causal else ''}dilated attention, N = {N}: query rows x key columns", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def multiplicity_map(path: str | Path) -> None:
    """The multiplicity ``m_h(p, k)`` of the mixture: keys counted once per branch that sees them.

    ``N = 32``, heads 0 and 1 of four, ``(w, r) = (8, 1), (16, 2), (32, 4)``; one discrete colour
    per value 0..3.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap

    plt = _pyplot()
    counts = multiplicity(N, HEADS, SEGMENT_LENGTHS, DILATION_RATES)
    values = len(SEGMENT_LENGTHS) + 1  # m = 0 .. number of branches
    colours = ListedColormap(["#ffffff", "#9ecae1", "#3182bd", "#08306b", "#000000"][:values])
    norm = BoundaryNorm(np.arange(values + 1) - 0.5, values)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4.1))
    for h, ax in enumerate(axes):
        image = ax.imshow(counts[h], cmap=colours, norm=norm, interpolation="nearest")
        ax.set_title(f"head {h}: m(p, k)", fontsize=10)
        _grid_ticks(ax, N, 8)
        ax.set_xlabel("key k")
        ax.set_ylabel("query p")
    fig.suptitle(f"N = {N}, H = {HEADS}, w = {list(SEGMENT_LENGTHS)}, r = {list(DILATION_RATES)}, offsets h mod r", fontsize=9)
    bar = fig.colorbar(image, ax=axes, ticks=range(values), shrink=0.8)
    bar.set_label("branches linking p to k")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def flops_vs_n(path: str | Path) -> None:
    """Exact forward FLOPs of a fixed geometric configuration vs dense attention (log-log).

    ``H = 8``, ``D = Dv = 64``, ``w = (2048, ..., 16384)``, ``r = (1, 2, 4, 8)``, non-causal; the
    closed form (paper Eq. 17, doubled for ``P V``) is drawn over the exact count.

    Args:
        path: the PNG file to write.
    """
    plt = _pyplot()
    w, r, heads, dim = [2048, 4096, 8192, 16384], [1, 2, 4, 8], 8, 64
    ns = [2**e for e in range(14, 25)]
    dilated = [complexity.dilated_flops(n, heads, dim, w, r).total for n in ns]
    closed = [2 * complexity.closed_form_flops(n, dim, w, r, num_heads=heads) for n in ns]  # QK^T + PV, Dv = D
    dense = [complexity.dense_flops(n, heads, dim).total for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.loglog(ns, dense, "s-", base=2, label="dense attention: 4 N² H D")
    ax.loglog(ns, dilated, "o-", base=2, label=f"dilated, exact count: w={w}, r={r}")
    ax.loglog(ns, closed, "k--", base=2, label="closed form 4 N H D Σ w/r² (Eq. 17)")
    ax.set_title(f"H = {heads} heads, D = Dv = {dim}, non-causal", fontsize=9)
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("forward FLOPs (QK^T + PV)")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def path_length_vs_n(path: str | Path, first_segment_length: int = 64, ratio: int = 2, heads: int = 4) -> None:
    """Measured layers to link every pair of tokens vs paper Eq. 20 (geometric w and r).

    ``w_i = w_0 alpha^i``, ``r_i = alpha^i`` up to ``w >= N``, for ``N = 2^8 .. 2^14``, non-causal.

    Args:
        path: the PNG file to write.
        first_segment_length: ``w_0``.
        ratio: ``alpha``.
        heads: ``H``.
    """
    plt = _pyplot()
    ns = [2**e for e in range(8, 15)]
    measured, first_to_last = [], []
    for n in ns:
        w, r = complexity.geometric_configuration(n, first_segment_length, ratio)
        measured.append(complexity.path_length(n, heads, w, r))
        first_to_last.append(complexity.path_length(n, heads, w, r, source=0))
    predicted = [complexity.predicted_path_length(n, first_segment_length, ratio) for n in ns]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(ns, predicted, "k--", base=2, label=r"paper Eq. 20: $\log_\alpha(N(\alpha-1)/w_0)$")
    ax.semilogx(ns, measured, "o-", base=2, label="measured: every token reaches every token")
    ax.semilogx(ns, first_to_last, "s-", base=2, label="measured: token 0 reaches token N-1")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("layers")
    ax.set_title(rf"$w_0$ = {first_segment_length}, $\alpha$ = {ratio}, H = {heads} heads, non-causal", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distributed_branch(path: str | Path) -> None:
    """Sequence parallelism of one shared branch (paper §3.1, Fig. 4; ``docs/distributed.md``).

    ``N = 32`` over ``G = 4`` ranks of ``L = 8`` rows; the branch ``(w, r) = (16, 2)``, head 0
    (offset 0): each segment spans ``M = 2`` ranks. Each rank sparsifies its own rows first and
    the two ranks of a segment all-gather only those ``L / r = 4`` rows of ``K, V`` (forward); the
    backward sends the partial ``dK, dV`` of the other rank's rows back (reduce-scatter).

    Args:
        path: the PNG file to write.
    """
    from matplotlib.patches import FancyArrowPatch, Rectangle

    plt = _pyplot()
    n, ranks, w, r = 32, 4, 16, 2
    rows_per_rank = n // ranks
    positions, valid = segment_rows(n, w, r, 0)
    sparse = set(int(x) for x in positions[valid])
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for x in range(n):
        rank = x // rows_per_rank
        colour = HEAD_COLOURS[rank % len(HEAD_COLOURS)] if x in sparse else "#f0f0f0"
        ax.add_patch(Rectangle((x, 0), 0.9, 0.9, facecolor=colour, edgecolor="#999999", linewidth=0.5))
        if x % 4 == 0:
            ax.text(x + 0.45, -0.35, str(x), ha="center", va="top", fontsize=7)
    for rank in range(ranks):
        start = rank * rows_per_rank
        ax.text(start + rows_per_rank / 2 - 0.05, 1.25, f"rank g = {rank}\nrows {start}..{start + rows_per_rank - 1}",
                ha="center", va="bottom", fontsize=8)
        ax.plot([start - 0.05, start - 0.05], [-0.1, 1.0], color="black", linewidth=0.8, linestyle=":")
    for segment in range(n // w):
        left, right = segment * w - 0.05, (segment + 1) * w - 0.15
        ax.plot([left, left, right, right], [-0.9, -1.1, -1.1, -0.9], color="black", linewidth=1.2)
        ax.text((left + right) / 2, -1.25, f"segment s = {segment} of w = {w}: ranks {2 * segment} and {2 * segment + 1}",
                ha="center", va="top", fontsize=8)
        a, b = (2 * segment + 0.5) * rows_per_rank, (2 * segment + 1.5) * rows_per_rank
        ax.add_patch(FancyArrowPatch((a, 2.4), (b, 2.4), arrowstyle="<|-|>", mutation_scale=12, color="black",
                                     connectionstyle="arc3,rad=-0.25"))
        ax.text((a + b) / 2, 3.35, "forward: all-gather the sparse rows of K, V\nbackward: reduce-scatter dK, dV",
                ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-1, n + 0.5)
    ax.set_ylim(-2.2, 4.6)
    ax.axis("off")
    ax.set_title(f"N = {n}, G = {ranks} ranks of L = {rows_per_rank} rows, branch (w, r) = ({w}, {r}), head 0: "
                 f"coloured rows are sent (L / r = {rows_per_rank // r} per rank), grey rows never leave their rank",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def generate(output_dir: str | Path) -> list[Path]:
    """Draw every figure of ``FIGURES`` into ``output_dir`` (created if missing).

    Args:
        output_dir: the folder to write into; ``docs/figures`` for the site.

    Returns:
        The paths written, in the order of ``FIGURES``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    makers = dict(zip(FIGURES, (
        overview, selected_rows, pattern, lambda p: pattern(p, causal=True), multiplicity_map, flops_vs_n,
        path_length_vs_n, distributed_branch, decode_cache, tensor_core_tiles,
    )))
    for name, make in makers.items():
        make(output_dir / name)
    return [output_dir / name for name in FIGURES]


# --- Decoding with a bounded cache (docs/decoding.md) ----------------------------------------


def decode_cache(path, position=26):
    """Which rows the bounded KV cache holds after decoding positions ``0..t`` (``longnet_ref.decode``).

    One strip per (branch, head), like `selected_rows`: grey marks every row the head
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



# --- The tensor-core kernels' tiles (docs/gpu.md) ---------------------------------------------


def tensor_core_tiles(path, n=400, segment_length=400, dilation=2):
    """The blocks and tiles of the tensor-core kernels on one causal sparse segment (``tensor_core_tiles``).

    One segment of ``T = 200`` rows (``w = 400, r = 2``). Left, the forward and dQ kernels: a
    thread block per 64 query rows (a warp per 16, shaded alternately), looping over 64-row key
    tiles; right, the dK/dV kernel: a block per 64 key rows, looping over query tiles. Coloured:
    the attended pairs each block computes (from the plan's masks); grey: pairs a visited tile
    computes and masks (the diagonal tiles); white: pairs no tile visits (the causal loops skip
    them); lines: tile borders.
    """
    from .backends import tensor_core_tiles as tiles

    plt = _pyplot()
    branches = validate_branches([segment_length], [dilation])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    for ax, owner in zip(axes, ("queries", "keys")):
        size = -(-min(segment_length, n) // dilation)
        picture = np.ones((size, size, 3))  # (query t, key t, RGB): white where no tile goes
        for b, block in enumerate(tiles.tile_plan(n, 1, branches, "paper", True, owner=owner)):
            for other in block.others:
                own = block.start + np.arange(tiles.BLOCK_Q)
                rows = other.start + np.arange(tiles.BLOCK_K)
                for i in np.flatnonzero(block.valid):
                    warp = i // tiles.ROWS
                    colour = np.array(matplotlib_rgb(BRANCH_COLOURS[b % len(BRANCH_COLOURS)])) * (0.75 if warp % 2 else 1.0)
                    for j in np.flatnonzero(other.valid):
                        query, key = (own[i], rows[j]) if owner == "queries" else (rows[j], own[i])
                        picture[query, key] = colour if other.attended[i, j] else (0.92, 0.92, 0.92)
        ax.imshow(picture, interpolation="nearest")
        for edge in range(0, size, tiles.BLOCK_Q):
            ax.axhline(edge - 0.5, color="black", linewidth=0.8)
            ax.axvline(edge - 0.5, color="black", linewidth=0.8)
        _grid_ticks(ax, size, tiles.BLOCK_Q)
        ax.set_xlabel("key row t of the sparse segment")
        ax.set_ylabel("query row t of the sparse segment")
        title = "forward, dQ: a block per 64 queries" if owner == "queries" else "dK, dV: a block per 64 keys"
        ax.set_title(title, fontsize=9)
    fig.suptitle(f"tensor-core tiles, one causal sparse segment (w = {segment_length}, r = {dilation}, T = {size})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def matplotlib_rgb(colour):
    """``#rrggbb`` -> an (r, g, b) tuple in [0, 1]."""
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))
