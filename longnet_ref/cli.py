"""``longnet-ref``: the command line. ``longnet-ref demo`` runs dilated attention and checks it."""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import complexity
from .attention import dilated_attention, dilated_attention_backward
from .dense import dense_attention, dense_attention_backward
from .multiplicity import multiplicity, multiplicity_bias


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_relative_error(result, oracle) -> float:
    """``max |result - oracle| / max |oracle|`` over all elements (1 if the oracle is all zero)."""
    return float(np.abs(result - oracle).max() / max(np.abs(oracle).max(), np.finfo(oracle.dtype).tiny)) if oracle.size else 0.0


def demo(args) -> int:
    """Dilated attention forward + backward, verified against the dense oracle with ``log m`` bias."""
    w, r = args.segment_lengths, args.dilation_rates
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.n, args.heads, args.dim)  # (B, N, H, D)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    options = dict(causal=args.causal, offsets=args.offsets)

    print(f"longnet_ref demo: B={args.batch} N={args.n} H={args.heads} D={args.dim} w={w} r={r} "
          f"causal={args.causal} offsets={args.offsets} dtype={dtype}")
    backends = [args.backend] + (["numpy"] if args.backend != "numpy" else [])
    timings, results = {}, {}
    for backend in backends:
        if backend == "numba":  # compile (first run only) or load the cached kernels, outside the timing
            from .backends.numba_cpu import warm_up

            print(f"numba kernels ready in {warm_up(dtype):.1f} s (compiled on the first run, then loaded from the cache)")
        (out, lse), t_fwd = _timed(lambda: dilated_attention(q, k, v, w, r, return_lse=True, backend=backend, **options))
        grads, t_bwd = _timed(lambda: dilated_attention_backward(dout, q, k, v, out, lse, w, r, backend=backend, **options))
        timings[backend], results[backend] = (t_fwd, t_bwd), (out, lse, *grads)

    bias, t_mult = _timed(lambda: multiplicity_bias(multiplicity(args.n, args.heads, w, r, **options)))
    (out_d, lse_d), t_dfwd = _timed(lambda: dense_attention(q, k, v, causal=args.causal, bias=bias, return_lse=True))
    grads_d, t_dbwd = _timed(lambda: dense_attention_backward(dout, q, k, v, out_d, lse_d, causal=args.causal, bias=bias))
    timings["dense oracle"] = (t_dfwd, t_dbwd)

    sizes = dict(batch=args.batch, causal=args.causal)
    flops = complexity.dilated_flops(args.n, args.heads, args.dim, w, r, offsets=args.offsets, **sizes)
    dense = complexity.dense_flops(args.n, args.heads, args.dim, **sizes)
    pairs = complexity.attended_pairs(args.n, args.heads, w, r, offsets=args.offsets, **sizes)
    dense_pairs = complexity.dense_pairs(args.n, args.heads, **sizes)

    print()
    print(f"{'attended (query, key) pairs':34s}{pairs:>16,d}  (dense: {dense_pairs:,d}, ratio {pairs / dense_pairs:.4f})")
    print(f"{'forward FLOPs (QK^T + PV)':34s}{flops.total:>16,d}  (dense: {dense.total:,d})")
    print()
    print(f"{'time [s]':20s}" + "".join(f"{name:>16s}" for name in timings))
    for i, phase in enumerate(("forward", "backward")):
        print(f"{phase:20s}" + "".join(f"{t[i]:16.3f}" for t in timings.values()))
    base = timings[args.backend]
    print(f"{'speed-up of ' + args.backend:20s}" + "".join(f"{(t[0] + t[1]) / (base[0] + base[1]):15.1f}x" for t in timings.values()))
    print(f"(the multiplicity matrix for the oracle took {t_mult:.3f} s)")
    print()
    # Both sides are computed in `dtype`; sums of at most N terms of rounding eps each.
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    ok = True
    oracle = (out_d, lse_d, *grads_d)
    for backend, values in results.items():
        errors = {name: max_relative_error(x, y) for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), values, oracle)}
        ok &= all(err <= tolerance for err in errors.values())
        print(f"max relative error of {backend} vs dense attention with bias log(multiplicity):")
        print("  " + "  ".join(f"{name}={err:.2e}" for name, err in errors.items()))
    print(f"{'OK' if ok else 'FAILED'}: every error {'<=' if ok else 'not <='} {tolerance:g}")
    return 0 if ok else 1


def bench(args) -> int:
    """Benchmark presets; prints the table and writes JSON + PNG under ``--output-dir``."""
    from . import bench as benchmarks

    if args.distributed:
        options = dict(n_per_rank=args.n_per_rank, ranks=args.ranks)
        rows = benchmarks.weak_scaling(**options)
        print(benchmarks.format_weak_scaling(rows, (2048, 16384), (1, 8), 4, 64))
        return 0
    configs = [c for name in args.preset for c in benchmarks.PRESETS[name] if c.n <= args.max_n]
    results = benchmarks.run(
        configs, backend=args.backend, repeats=args.repeats, reference_max_n=args.reference_max_n,
        dense_max_n=args.dense_max_n, memory=args.memory,
    )
    print(benchmarks.format_table(results))
    for path in benchmarks.save(results, args.output_dir):
        print(f"wrote {path}")
    return 0


def pattern(args) -> int:
    """Draw the documentation's figures from the library (``docs/figures`` by default)."""
    from .figures import generate

    for path in generate(args.output_dir):
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longnet-ref", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="forward + backward of dilated attention, checked against dense attention")
    p.add_argument("--n", type=int, default=4096, help="sequence length N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=32, help="head dimension D")
    p.add_argument("--segment-lengths", type=_int_list, default=[256, 512, 1024], help="comma-separated w_i")
    p.add_argument("--dilation-rates", type=_int_list, default=[1, 2, 4], help="comma-separated r_i")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--offsets", choices=["paper", "torchscale"], default="paper")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["numba", "numpy"], default="numba")
    p.set_defaults(func=demo)

    p = sub.add_parser("bench", help="benchmarks: GFLOP/s vs this machine's GEMM rate, speed-ups vs numpy and dense")
    p.add_argument("--preset", nargs="+", default=["quick"], choices=["quick", "paper", "lm", "sweep"])
    p.add_argument("--backend", default="numba")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--max-n", type=int, default=2**20, help="skip configurations longer than this")
    p.add_argument("--reference-max-n", type=int, default=16384, help="time the NumPy reference up to this N")
    p.add_argument("--dense-max-n", type=int, default=16384, help="time dense attention up to this N")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (fresh subprocess)")
    p.add_argument("--output-dir", default="bench-results")
    p.add_argument("--distributed", action="store_true", help="MPI weak scaling (N per rank fixed) over --ranks")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n-per-rank", type=int, default=8192)
    p.set_defaults(func=bench)
    p = sub.add_parser("pattern", help="draw the attention-pattern, multiplicity, FLOPs and path-length figures")
    p.add_argument("--output-dir", default="docs/figures")
    p.set_defaults(func=pattern)
    p = sub.add_parser("train", help="train a small LongNet language model (passkey task or --text FILE)")
    from . import train

    train.add_arguments(p)
    p.set_defaults(func=train.run)
    p = sub.add_parser("generate", help="continue a prompt with a trained checkpoint, token by token through KV caches")
    from . import generate

    generate.add_arguments(p)
    p.set_defaults(func=generate.run)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        print(f"longnet-ref: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
