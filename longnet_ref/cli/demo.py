"""``longnet-ref demo``: dilated attention forward + backward, checked against the dense oracle."""

from __future__ import annotations

import argparse
import time

import numpy as np

from .. import complexity
from ..attention import dilated_attention, dilated_attention_backward
from ..dense import dense_attention, dense_attention_backward
from ..multiplicity import multiplicity, multiplicity_bias
from ..validation import validate_branches
from .memory import demo_bytes, refuse_if_too_big
from .options import EXIT_FAILED, int_list, non_negative_int, positive_int

HELP = "forward + backward of dilated attention, checked against dense attention"
DESCRIPTION = "Run dilated attention forward and backward on random inputs, time it, and check it against dense attention with bias log(multiplicity)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=positive_int, default=4096, help="sequence length N")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size B")
    p.add_argument("--heads", type=positive_int, default=4, help="number of heads H")
    p.add_argument("--dim", type=positive_int, default=32, help="head dimension D")
    p.add_argument("--segment-lengths", type=int_list, default=[256, 512, 1024], metavar="W1,W2,...", help="segment length w_i of each branch, comma-separated")
    p.add_argument(
        "--dilation-rates",
        type=int_list,
        default=[1, 2, 4],
        metavar="R1,R2,...",
        help="dilation r_i of each branch, comma-separated (as many as segment lengths)",
    )
    p.add_argument("--causal", action="store_true", help="causal attention: keys at positions <= the query's only")
    p.add_argument(
        "--offsets", choices=["paper", "torchscale"], default="paper", help="head offsets: paper (h mod r) or torchscale (contiguous blocks of heads)"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="floating-point type of the inputs")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random inputs")
    p.add_argument("--backend", choices=["numba", "numpy"], default="numba", help="the backend checked and timed")


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_relative_error(result: np.ndarray, oracle: np.ndarray) -> float:
    """``max |result - oracle| / max(max |oracle|, 1)`` over all elements, the demo's check.

    The inputs are unit normal, so every output is O(1) unless it vanishes: a gradient that is
    exactly 0 in theory (a row that attends only itself has ``dq = 0``) is compared absolutely,
    not by its rounding error relative to its own ~1e-17 size. Equal infinities (``lse = -inf``
    of a row no branch covers, in both) are no error; an infinity on one side only, or a NaN, is.

    Args:
        result: Any shape, float32 or float64.
        oracle: The shape of ``result`` (or broadcastable to it), a float dtype.

    Returns:
        The error as a Python ``float``; ``0.0`` for an empty ``oracle``. A NaN in either array
        gives NaN, which fails every ``<=`` tolerance.

    Raises:
        ValueError: The shapes do not broadcast.
    """
    if not oracle.size:
        return 0.0
    with np.errstate(invalid="ignore"):  # inf - inf where both are the same infinity: masked just below
        difference = np.where(result == oracle, 0.0, np.abs(result - oracle))
    finite = np.abs(oracle[np.isfinite(oracle)])
    return float(difference.max() / max(finite.max() if finite.size else 0.0, 1.0))


def run(args: argparse.Namespace) -> int:
    """Dilated attention forward + backward, verified against the dense oracle with ``log m`` bias (SPEC §4).

        dilated_attention(Q, K, V) = dense_attention(Q, K, V, bias = log m)

    Prints the attended pairs and FLOPs against dense attention, the times, and the largest
    error of ``out``, ``lse``, ``dq``, ``dk``, ``dv`` of each backend (:func:`max_relative_error`); float32 passes
    at ``1e-4``, float64 at ``1e-10``.

    Args:
        args: The parsed ``demo`` options: ``n``, ``batch``, ``heads``, ``dim``,
            ``segment_lengths``, ``dilation_rates``, ``causal``, ``offsets``, ``dtype``,
            ``seed``, ``backend``.

    Returns:
        ``0`` if every error is within the tolerance, else ``EXIT_FAILED`` (1).

    Raises:
        ValueError: The configuration is invalid (SPEC §7); [`main`][longnet_ref.cli.main]
            prints it and exits with status 2.
        UsageError: The arrays would not fit in the available memory (checked before any is made).
        ImportError: ``--backend numba`` without Numba; ``main`` exits with status 3.
    """
    w, r = args.segment_lengths, args.dilation_rates
    dtype = np.dtype(args.dtype)
    validate_branches(w, r)  # a bad configuration is named before any array is drawn
    backends = [args.backend] + (["numpy"] if args.backend != "numpy" else [])
    refuse_if_too_big(
        demo_bytes(args.batch, args.n, args.heads, args.dim, dtype.itemsize, len(backends)),
        f"demo --n {args.n} --batch {args.batch} --heads {args.heads} --dim {args.dim}",
        "lower --n (the dense oracle grows as N^2), --batch, --heads or --dim",
    )
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.n, args.heads, args.dim)  # (B, N, H, D)
    q, k, v, dout = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    options = dict(causal=args.causal, offsets=args.offsets)

    print(f"longnet_ref demo: B={args.batch} N={args.n} H={args.heads} D={args.dim} w={w} r={r} causal={args.causal} offsets={args.offsets} dtype={dtype}")
    timings, results = {}, {}
    for backend in backends:
        if backend == "numba":  # compile (first run only) or load the cached kernels, outside the timing
            from ..backends.numba_cpu import warm_up

            seconds = warm_up()  # both dtypes: a later float32 (or float64) call does not compile silently
            print(f"numba kernels (forward and backward, float32 and float64) ready in {seconds:.1f} s (compiled on the first run, then loaded from the cache)")
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
        print(f"max error of {backend} vs dense attention with bias log(multiplicity), relative to max(|oracle|, 1):")
        print("  " + "  ".join(f"{name}={err:.2e}" for name, err in errors.items()))
    print(f"{'OK' if ok else 'FAILED'}: every error {'<=' if ok else 'not <='} {tolerance:g}")
    return 0 if ok else EXIT_FAILED
