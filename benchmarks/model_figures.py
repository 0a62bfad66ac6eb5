"""The experiments of ``docs/model.md``: train, then draw ``docs/figures/model_*.png``.

    python benchmarks/model_figures.py passkey   # long-range task: dilated vs window vs dense
    python benchmarks/model_figures.py text      # text loss curves: dense vs dilated
    python benchmarks/model_figures.py reach     # the path-length table (no training)
    python benchmarks/train_bench.py --plot docs/figures/model_step_time.png   # the timing figure

Each experiment is a list of ``longnet-ref train`` runs (printed, so each can be rerun alone);
their ``log.json`` files land under ``--runs`` and the figure is drawn from them. ``--plot-only``
redraws from existing logs. Accuracy and loss do not depend on the machine's load; time does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from longnet_ref.cli import main as longnet_ref
from longnet_ref.complexity import path_length
from longnet_ref.nn import window_for

# The passkey experiment: N = 256, the key in the first N/4, the query at N-1 (>= 192 tokens back).
PASSKEY_N = 256
BRANCHES = ["--segment-lengths", "16,32,64,128,256", "--dilation-rates", "1,2,4,8,16"]
MODEL = ["--d-model", "64", "--layers", "2", "--heads", "16", "--backend", "numba"]
# A second, narrower geometry: 4 heads of dimension 16, w = (64, 128, 256), r = (1, 2, 4).
NARROW = ["--segment-lengths", "64,128,256", "--dilation-rates", "1,2,4", "--d-model", "64", "--layers", "2", "--heads", "4", "--backend", "numba"]
COMMON = ["--n", str(PASSKEY_N), "--batch", "16", "--eval-every", "25"]
PASSKEY = {  # run name -> longnet-ref arguments
    **{
        f"passkey_{kind}_span{span}": ["train", "--attention", kind, "--passkey-span", str(span), *COMMON, *BRANCHES, *MODEL, "--steps", "300"]
        for kind, span in (("dense", 1), ("dilated", 1), ("window", 1), ("dilated", 16))
    },
    "passkey_h4_dilated_span4": ["train", "--attention", "dilated", "--passkey-span", "4", *COMMON, *NARROW, "--steps", "300"],
    "passkey_h4_dilated_span1": ["train", "--attention", "dilated", "--passkey-span", "1", *COMMON, *NARROW, "--steps", "600"],
    "passkey_h4_l3_dilated_span1": ["train", "--attention", "dilated", "--passkey-span", "1", *COMMON, *NARROW, "--layers", "3", "--steps", "600"],
}

# The text experiment: the repository's own docs as a byte-level corpus.
TEXT_N = 256
TEXT = {
    kind: ["train", "--attention", kind, "--n", str(TEXT_N), *BRANCHES, *MODEL, "--steps", "200", "--batch", "8", "--eval-every", "20"]
    for kind in ("dense", "dilated")
}
CORPUS = "corpus.txt"


def reach_table(span=1, n=PASSKEY_N, heads=16, segment_lengths=(16, 32, 64, 128, 256), dilation_rates=(1, 2, 4, 8, 16)):
    """Per kind: the fraction of passkey positions ``p < n/4`` from which the query at ``n-1`` is
    reachable within 1, 2, 3 layers (``complexity.path_length``, causal); with ``span`` copies at
    ``p .. p + span - 1``, the nearest route from any copy counts."""
    w = window_for(segment_lengths, dilation_rates)
    kinds = {"dilated": (list(segment_lengths), list(dilation_rates)), "window": ([w], [1]), "dense": ([n], [1])}
    table = {}
    for kind, (ws, rs) in kinds.items():
        to_query = [path_length(n, heads, ws, rs, causal=True, source=s, target=n - 1) for s in range(n // 4 + span)]
        layers = []
        for p in range(n // 4):
            routes = [lay for lay in to_query[p : p + span] if lay is not None]
            layers.append(min(routes) if routes else None)
        table[kind] = {L: sum(lay is not None and lay <= L for lay in layers) / len(layers) for L in (1, 2, 3)}
    return table, w


def run_all(runs: dict, out: Path, extra=()) -> None:
    for name, argv in runs.items():
        argv = [*argv, *extra, "--out", str(out / name), "--overwrite", "--quiet"]
        print("longnet-ref " + " ".join(argv), flush=True)
        if longnet_ref(argv) != 0:
            raise SystemExit(f"run {name} failed")


def load(out: Path, names) -> dict:
    return {name: json.loads((out / name / "log.json").read_text()) for name in names if (out / name / "log.json").is_file()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_passkey(logs: dict, path: Path) -> None:
    """Held-out accuracy over training; left the 16-head geometry, right the 4-head one."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colours = {"dense": "C0", "dilated": "C1", "window": "C2"}
    for name, log in logs.items():
        model = log["model"]
        kind, span = model["attention"], log.get("passkey_span") or 1
        ax = axes[1] if model["n_heads"] == 4 else axes[0]
        style = {"color": colours[kind], "ls": "-" if span == 1 else "--", "marker": "o" if span == 1 else "s", "ms": 3}
        evals = [r for r in log["records"] if "eval_accuracy" in r]
        if model["n_layers"] != 2:
            style |= {"color": "C3", "marker": "^"}
        label = f"{kind}, span {span}" + (f", {model['n_layers']} layers" if model["n_layers"] != 2 else "")
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], label=label, **style)
        if name == "passkey_dense_span1":  # the reference in both panels
            axes[1].plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], color="C0", alpha=0.4, label="dense, span 1 (16 heads)")
    for ax, title in zip(axes, ("16 heads of dim 4; w = 16..256, r = 1..16", "4 heads of dim 16; w = 64, 128, 256, r = 1, 2, 4")):
        ax.axhline(1 / 8, color="gray", ls=":", label="chance")
        ax.set(xlabel="step", title=title, ylim=(-0.02, 1.02))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out accuracy (64 sequences)")
    fig.suptitle(f"passkey retrieval, N = {PASSKEY_N}: the key >= {PASSKEY_N - PASSKEY_N // 4} tokens before the query", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_text(logs: dict, path: Path) -> None:
    """Training loss (thin) and the loss on a fixed evaluation batch (dots) per step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    colours = {"dense": "C0", "dilated": "C1", "window": "C2"}
    for log in logs.values():
        kind = log["model"]["attention"]
        steps = [r["step"] for r in log["records"]]
        ax.plot(steps, [r["loss"] for r in log["records"]], lw=0.7, alpha=0.45, color=colours[kind], label=f"{kind} (train batch)")
        evals = [r for r in log["records"] if "eval_loss" in r]
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, color=colours[kind], label=f"{kind} (fixed evaluation batch)")
    ax.set(xlabel="step", ylabel="next-byte loss [nats]")
    ax.set_title(f"byte-level text (the repository's README and docs), N = {TEXT_N}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_corpus(out: Path) -> Path:
    """README and docs pages concatenated: a few hundred kB of English, maths and code."""
    parts = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    out.mkdir(parents=True, exist_ok=True)
    path = out / CORPUS
    path.write_bytes(b"\n\n".join(p.read_bytes() for p in parts if p.is_file()))
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=["passkey", "text", "reach"])
    p.add_argument("--runs", default="model-runs", help="where the runs' logs go")
    p.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    p.add_argument("--plot-only", action="store_true", help="redraw from existing logs")
    args = p.parse_args(argv)
    out, figures = Path(args.runs), Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    if args.experiment == "reach":
        geometries = [(16, (16, 32, 64, 128, 256), (1, 2, 4, 8, 16), (1, 16)), (4, (64, 128, 256), (1, 2, 4), (1, 4))]
        print(f"| heads | w | r | span | kind | 1 layer | 2 layers | 3 layers |\n|{'---|' * 8}")
        for heads, w, r, spans in geometries:
            for span in spans:
                table, window = reach_table(span, heads=heads, segment_lengths=w, dilation_rates=r)
                for kind, row in table.items():
                    name = f"window W={window}" if kind == "window" else kind
                    print(f"| {heads} | {list(w)} | {list(r)} | {span} | {name} | " + " | ".join(f"{v:.1%}" for v in row.values()) + " |")
        return 0
    if args.experiment == "passkey":
        if not args.plot_only:
            run_all(PASSKEY, out)
        plot_passkey(load(out, PASSKEY), figures / "model_passkey.png")
        print(f"wrote {figures / 'model_passkey.png'}")
    else:
        if not args.plot_only:
            corpus = make_corpus(out)
            run_all({f"text_{k}": v for k, v in TEXT.items()}, out, ["--text", str(corpus)])
        plot_text(load(out, [f"text_{k}" for k in TEXT]), figures / "model_text_loss.png")
        print(f"wrote {figures / 'model_text_loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
