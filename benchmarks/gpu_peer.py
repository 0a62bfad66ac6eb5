"""GPU peer: PyTorch's scaled_dot_product_attention on the same gathered dilated segments.

For each branch and head offset the sparse segments are gathered (as ``longnet_ref.reference``
does) and passed to ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-
efficient kernels), forward and forward+backward. The mixture and scatter are *not* timed, so
this is a lower bound for a torchscale-style implementation. Run on a GPU machine:

    python benchmarks/gpu_peer.py            # prints a table beside `longnet-ref bench --backend cupy`
"""

from __future__ import annotations

import statistics
import time

import torch

from longnet_ref import complexity
from longnet_ref.bench import PRESETS
from longnet_ref.config import sparse_segments, validate_branches


def gathered_segments(n, heads, segment_lengths, dilation_rates):
    """Index tensors (S, T) per (branch, offset group), for segments whose rows are all valid."""
    groups = []
    for seg in sparse_segments(n, heads, validate_branches(segment_lengths, dilation_rates), "paper"):
        groups.append((torch.as_tensor(seg.positions, device="cuda"), torch.as_tensor(seg.heads, device="cuda")))
    return groups


def run_peer(config, repeats=5):
    torch.manual_seed(0)
    shape = (config.batch, config.n, config.heads, config.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=getattr(torch, config.dtype), requires_grad=True) for _ in range(3))
    groups = gathered_segments(config.n, config.heads, config.segment_lengths, config.dilation_rates)

    def forward():
        outs = []
        for positions, heads in groups:
            # (B, S, T, Hs, D) -> (B*S, Hs, T, D)
            def take(x):
                g = x[:, positions][:, :, :, heads]
                return g.permute(0, 1, 3, 2, 4).reshape(-1, heads.numel(), positions.shape[1], config.dim)
            outs.append(torch.nn.functional.scaled_dot_product_attention(take(q), take(k), take(v), is_causal=config.causal))
        return outs

    def both():
        sum(o.float().sum() for o in forward()).backward()

    def timed(fn):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - start

    both()
    return statistics.median(timed(forward) for _ in range(repeats)), statistics.median(timed(both) for _ in range(repeats))


if __name__ == "__main__":
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'configuration':28s} {'SDPA fwd s':>11s} {'GF/s':>8s} {'SDPA fwd+bwd s':>15s} {'GF/s':>8s}")
    for config in PRESETS["paper"] + PRESETS["lm"]:
        flops = complexity.dilated_flops(config.n, config.heads, config.dim, config.segment_lengths, config.dilation_rates, causal=config.causal).total
        forward_s, both_s = run_peer(config)
        print(f"{config.name:28s} {forward_s:11.4f} {flops / forward_s / 1e9:8.0f} {both_s:15.4f} {3.5 * flops / both_s / 1e9:8.0f}")
