"""CPU peer: torchscale's dilated attention algorithm on PyTorch's CPU attention, against ours.

The best PyTorch CPU alternative a user has (microsoft/torchscale, ``DilatedAttention``), on the
paper-like configuration: B = 1, H = 8, D = 64, w = [2048, 4096, 8192, 16384], r = [1, 2, 4, 8],
float32. Per branch, as torchscale does it:

1. reshape ``(B, N, H, D)`` into segments of ``w`` rows and keep every ``r``-th row with the
   head offset of SPEC §2 (torchscale's rule, ``offsets="torchscale"``: heads in contiguous blocks
   of ``H / r``, each block one offset) -> ``(B S, H, w / r, D)`` (a copy, as in torchscale; the
   benchmark's shapes need none of torchscale's padding);
2. attention on every gathered sparse segment with PyTorch's CPU flash-attention kernel, which
   returns the segment's log-sum-exp;
3. scatter back to ``(B, N, H, D)`` (rows not selected get ``lse = -inf``) and mix the branches by
   their lse (paper Eq. 10): ``out = sum_i softmax_i(lse) o_i``.

**How the lse of SDPA is obtained**: ``torch.nn.functional.scaled_dot_product_attention`` does
not return it, so each segment calls the operator SDPA itself dispatches to on CPU,
``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` (the same kernel, asserted below
to give SDPA's output), which returns ``(out, logsumexp)``. Its autograd formula
differentiates ``out`` only, so, exactly as torchscale, the mixing weights are computed from the
lse under ``torch.no_grad()``: the peer's backward treats them as constants (slightly less work
than our exact gradient, SPEC §5; this favours the peer).

Forward and forward+backward (``autograd``) are timed **interleaved** with ours
(``backend="numba"``, ``offsets="torchscale"``, the same inputs) and with a float32 GEMM-rate
measurement, repeat by repeat, in one process with the same threads (PyTorch's intra-op threads
= Numba's threads = the CPU count). Printed: medians and spreads (min-max) of both sides, our
fraction of the GEMM rate, and the ratio peer time / our time (> 1: we are faster).

    python benchmarks/cpu_peer.py                     # N = 16K and 64K, causal and not, 3 repeats
    python benchmarks/cpu_peer.py --n 16384 --repeats 5 --json peer.json
    python benchmarks/cpu_peer.py --show benchmarks/results/cpu_peer_loaded.json   # a recorded table

Run it from the repository root with the package installed (``pip install -e ".[peer]"``), or
with ``PYTHONPATH=.`` so that this checkout's ``longnet_ref`` is the one measured.

torch is optional (``pip install -e .[peer]``): without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

SEGMENT_LENGTHS = (2048, 4096, 8192, 16384)
DILATION_RATES = (1, 2, 4, 8)
HEADS, DIM = 8, 64
BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 convention)


def check_shapes(n, heads, w, r):
    """The benchmark's shapes need no padding (torchscale pads N to a multiple of w and H to one of
    r with zero rows, which would then be attended as keys): insist on exact multiples."""
    w = min(w, n)
    if n % w or w % r or heads % r:
        raise ValueError(f"the peer needs N % w == w % r == H % r == 0, got N={n}, H={heads}, w={w}, r={r}")


def sparse_view(x, w, r):
    """torchscale's ``gathering``: ``(B, N, H, D)`` -> ``(B S, H, w / r, D)`` sparse segments.

    Row ``s w + t r + j`` goes to the heads of block ``o = j`` (torchscale's offsets: head
    ``o (H / r) + i``), as torchscale's ``dense_to_sparse`` does with a diagonal of a reshape.
    """
    b, n, h, d = x.shape
    w = min(w, n)
    check_shapes(n, h, w, r)
    x = x.reshape(b, n // w, w // r, r, r, h // r, d)  # (B, S, t, row phase j, head block o, i, D)
    x = x.diagonal(dim1=3, dim2=4)  # (B, S, t, i, D, o): the phase equals the head block
    return x.permute(0, 1, 5, 3, 2, 4).reshape(b * (n // w), h, w // r, d)  # (B S, H, T, D), a copy


def dense_view(y, batch, n, w, r, fill):
    """Inverse of :func:`sparse_view`: ``(B S, H, T, D)`` -> ``(B, N, H, D)``, unselected rows = ``fill``."""
    import torch

    _, h, t, d = y.shape
    w = min(w, n)
    full = torch.full((batch, n // w, t, r, r, h // r, d), fill, dtype=y.dtype)  # (B, S, t, j, o, i, D)
    full.diagonal(dim1=3, dim2=4).copy_(y.reshape(batch, n // w, r, h // r, t, d).permute(0, 1, 4, 3, 5, 2))
    return full.reshape(batch, n, h, d)


def flash_with_lse(q, k, v, causal):
    """PyTorch's CPU flash-attention kernel (what SDPA calls on CPU), returning ``(out, lse)``."""
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)
    return out, lse  # (B S, H, T, D), (B S, H, T)


def peer_forward(q, k, v, causal):
    """torchscale's algorithm: gather, flash attention per branch, scatter, mix by lse."""
    import torch

    batch, n = q.shape[:2]
    outs, lses = [], []
    for w, r in zip(SEGMENT_LENGTHS, DILATION_RATES):
        qi, ki, vi = (sparse_view(x, w, r) for x in (q, k, v))
        o, lse = flash_with_lse(qi, ki, vi, causal)
        outs.append(dense_view(o, batch, n, w, r, 0.0))  # (B, N, H, D)
        lses.append(dense_view(lse.unsqueeze(-1), batch, n, w, r, -float("inf")))  # (B, N, H, 1)
    with torch.no_grad():  # torchscale: the mixing weights are constants for autograd
        weights = torch.softmax(torch.stack(lses), dim=0)  # (branches, B, N, H, 1)
    return sum(o * wt for o, wt in zip(outs, weights))


def gemm_gflops(size=2048):
    """float32 GEMM rate now (NumPy, all BLAS threads): best of 2."""
    a, b = (np.random.default_rng(0).standard_normal((size, size), dtype=np.float32) for _ in range(2))
    best = min(_seconds(lambda: a @ b) for _ in range(3))
    return 2 * size**3 / best / 1e9


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_peer_matches_ours(torch, causal):
    """The peer computes dilated attention: equal to ours on a small problem (and SDPA equals the
    flash operator it dispatches to)."""
    from longnet_ref import dilated_attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4096, HEADS, DIM), dtype=np.float32) for _ in range(3))
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    peer = peer_forward(tq, tk, tv, causal).numpy()
    ours = dilated_attention(q, k, v, SEGMENT_LENGTHS, DILATION_RATES, causal=causal, offsets="torchscale", backend="numba")
    np.testing.assert_allclose(peer, ours, rtol=1e-3, atol=1e-4)  # float32, different summation orders
    qi, ki, vi = (sparse_view(x, 2048, 2) for x in (tq, tk, tv))
    sdpa = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, is_causal=causal)
    np.testing.assert_allclose(flash_with_lse(qi, ki, vi, causal)[0].numpy(), sdpa.numpy(), rtol=1e-5, atol=1e-6)


def measure(torch, n, causal, repeats):
    """Interleaved repeats of GEMM, ours and the peer, forward and forward+backward."""
    from longnet_ref import complexity, dilated_attention, dilated_attention_backward

    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, n, HEADS, DIM), dtype=np.float32) for _ in range(4))
    args = (SEGMENT_LENGTHS, DILATION_RATES)
    options = {"causal": causal, "offsets": "torchscale", "backend": "numba"}

    def ours_forward():
        dilated_attention(q, k, v, *args, **options)

    def ours_forward_backward():
        out, lse = dilated_attention(q, k, v, *args, return_lse=True, **options)
        dilated_attention_backward(dout, q, k, v, out, lse, *args, **options)

    tensors = [torch.from_numpy(x) for x in (q, k, v)]
    grad = torch.from_numpy(dout)

    def peer_fwd():
        with torch.no_grad():
            peer_forward(*tensors, causal)

    def peer_forward_backward():
        leaves = [t.clone().requires_grad_() for t in tensors]
        peer_forward(*leaves, causal).backward(grad)

    flops = complexity.dilated_flops(n, HEADS, DIM, *args, causal=causal, offsets="torchscale").total
    samples = {key: [] for key in ("gemm", "ours_fwd", "peer_fwd", "ours_fwdbwd", "peer_fwdbwd")}
    for _ in range(repeats):
        samples["gemm"].append(gemm_gflops())
        samples["ours_fwd"].append(_seconds(ours_forward))
        samples["peer_fwd"].append(_seconds(peer_fwd))
        samples["ours_fwdbwd"].append(_seconds(ours_forward_backward))
        samples["peer_fwdbwd"].append(_seconds(peer_forward_backward))
    fraction = {
        "fwd": [flops / t / 1e9 / g for t, g in zip(samples["ours_fwd"], samples["gemm"])],
        "fwdbwd": [(1 + BACKWARD_FLOP_FACTOR) * flops / t / 1e9 / g for t, g in zip(samples["ours_fwdbwd"], samples["gemm"])],
    }
    return {"n": n, "causal": causal, "flops_forward": flops, "samples": samples, "gemm_fraction": fraction}


def _spread(values):
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def format_rows(rows):
    lines = [
        "| N | causal | GEMM GFLOP/s | pass | ours s | % GEMM | peer s | peer / ours |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        s = row["samples"]
        for name in ("fwd", "fwdbwd"):
            ratios = [p / o for p, o in zip(s[f"peer_{name}"], s[f"ours_{name}"])]  # same repeat
            lines.append(
                f"| {row['n']} | {row['causal']} | {statistics.median(s['gemm']):.0f} | "
                f"{'forward' if name == 'fwd' else 'fwd+bwd'} | {_spread(s[f'ours_{name}'])} | "
                f"{100 * statistics.median(row['gemm_fraction'][name]):.0f} % | {_spread(s[f'peer_{name}'])} | "
                f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536], help="sequence lengths (default: 16384 65536)")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both", help="causal, non-causal or both (default)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per configuration (default: 3)")
    parser.add_argument("--json", help="also write the raw samples to this JSON file")
    parser.add_argument("--show", metavar="JSON", help="only print the table of an earlier run's JSON file (no torch needed)")
    options = parser.parse_args(argv)
    if options.show:
        with open(options.show) as f:
            recorded = json.load(f)
        print(f"torch {recorded['torch']}, {recorded['threads']} threads")
        print(format_rows(recorded["rows"]))
        return 0
    try:
        import torch
    except ImportError:
        print("skipped: PyTorch is not installed (pip install -e '.[peer]' or pip install torch)")
        return 0
    import numba

    from longnet_ref.backends import numba_cpu

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    print(f"torch {torch.__version__}, {threads} threads; numba kernels ready in {numba_cpu.warm_up(np.float32):.1f} s", flush=True)
    causal_values = {"both": (False, True), "yes": (True,), "no": (False,)}[options.causal]
    for causal in causal_values:
        check_peer_matches_ours(torch, causal)
    rows = []
    for n in options.n:
        for causal in causal_values:
            rows.append(measure(torch, n, causal, options.repeats))
            print(f"N = {n}, causal = {causal}: done", file=sys.stderr, flush=True)
    print(format_rows(rows))
    if options.json:
        with open(options.json, "w") as f:
            json.dump({"threads": threads, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
