"""Whole dilated attention on a GPU: our two paths against PyTorch peers, forward and forward+backward.

One command prints, for the paper configuration (B = 1, H = 8, D = 64, w = 2048..16384,
r = 1, 2, 4, 8) at N = 16K and 64K, float32 and float16, causal and not:

- ours, ``backend="cupy"`` (the reference on CuPy: cuBLAS GEMMs per chunk of sparse segments),
  ``backend="cupy-fused"`` (the Numba-CUDA kernels) and, for float16/bfloat16,
  ``backend="cupy-tensor-core"`` (the CUDA C++ wmma kernels), on CuPy arrays;
- **SDPA on segments**: a torchscale-like dilated attention in PyTorch with the same gather,
  scatter and mixture, each sparse segment's attention by PyTorch's fused attention kernels
  (flash for float16, memory-efficient for float32), which also return the log-sum-exp the
  mixture needs. Only valid rows are gathered: full segments in one batch, a short last segment
  with its own rows (no padding enters any softmax, as in ours). As in torchscale, the mixture
  weights are not differentiated (the peer's backward does slightly less work than ours);
- **dense SDPA**: PyTorch's attention over the whole sequence, where it fits.

TFLOP/s count the attended pairs' work (``longnet_ref.complexity``: 4 N_pairs D forward,
2.5x that backward); ``x peer`` is the peer's time over ours (above 1: ours is faster).

    PYTHONPATH=$PWD python benchmarks/gpu_peer.py [--n 16384 65536] [--dtype float32 float16 bfloat16]
        [--causal no yes] [--repeats 3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
import warnings

import numpy as np
import torch

from longnet_ref import complexity, dilated_attention, dilated_attention_backward
from longnet_ref.index_sets import sparse_segments
from longnet_ref.validation import validate_branches

PAPER = {"segment_lengths": (2048, 4096, 8192, 16384), "dilation_rates": (1, 2, 4, 8)}
BATCH, HEADS, DIM = 1, 8, 64
BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 convention)


def segment_blocks(n, heads, segment_lengths, dilation_rates, device):
    """Per (branch, offset group): the heads and blocks of positions ``(S, T)`` holding only valid rows.

    Valid rows of a sparse segment are a prefix (``t < count``): the full segments of a group
    form one ``(S, T)`` block, a shorter (last) segment its own ``(1, count)`` block.
    """
    groups = []
    for seg in sparse_segments(n, heads, validate_branches(segment_lengths, dilation_rates), "paper"):
        counts = seg.valid.sum(axis=1)  # (S,) rows of each segment
        full = counts == seg.valid.shape[1]
        blocks = [seg.positions[full]] if full.any() else []
        blocks += [seg.positions[s : s + 1, : counts[s]] for s in np.flatnonzero(~full & (counts > 0))]
        assert all(b.size and (b < n).all() for b in blocks)
        heads_t = torch.as_tensor(seg.heads, device=device)
        groups.append((seg.branch, heads_t, [torch.as_tensor(b, device=device) for b in blocks]))
    return groups


FALLBACK = []  # set when PyTorch's fused kernels with lse are unavailable: the math path is used


def attention_with_lse(q, k, v, causal):
    """Attention of ``(batch, heads, T, D)`` blocks by PyTorch's fused kernels, with the (undifferentiated) lse.

    The fused kernels return the lse the mixture needs only through their ``aten`` ops; where
    those fail, the math path (scores materialised) is used and the table says so.
    """
    if not FALLBACK:
        try:
            if q.dtype in (torch.float16, torch.bfloat16):
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
            else:  # no float32 flash kernel; the memory-efficient one pads lse to 32 rows
                out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal)[:2]
            return out, lse[..., : q.shape[2]].float()
        except Exception as error:  # noqa: BLE001
            FALLBACK.append(f"{type(error).__name__}: {str(error)[:120]}")
            print(f"fused SDPA with lse unavailable, math path from now on: {FALLBACK[0]}", file=sys.stderr)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (batch, heads, T, T)
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype), lse.detach()


def gather(x, positions, heads):
    """Sparsify: ``x (B, N, H, D)`` at ``positions (S, T)`` and ``heads (Hs,)`` -> ``(B S, Hs, T, D)``."""
    rows = x[:, positions][:, :, :, heads]  # (B, S, T, Hs, D)
    batch, s, t, hs, dim = rows.shape
    return rows.permute(0, 1, 3, 2, 4).reshape(batch * s, hs, t, dim)


def peer_dilated_attention(q, k, v, groups, num_branches, causal):
    """Dilated attention by SDPA per sparse segment: gather, attend, scatter, mix (paper Eqs. 3-10)."""
    batch, n, heads, dim = q.shape
    outs = [q.new_zeros((batch, n, heads, dim)) for _ in range(num_branches)]
    lses = [q.new_full((batch, n, heads), -math.inf, dtype=torch.float32) for _ in range(num_branches)]
    b_index = torch.arange(batch, device=q.device)[:, None, None, None]
    for branch, group_heads, blocks in groups:
        hs = group_heads.numel()
        for positions in blocks:  # (S, T)
            s, t = positions.shape
            qs, ks, vs = (gather(x, positions, group_heads) for x in (q, k, v))  # (B S, Hs, T, D)
            o, lse = attention_with_lse(qs, ks, vs, causal)
            where = (b_index, positions[None, :, :, None], group_heads[None, None, None, :])  # (B, S, T, Hs)
            outs[branch] = outs[branch].index_put(where, o.reshape(batch, s, hs, t, dim).permute(0, 1, 3, 2, 4))
            lses[branch] = lses[branch].index_put(where, lse.reshape(batch, s, hs, t).permute(0, 1, 3, 2))
    lse_all = torch.stack(lses)  # (k, B, N, H)
    with torch.no_grad():  # as torchscale: mixture weights from the detached lse
        total = torch.logsumexp(lse_all, dim=0)
        alpha = torch.nan_to_num(torch.exp(lse_all - total), nan=0.0)  # uncovered rows: 0
    return sum(a[..., None].to(o.dtype) * o for a, o in zip(alpha, outs))


def synchronize():
    torch.cuda.synchronize()
    try:
        import cupy

        cupy.cuda.Device().synchronize()
    except ImportError:
        pass


def median_seconds(fn, repeats):
    fn()  # warm-up: JIT compiles, cuBLAS plans, memory pools
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
        if times[-1] > 2.0:  # a slow path: one timed run is enough
            break
    return statistics.median(times)


def ours(n, dtype, causal, backend, repeats):
    import cupy

    branches = (PAPER["segment_lengths"], PAPER["dilation_rates"])
    if dtype == "bfloat16":  # CuPy holds bfloat16 through ml_dtypes
        import ml_dtypes

        dtype = ml_dtypes.bfloat16
    rng = cupy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((BATCH, n, HEADS, DIM), dtype=cupy.float32).astype(dtype) for _ in range(4))

    def forward():
        return dilated_attention(q, k, v, *branches, causal=causal, backend=backend, return_lse=True)

    def forward_backward():
        out, lse = forward()
        return dilated_attention_backward(dout, q, k, v, out, lse, *branches, causal=causal, backend=backend)

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def torch_inputs(n, dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn((BATCH, n, HEADS, DIM), device="cuda", dtype=getattr(torch, dtype), generator=generator).requires_grad_(i < 3) for i in range(4)]


def peer(n, dtype, causal, repeats):
    q, k, v, dout = torch_inputs(n, dtype)
    groups = segment_blocks(n, HEADS, PAPER["segment_lengths"], PAPER["dilation_rates"], "cuda")
    branches = len(PAPER["segment_lengths"])

    def forward():
        with torch.no_grad():
            return peer_dilated_attention(q, k, v, groups, branches, causal)

    def forward_backward():
        q.grad = k.grad = v.grad = None
        peer_dilated_attention(q, k, v, groups, branches, causal).backward(dout)

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def dense(n, dtype, causal, repeats):
    q, k, v, dout = (x.transpose(1, 2) for x in torch_inputs(n, dtype))  # (B, H, N, D)

    def forward():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def forward_backward():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

    return median_seconds(forward, repeats), median_seconds(forward_backward, repeats)


def measure(name, fn, *args):
    """(forward s, forward+backward s), or the error as text: one failing path does not stop the table."""
    try:
        return fn(*args), None
    except Exception as error:  # noqa: BLE001 - reported in the table and the JSON
        traceback.print_exc(file=sys.stderr)
        return (math.nan, math.nan), f"{name}: {type(error).__name__}: {str(error)[:200]}"
    finally:  # the inputs of the measured path are gone: give their memory back to the device
        torch.cuda.empty_cache()
        try:
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
        except ImportError:
            pass


def run(ns, dtypes, causals, repeats, save=lambda rows: None):
    """Measure every (N, dtype, causal); ``save(rows)`` after each, so a cut-off run keeps what it measured."""
    rows = []
    for n in ns:
        for dtype in dtypes:
            for causal in causals:
                flops = complexity.dilated_flops(n, HEADS, DIM, *PAPER.values(), causal=causal, batch=BATCH).total
                dense_flops = complexity.dense_flops(n, HEADS, DIM, causal=causal, batch=BATCH).total
                peer_times, peer_error = measure("sdpa-segments", peer, n, dtype, causal, repeats)
                paths = [("ours cupy (reference)", ours, ("cupy",))]
                if dtype != "bfloat16":  # the Numba kernels take no bfloat16
                    paths.append(("ours cupy-fused", ours, ("cupy-fused",)))
                if dtype in ("float16", "bfloat16"):  # the tensor-core kernels take half precision only
                    paths.append(("ours cupy-tensor-core", ours, ("cupy-tensor-core",)))
                for path, fn, extra in paths:
                    times, error = measure(path, fn, n, dtype, causal, *extra, repeats)
                    rows.append(row(n, dtype, causal, path, times, flops, peer_times, error))
                label = "SDPA on segments (peer)" if not FALLBACK else "segments, math path (peer)"
                rows.append(row(n, dtype, causal, label, peer_times, flops, peer_times, peer_error))
                times, error = measure("dense", dense, n, dtype, causal, repeats)
                rows.append(row(n, dtype, causal, "torch dense SDPA", times, dense_flops, peer_times, error))
                print_row(rows[-(len(paths) + 2) :])
                save(rows)
    return rows


def row(n, dtype, causal, path, times, flops, peer_times, error):
    forward, both = times
    return {
        "n": n, "dtype": dtype, "causal": causal, "path": path, "error": error,
        "forward_s": forward, "forward_backward_s": both,
        "forward_tflops": flops / forward / 1e12, "forward_backward_tflops": (1 + BACKWARD_FLOP_FACTOR) * flops / both / 1e12,
        "forward_x_peer": peer_times[0] / forward, "forward_backward_x_peer": peer_times[1] / both,
    }  # fmt: skip


HEADER = f"{'N':>6} {'dtype':8} {'causal':6} {'path':26} {'fwd s':>9} {'TF/s':>6} {'x peer':>7} {'fwd+bwd s':>10} {'TF/s':>6} {'x peer':>7}"


def print_row(rows):
    for r in rows:
        print(
            f"{r['n']:>6} {r['dtype']:8} {r['causal']!s:6} {r['path']:26} {r['forward_s']:9.4f} {r['forward_tflops']:6.2f} "
            f"{r['forward_x_peer']:7.2f} {r['forward_backward_s']:10.4f} {r['forward_backward_tflops']:6.2f} {r['forward_backward_x_peer']:7.2f}"
            + (f"  [{r['error']}]" if r["error"] else ""),
            flush=True,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536], help="sequence lengths (default: 16384 65536)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16", "bfloat16"], choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--causal", nargs="+", default=["no", "yes"], choices=["no", "yes"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, after one warm-up (default: 3)")
    parser.add_argument("--json", help="also write the rows and the machine to this JSON file")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # Numba's low-occupancy notes on small grids
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    try:
        import cupy

        machine["cupy"] = cupy.__version__
    except ImportError:
        pass
    print(" ".join(f"{k}={v}" for k, v in machine.items()))
    print(HEADER)

    def save(rows):
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine, "configuration": {"B": BATCH, "H": HEADS, "D": DIM, **PAPER}, "rows": rows}, f, indent=1)

    run(args.n, args.dtype, [c == "yes" for c in args.causal], args.repeats, save)


if __name__ == "__main__":
    main()
