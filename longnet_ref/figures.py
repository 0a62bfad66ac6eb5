"""The documentation's figures, drawn from the library itself: ``longnet-ref pattern``.

Every picture is computed by the same functions the tests check (``index_sets``,
``multiplicity``, ``complexity``), so the docs cannot show a pattern the code does not use.
The docs build (``docs/hooks.py``) fails if one of ``FIGURES`` is missing, and
``tests/test_docs.py`` checks that every figure a page shows is one of ``FIGURES``.

Each function below draws one figure into ``path`` (a PNG file) and returns nothing;
[`generate`][] draws them all. Docs: ``docs/overview.md`` (the overview figure),
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
    "overview.png",
    "selected_rows.png",
    "pattern.png",
    "pattern_causal.png",
    "multiplicity.png",
    "flops.png",
    "path_length.png",
    "distributed.png",
    "decode_cache.png",
    "train_parallel.png",
    "one_branch.png",
    "hops.png",
    "tensor_core_tiles.png",
)

# Figures of experiments (training runs, benchmarks): too slow for ``longnet-ref pattern``, so each
# is drawn by the command beside it, from logs committed under ``benchmarks/results/``; the docs
# build checks that they exist, like the figures above.
EXPERIMENT_FIGURES = {
    "model_passkey.png": "python benchmarks/model_figures.py passkey --plot-only --runs benchmarks/results/model-runs",
    "model_text_loss.png": "python benchmarks/model_figures.py text --plot-only --runs benchmarks/results/model-runs",
    "model_step_time.png": "python benchmarks/train_bench.py --numba-threads 1 --plot docs/figures/model_step_time.png",
    "train_scaling.png": "python benchmarks/train_scaling.py --json benchmarks/results/train_scaling.json --plot-only --plot docs/figures/train_scaling.png",
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


# One colour per branch, the same on every figure of the site: branch 0 blue, 1 orange, 2 green.
# Counts (the multiplicity m, how many branches give a key) are shades of grey, never a branch
# colour, so that a count cannot be mistaken for a branch. Heads are told apart by labels.
BRANCH_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")
COUNT_COLOURS = ("#ffffff", "#d0d0d0", "#808080", "#303030", "#000000")  # m = 0, 1, 2, 3, 4
RANK_COLOURS = ("#d62728", "#e377c2", "#17becf", "#bcbd22")  # MPI ranks (distributed figure)


def overview(path: str | Path) -> None:
    """Dilated attention in one picture, in the spirit of the paper's Figures 2 and 3.

    Top row (Fig. 2): ``N = 16``, head 0, the branches ``(w, r) = (4, 1), (8, 2), (16, 4)`` one by
    one in their branch colours, then all three together as the multiplicity ``m(p, k)``: the
    number of branches that give key ``k`` to query ``p``, written in each cell (SPEC §4). Bottom
    row (Fig. 3): the ``(16, 4)`` branch for heads 0-2, whose offsets ``h mod 4`` differ, then
    heads 0-3 together, each cell labelled with the head that attends it: every row is covered by
    exactly one head.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.colors import to_rgba

    plt = _pyplot()
    n, heads, lengths, rates = 16, 4, (4, 8, 16), (1, 2, 4)
    fig, axes = plt.subplots(2, 4, figsize=(11, 6.4))

    def show(ax, cells, title, labels=None, label_colour=None):
        """``cells``: ``(N, N)`` RGBA; ``labels``: ``(N, N)`` strings written in the cells."""
        ax.imshow(cells, interpolation="nearest")
        if labels is not None:
            for p, k in zip(*np.nonzero(labels != "")):
                ax.text(k, p, labels[p, k], ha="center", va="center", fontsize=6.5, color=label_colour[p, k])
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        ax.grid(which="minor", color="#dddddd", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
        _grid_ticks(ax, n, 4)
        ax.set_title(title, fontsize=9)

    def paint(mask, colour):
        picture = np.ones((n, n, 4))  # white RGBA
        picture[mask] = to_rgba(colour)
        return picture

    per_branch = [multiplicity(n, heads, [w], [r])[0] > 0 for w, r in zip(lengths, rates)]  # head 0, (N, N)
    for i, (w, r) in enumerate(zip(lengths, rates)):
        show(axes[0, i], paint(per_branch[i], BRANCH_COLOURS[i]), f"branch {i}: w = {w}, r = {r} (head 0)")
    counts = multiplicity(n, heads, lengths, rates)[0]  # (N, N) m(p, k) of head 0
    shades = np.array([to_rgba(c) for c in COUNT_COLOURS])[counts]
    show(axes[0, 3], shades, "all three: m(p, k), head 0", np.where(counts > 0, counts.astype(str), ""), np.where(counts >= 2, "white", "black"))

    w, r = lengths[-1], rates[-1]
    per_head = multiplicity(n, heads, [w], [r]) > 0  # (H, N, N), one branch
    for h in range(3):
        show(axes[1, h], paint(per_head[h], BRANCH_COLOURS[2]), f"branch 2: head {h}, offset {h % r}")
    head_of = np.where(per_head.any(0), per_head.argmax(0).astype(str), "")  # each cell: the head attending it
    show(axes[1, 3], paint(per_head.any(0), BRANCH_COLOURS[2]), "branch 2: heads 0-3 together", head_of, np.full((n, n), "white"))
    for ax in axes[:, 0]:
        ax.set_ylabel("query p", fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("key k", fontsize=8)
    fig.suptitle("Dilated attention, N = 16: segments and dilation (top), per-head offsets (bottom)", fontsize=10)
    fig.tight_layout(h_pad=2.0)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def selected_rows(path: str | Path, offsets: str = "paper") -> None:
    """Which rows each head keeps in each branch (SPEC §2): one strip per (branch, head).

    ``N = 32``, four heads, ``(w, r) = (8, 1), (16, 2), (32, 4)``; ``offsets`` is the rule of
    ``index_sets.head_offsets``.

    Args:
        path: the PNG file to write.
        offsets: ``"paper"`` or ``"torchscale"``.
    """
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    branches = validate_branches(SEGMENT_LENGTHS, DILATION_RATES)
    fig, axes = plt.subplots(len(branches), 1, figsize=(9, 1.1 * HEADS * len(branches) / 2.2), sharex=True)
    for index, (ax, branch) in enumerate(zip(axes, branches)):
        picture = np.zeros((HEADS, N))
        for h, o in enumerate(head_offsets(HEADS, branch.dilation, offsets)):
            positions, valid = segment_rows(N, branch.segment_length, branch.dilation, int(o))
            picture[h, positions[valid]] = 1
        colour = ListedColormap(["#ffffff", BRANCH_COLOURS[index]])
        ax.imshow(picture, cmap=colour, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_xticks(np.arange(-0.5, N, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, HEADS, 1), minor=True)
        ax.grid(which="minor", color="#dddddd", linewidth=0.4)
        ax.tick_params(which="minor", length=0)
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
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    fig, axes = plt.subplots(len(SEGMENT_LENGTHS), HEADS, figsize=(2.2 * HEADS, 2.3 * len(SEGMENT_LENGTHS)))
    for i, (w, r) in enumerate(zip(SEGMENT_LENGTHS, DILATION_RATES)):
        counts = multiplicity(N, HEADS, [w], [r], causal=causal)  # (H, N, N), 0/1 for one branch
        for h in range(HEADS):
            ax = axes[i, h]
            ax.imshow(counts[h], cmap=ListedColormap(["#ffffff", BRANCH_COLOURS[i]]), vmin=0, vmax=1, interpolation="nearest")
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
    colours = ListedColormap(list(COUNT_COLOURS[:values]))
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
        colour = RANK_COLOURS[rank % len(RANK_COLOURS)] if x in sparse else "#f0f0f0"
        ax.add_patch(Rectangle((x, 0), 0.9, 0.9, facecolor=colour, edgecolor="#999999", linewidth=0.5))
        if x % 4 == 0:
            ax.text(x + 0.45, -0.35, str(x), ha="center", va="top", fontsize=7)
    for rank in range(ranks):
        start = rank * rows_per_rank
        ax.text(start + rows_per_rank / 2 - 0.05, 1.25, f"rank g = {rank}\nrows {start}..{start + rows_per_rank - 1}", ha="center", va="bottom", fontsize=8)
        ax.plot([start - 0.05, start - 0.05], [-0.1, 1.0], color="black", linewidth=0.8, linestyle=":")
    for segment in range(n // w):
        left, right = segment * w - 0.05, (segment + 1) * w - 0.15
        ax.plot([left, left, right, right], [-0.9, -1.1, -1.1, -0.9], color="black", linewidth=1.2)
        ax.text((left + right) / 2, -1.25, f"segment s = {segment} of w = {w}: ranks {2 * segment} and {2 * segment + 1}", ha="center", va="top", fontsize=8)
        a, b = (2 * segment + 0.5) * rows_per_rank, (2 * segment + 1.5) * rows_per_rank
        ax.add_patch(FancyArrowPatch((a, 2.4), (b, 2.4), arrowstyle="<|-|>", mutation_scale=12, color="black", connectionstyle="arc3,rad=-0.25"))
        ax.text((a + b) / 2, 3.35, "forward: all-gather the sparse rows of K, V\nbackward: reduce-scatter dK, dV", ha="center", va="bottom", fontsize=8)
    ax.set_xlim(-1, n + 0.5)
    ax.set_ylim(-2.2, 4.6)
    ax.axis("off")
    ax.set_title(
        f"N = {n}, G = {ranks} ranks of L = {rows_per_rank} rows, branch (w, r) = ({w}, {r}), head 0: "
        f"coloured rows are sent (L / r = {rows_per_rank // r} per rank), grey rows never leave their rank",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sequence_parallel_step(path: str | Path) -> None:
    """One training step of the LM over ``G = 4`` ranks (``docs/parallel.md``; ``longnet_ref.parallel``).

    ``N = 32`` tokens, ``L = 8`` per rank, branches ``(w, r) = (8, 1), (16, 2)``. Every layer but
    attention works on the rank's own rows; the attention's ``(8, 1)`` branch is local (``8 | L``)
    and its ``(16, 2)`` branch shares each segment between the two ranks that hold it (the pairs
    are computed with [`segment_rows`][longnet_ref.index_sets.segment_rows]). At the end, one
    all-reduce sums the ranks' gradient buffers.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.patches import FancyArrowPatch, Rectangle

    plt = _pyplot()
    n, ranks, shared = 32, 4, (16, 2)
    length = n // ranks
    pairs = set()
    for offset in range(shared[1]):
        for segment in range(n // shared[0]):
            positions, valid = segment_rows(n, *shared, offset)
            owners = {int(x) // length for x in positions[segment][valid[segment]]}
            if len(owners) > 1:
                pairs.add((min(owners), max(owners)))
    layers = [  # (label, colour, local?)
        ("token embedding E[t]  (rows of this chunk)", "#c6dbef", True),
        ("LayerNorm, q/k/v projections, RoPE at global positions gL + 0..L-1", "#c7e9c0", True),
        ("dilated attention: local branch (8, 1) | shared branch (16, 2)", "#fdd0a2", False),
        ("out projection, LayerNorm, MLP (row by row)", "#c7e9c0", True),
        ("tied head, cross-entropy / n_mask (targets of all ranks)", "#c6dbef", True),
        ("backward, in reverse: attention gathers again, reduce-scatters dK, dV", "#fdd0a2", False),
    ]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    top = len(layers)
    for row, (label, colour, _local) in enumerate(layers):
        y = top - row
        for rank in range(ranks):
            ax.add_patch(Rectangle((rank * length + 0.15, y), length - 0.3, 0.7, facecolor=colour, edgecolor="#777777", linewidth=0.6))
        ax.text(n + 0.6, y + 0.35, label, va="center", fontsize=8)
    for rank in range(ranks):
        ax.text(
            rank * length + length / 2,
            top + 1.0,
            f"rank g = {rank}\npositions {rank * length}..{(rank + 1) * length - 1}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    for row in (2, 5):  # the attention rows: arrows between the ranks that share a segment
        y = top - row + 0.35
        for a, b in sorted(pairs):
            ax.add_patch(
                FancyArrowPatch(
                    ((a + 0.5) * length + 1.5, y), ((b + 0.5) * length - 1.5, y), arrowstyle="<|-|>", mutation_scale=10, color="black", linewidth=1.0
                )
            )
    y = 0.0
    ax.add_patch(Rectangle((0.15, y), n - 0.3, 0.7, facecolor="#dadaeb", edgecolor="#555555", linewidth=0.8))
    ax.text(n / 2, y + 0.35, "one Allreduce(SUM) of one flat buffer: every gradient + the loss", ha="center", va="center", fontsize=8)
    ax.text(n + 0.6, y + 0.35, "the parameter count, whatever N: identical grads on every rank", va="center", fontsize=8)
    ax.set_xlim(-0.5, n + 21)
    ax.set_ylim(-0.4, top + 2.1)
    ax.axis("off")
    ax.set_title(
        f"N = {n} tokens over G = {ranks} ranks of L = {length}: arrows = the only exchanges of activations (segments of w = {shared[0]} span 2 ranks)",
        fontsize=9,
    )
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
    makers = dict(
        zip(
            FIGURES,
            (
                overview,
                selected_rows,
                pattern,
                lambda p: pattern(p, causal=True),
                multiplicity_map,
                flops_vs_n,
                path_length_vs_n,
                distributed_branch,
                decode_cache,
                sequence_parallel_step,
                one_branch,
                hops,
                tensor_core_tiles,
            ),
        )
    )
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
    colours = ListedColormap(["#d0d0d0", *BRANCH_COLOURS[: len(SEGMENT_LENGTHS)]])  # 0: dropped, then branch i
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
            picture[h, held[i][h]] = 1 + i  # still in the cache: the branch's colour
        ax.imshow(picture, cmap=colours, vmin=-0.5, vmax=len(SEGMENT_LENGTHS) + 0.5, aspect="auto", interpolation="nearest")
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


# --- Diagrams of one branch (docs/segments.md) and of the connectivity proof (docs/complexity.md) --


def _cell(ax, x, y, colour, text="", text_colour="black", size=1.0):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), 0.9 * size, 0.9 * size, facecolor=colour, edgecolor="#999999", linewidth=0.5))
    if text:
        ax.text(x + 0.45 * size, y + 0.45 * size, text, ha="center", va="center", fontsize=7, color=text_colour)


def one_branch(path: str | Path) -> None:
    """One branch, step by step (SPEC §2-4, paper Eqs. 3-10): select, gather, attend, scatter, mix.

    ``N = 16``, head 1 of four, branch ``(w, r) = (8, 2)``: the head's offset is 1, so it keeps rows
    1, 3, 5, 7 of segment 0 and 9, 11, 13, 15 of segment 1 (``index_sets.segment_rows``); each
    sparse segment is gathered into a dense block, attended, and its outputs are scattered back to
    their rows. Last, the three branches ``(4, 1), (8, 2), (16, 4)`` of head 1 are mixed row by
    row by their log-sum-exp.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.patches import FancyArrowPatch

    plt = _pyplot()
    n, heads, lengths, rates, head, chosen = 16, 4, (4, 8, 16), (1, 2, 4), 1, 1
    kept = []  # per branch: the rows head 1 keeps, by segment
    for w, r in zip(lengths, rates):
        positions, valid = segment_rows(n, w, r, int(head_offsets(heads, r)[head]))
        kept.append([[int(x) for x in row[ok]] for row, ok in zip(positions, valid)])
    colour = BRANCH_COLOURS[chosen]
    rows = {x for segment in kept[chosen] for x in segment}
    fig, ax = plt.subplots(figsize=(9, 7.4))
    gather, attend, scatter, mix, output = 4.5, 8.5, 14.5, 18.5, 24.5  # the columns' x

    def column(x0, filled, fill, labels=True):
        for p in range(n):
            _cell(ax, x0, p, fill if p in filled else "#f2f2f2", str(p) if labels else "", "white" if p in filled else "#999999")

    def title(x, text):
        ax.text(x, -0.8, text, ha="center", va="bottom", fontsize=8.5)

    def arrow(x0, x1, y=7.95):
        ax.add_patch(FancyArrowPatch((x0, y), (x1, y), arrowstyle="-|>", mutation_scale=14, color="#444444"))

    w, r = lengths[chosen], rates[chosen]
    column(0, rows, colour)
    ax.plot([-0.3, 1.2], [7.95, 7.95], color="black", linewidth=1.5)
    title(0.45, f"1. select\nbranch ({w}, {r}),\nhead {head} keeps\nevery {r}nd row\nfrom offset {head % r}")
    arrow(1.4, gather - 0.3)
    for s, segment in enumerate(kept[chosen]):  # 2. gather: each sparse segment as a dense block
        top = 1.5 + 8 * s
        for t, x in enumerate(segment):
            _cell(ax, gather, top + t, colour, str(x), "white")
        ax.text(gather + 1.1, top + 2, f"segment {s}", ha="left", va="center", fontsize=7.5, rotation=90)
        for a in range(len(segment)):  # 3. attend: dense softmax attention inside the block
            for b in range(len(segment)):
                _cell(ax, attend + b * 0.8, top + a * 0.8, colour, size=0.8)
        ax.text(attend + 1.6, top + 3.6, f"{len(segment)} x {len(segment)} scores", ha="center", va="center", fontsize=7)
    title(gather + 0.45, "2. gather\neach segment's\nrows into\na dense block")
    title(attend + 1.6, "3. attend\nsoftmax in\neach block:\n$o_i$, lse$_i$ per row")
    arrow(gather + 2.0, attend - 0.3)
    arrow(attend + 3.6, scatter - 0.3)
    column(scatter, rows, colour)
    title(scatter + 0.45, "4. scatter\nback to the rows;\nthe other rows:\nlse$_i = -\\infty$")
    arrow(scatter + 1.3, mix - 0.3)
    for i in range(len(lengths)):  # 5. mix: every branch's scattered output, row by row
        covered = {x for segment in kept[i] for x in segment}
        column(mix + 1.1 * i, covered, BRANCH_COLOURS[i], labels=False)
        ax.text(mix + 0.45 + 1.1 * i, 16.2, f"({lengths[i]}, {rates[i]})", ha="center", va="top", fontsize=7, rotation=90)
    title(mix + 1.55, "5. mix the\nthree branches\nby weight\n" + r"$\alpha_i = e^{\mathrm{lse}_i - \mathrm{LSE}}$")
    arrow(mix + 3.4, output - 0.3)
    column(output, set(range(n)), "#555555")
    title(output + 0.45, "output\n" + r"$o = \sum_i \alpha_i\, o_i$")
    ax.set_xlim(-0.6, output + 1.4)
    ax.set_ylim(18.4, -5.2)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def hops(path: str | Path) -> None:
    """The connectivity proof of ``docs/complexity.md`` as a picture: a route of ``2k - 1`` hops.

    ``N = 16``, one head (offset 0 in every branch), geometric branches ``(4, 1), (8, 2), (16, 4)``
    (``k = 3``). ``f_i(x)`` is the first row of the branch-``i`` segment holding ``x``; token 13
    reaches token 6 along ``13 -> f_0(13) = 12 -> f_1(13) = 8 -> f_1(6) = 0 -> f_0(6) = 4 -> 6``,
    one layer per hop, each hop inside one sparse segment of the branch of its colour. Every hop
    is checked against the library's own index sets (``multiplicity``) before it is drawn.

    Args:
        path: the PNG file to write.
    """
    from matplotlib.patches import FancyArrowPatch

    plt = _pyplot()
    n, lengths, rates, x, y = 16, (4, 8, 16), (1, 2, 4), 13, 6
    k = len(lengths)
    first = [lambda z, w=w: (z // w) * w for w in lengths]  # f_i(z)
    route = [x, *(first[i](x) for i in range(k - 1)), *(first[i](y) for i in reversed(range(k - 1))), y]
    hop_branch = [*range(k - 1), k - 1, *reversed(range(k - 1))]  # the branch of each hop
    links = [multiplicity(n, 1, [w], [r])[0] > 0 for w, r in zip(lengths, rates)]  # (N, N) per branch, head 0
    assert all(links[i][a, b] for i, a, b in zip(hop_branch, route, route[1:])), "a hop the index sets do not give"
    fig, ax = plt.subplots(figsize=(10, 4.6))
    for i, (w, r) in enumerate(zip(lengths, rates)):  # one strip per branch: the rows head 0 keeps
        row = -1.6 - 1.25 * i
        for z in range(n):
            _cell(ax, z, row, BRANCH_COLOURS[i] if z % w % r == 0 else "#f2f2f2")
        for start in range(0, n + 1, w):
            ax.plot([start - 0.05, start - 0.05], [row - 0.15, row + 1.05], color="black", linewidth=1.5)
        ax.text(-0.4, row + 0.45, f"branch {i}: w = {w}, r = {r}", ha="right", va="center", fontsize=8)
    on_route = set(route)
    for z in range(n):  # the tokens
        _cell(ax, z, 0, "#555555" if z in on_route else "#ffffff", str(z), "white" if z in on_route else "black")
    for layer, (i, a, b) in enumerate(zip(hop_branch, route, route[1:]), 1):
        ax.add_patch(
            FancyArrowPatch(
                (a + 0.45, 0.95),
                (b + 0.45, 0.95),
                arrowstyle="-|>",
                mutation_scale=12,
                color=BRANCH_COLOURS[i],
                linewidth=2,
                connectionstyle=f"arc3,rad={-0.5 if b > a else 0.5}",
            )
        )
        ax.text((a + b) / 2 + 0.45, 1.1 + 0.25 * abs(a - b), f"layer {layer}", ha="center", va="bottom", fontsize=8, color=BRANCH_COLOURS[i])
    ax.text(-0.4, 0.45, "tokens", ha="right", va="center", fontsize=8)
    ax.set_title(
        f"token {x} reaches token {y} in 2k - 1 = {2 * k - 1} layers: up through the first rows of ever larger "
        "segments,\nacross in the last branch, down again (one head; coloured rows: the rows it keeps in each branch)",
        fontsize=9,
    )
    ax.set_xlim(-5.5, n + 0.5)
    ax.set_ylim(-1.6 - 1.25 * (k - 1) - 0.3, 1.6 + 0.25 * n / 2)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")
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
