"""Training-step benchmark of the LongNet LM: tokens/s and where a step's time goes, per attention kind and N.

One command (the docs' timing figure; ``docs/model.md``):

    python benchmarks/train_bench.py --plot docs/figures/model_step_time.png --json bench-results/train_bench.json

For each kind (dense, dilated, window) and context length N it times, in the same run and on the
same model (``--d-model``, ``--layers``, ``--heads``, batch ``--batch``):

- a whole training step: forward, backward, clipping and the AdamW update (median of ``--repeats``);
- its parts, each forward + backward on the step's shapes: the attention layer, the four
  projections alone (``attention = layer - projections``), the MLP, and the optimiser update;
  ``other`` is the rest (embedding, LayerNorms, the tied head, cross-entropy).

Dense attention runs on the same backend (one full segment, no dilation: FlashAttention-style
memory) and stops at ``--dense-max-n`` because its time grows as N^2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from longnet_ref import model as lm
from longnet_ref import nn
from longnet_ref.train import AdamW, TrainConfig, clip_by_global_norm

KINDS = ("dense", "dilated", "window")


def add_model_arguments(p: argparse.ArgumentParser, *, d_model: int, segment_lengths: list[int], dilation_rates: list[int]) -> None:
    """The model and timing options of both training benchmarks (this one and ``train_scaling.py``)."""
    p.add_argument("--segment-lengths", type=int, nargs="+", default=segment_lengths)
    p.add_argument("--dilation-rates", type=int, nargs="+", default=dilation_rates)
    p.add_argument("--d-model", type=int, default=d_model)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])


def model_config(args, **options) -> lm.LongNetConfig:
    """The byte-level model the options of :func:`add_model_arguments` describe; ``options``: the rest of the config."""
    return lm.LongNetConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        segment_lengths=tuple(args.segment_lengths),
        dilation_rates=tuple(args.dilation_rates),
        dtype=args.dtype,
        **options,
    )


def measure(kind: str, n: int, args) -> dict:
    """Seconds of one training step and of its parts, and their ratios to the step."""
    config = model_config(args, attention=kind, backend=args.backend, rope=True)
    params = lm.init_params(config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (args.batch, n))  # (B, N)
    targets = rng.integers(0, 256, (args.batch, n))
    tc = TrainConfig()
    optimizer = AdamW.zeros_like(params)

    def step():
        _loss, grads = lm.loss_and_grads(config, params, tokens, targets)
        grads, _ = clip_by_global_norm(grads, tc.clip)
        optimizer.step(params, grads, 1e-4, tc)

    x = rng.standard_normal((args.batch, n, args.d_model)).astype(args.dtype)  # (B, N, C)
    attn = nn.subtree(params, "h.0.attn")
    mlp = nn.subtree(params, "h.0.mlp")
    options = lm.attention_options(config)

    def attention_layer():
        y, cache = nn.attention_forward(attn, x, **options)
        nn.attention_backward(attn, cache, y)

    def projections():
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sub = nn.subtree(attn, name)
            y, cache = nn.linear_forward(sub, x)
            nn.linear_backward(sub, cache, y)

    def mlp_layer():
        y, cache = nn.mlp_forward(mlp, x)
        nn.mlp_backward(mlp, cache, y)

    grads = {k: np.zeros_like(v) for k, v in params.items()}

    def optimiser():
        optimizer.step(params, grads, 1e-4, tc)

    step()  # warm caches (and the first call's allocations) outside the timing
    # Interleaved: each repeat times the step and then every part, so a change in the machine's
    # load during the run shifts all of them alike; the medians are taken per part.
    parts = {"step": step, "layer": attention_layer, "projections": projections, "mlp": mlp_layer, "optimizer": optimiser}
    samples = {name: [] for name in parts}
    for _ in range(args.repeats):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times) for name, times in samples.items()}
    seconds = {"step": median["step"], "projections": median["projections"] * args.layers}
    seconds["attention"] = max(median["layer"] * args.layers - seconds["projections"], 0.0)
    seconds["mlp"] = median["mlp"] * args.layers
    seconds["optimizer"] = median["optimizer"]
    seconds["other"] = max(seconds["step"] - sum(seconds[k] for k in ("attention", "projections", "mlp", "optimizer")), 0.0)
    tokens_per_step = args.batch * n
    return {
        "kind": kind,
        "n": n,
        "tokens_per_s": tokens_per_step / seconds["step"],
        "step_us_per_token": 1e6 * seconds["step"] / tokens_per_step,
        "seconds": seconds,
        "ratios": {k: v / seconds["step"] for k, v in seconds.items() if k != "step"},
        "window": nn.window_for(config.segment_lengths, config.dilation_rates) if kind == "window" else None,
    }


def format_table(rows) -> str:
    header = f"{'kind':8s}{'N':>8s}{'tokens/s':>11s}{'us/token':>10s}  {'attention':>9s}{'proj':>7s}{'mlp':>7s}{'optim':>7s}{'other':>7s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        q = r["ratios"]
        lines.append(
            f"{r['kind']:8s}{r['n']:8d}{r['tokens_per_s']:11.0f}{r['step_us_per_token']:10.1f}  "
            f"{q['attention']:9.2f}{q['projections']:7.2f}{q['mlp']:7.2f}{q['optimizer']:7.2f}{q['other']:7.2f}"
        )
    return "\n".join(lines)


def plot(rows, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for kind, marker in zip(KINDS, "os^"):
        mine = [r for r in rows if r["kind"] == kind]
        if mine:
            ax.plot([r["n"] for r in mine], [r["step_us_per_token"] for r in mine], marker + "-", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length N")
    ax.set_ylabel("training step time per token [us]")
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--dense-max-n", type=int, default=16384, help="dense attention's time grows as N^2: stop here")
    add_model_arguments(p, d_model=128, segment_lengths=[256, 512, 1024, 2048], dilation_rates=[1, 2, 4, 8])
    p.add_argument("--backend", default="numba")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--blas-threads", type=int, default=1, help="BLAS threads for the (small) projection/MLP GEMMs; the Numba attention kernels use their own")
    p.add_argument(
        "--numba-threads", type=int, default=None, help="threads of the Numba kernels (default: all cores; 1 gives steadier numbers on a busy machine)"
    )
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="draw step time per token vs N here (PNG)")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.blas_threads, user_api="blas")
    if args.numba_threads:
        import numba

        numba.set_num_threads(args.numba_threads)
    if args.backend == "numba":
        from longnet_ref.backends.numba_cpu import warm_up

        print(f"numba kernels ready in {warm_up(np.dtype(args.dtype)):.1f} s")
    rows = []
    for kind in args.kinds:
        for n in args.n:
            if kind == "dense" and n > args.dense_max_n:
                continue
            rows.append(measure(kind, n, args))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    threads = f", {args.numba_threads} Numba thread(s)" if args.numba_threads else ""
    title = (
        f"L={args.layers} C={args.d_model} H={args.heads} B={args.batch} {args.dtype} {args.backend}{threads}\n"
        f"dilated w={args.segment_lengths} r={args.dilation_rates}; "
        f"window W={nn.window_for(args.segment_lengths, args.dilation_rates)}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"title": title, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
