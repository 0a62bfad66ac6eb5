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
          f"causal={args.causal} offsets={args.offsets} dtype={dtype} backend=numpy")
    (out, lse), t_fwd = _timed(lambda: dilated_attention(q, k, v, w, r, return_lse=True, **options))
    grads, t_bwd = _timed(lambda: dilated_attention_backward(dout, q, k, v, out, lse, w, r, **options))

    bias, t_mult = _timed(lambda: multiplicity_bias(multiplicity(args.n, args.heads, w, r, **options)))
    (out_d, lse_d), t_dfwd = _timed(lambda: dense_attention(q, k, v, causal=args.causal, bias=bias, return_lse=True))
    grads_d, t_dbwd = _timed(lambda: dense_attention_backward(dout, q, k, v, out_d, lse_d, causal=args.causal, bias=bias))

    sizes = dict(batch=args.batch, causal=args.causal)
    flops = complexity.dilated_flops(args.n, args.heads, args.dim, w, r, offsets=args.offsets, **sizes)
    dense = complexity.dense_flops(args.n, args.heads, args.dim, **sizes)
    pairs = complexity.attended_pairs(args.n, args.heads, w, r, offsets=args.offsets, **sizes)

    print()
    print(f"{'':32s}{'dilated (numpy)':>18s}{'dense oracle':>16s}{'ratio':>10s}")
    print(f"{'attended (query, key) pairs':32s}{pairs:>18,d}{complexity.dense_pairs(args.n, args.heads, **sizes):>16,d}"
          f"{pairs / complexity.dense_pairs(args.n, args.heads, **sizes):>10.4f}")
    print(f"{'forward FLOPs (QK^T + PV)':32s}{flops.total:>18,d}{dense.total:>16,d}{flops.total / dense.total:>10.4f}")
    print(f"{'forward time [s]':32s}{t_fwd:>18.3f}{t_dfwd:>16.3f}{t_fwd / t_dfwd:>10.3f}")
    print(f"{'backward time [s]':32s}{t_bwd:>18.3f}{t_dbwd:>16.3f}{t_bwd / t_dbwd:>10.3f}")
    print(f"{'(multiplicity matrix [s])':32s}{'':>18s}{t_mult:>16.3f}")
    print()
    print("max relative error vs dense attention with bias log(multiplicity):")
    errors = {"out": max_relative_error(out, out_d), "lse": max_relative_error(lse, lse_d)}
    errors.update({name: max_relative_error(g, gd) for name, g, gd in zip(("dq", "dk", "dv"), grads, grads_d)})
    print("  " + "  ".join(f"{name}={err:.2e}" for name, err in errors.items()))
    # Both sides are computed in `dtype`; sums of at most N terms of rounding eps each.
    tolerance = 1e-4 if dtype == np.float32 else 1e-10
    ok = all(err <= tolerance for err in errors.values())
    print(f"{'OK' if ok else 'FAILED'}: every error {'<=' if ok else 'not <='} {tolerance:g}")
    return 0 if ok else 1


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
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        print(f"longnet-ref: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
