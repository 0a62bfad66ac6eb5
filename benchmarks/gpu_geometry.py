"""Time the fused kernels (``backend="cupy-fused"``) under alternative launch geometries.

Threads per block, rows per shared tile and a register cap trade occupancy against registers and
synchronisation; this prints forward and forward+backward seconds for each, at the paper
configuration (B = 1, H = 8, D = 64), and the largest difference of each geometry's results
from the default's (the same sums in a different tiling: float32 rounding only).

    PYTHONPATH=$PWD python benchmarks/gpu_geometry.py [--n 65536] [--json geometry.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import cupy

from longnet_ref.backends import cuda_kernels
from longnet_ref.backends.cuda_kernels import Geometry
from longnet_ref.validation import validate_branches

BRANCHES = validate_branches((2048, 4096, 8192, 16384), (1, 2, 4, 8))
GEOMETRIES = [
    Geometry(),
    Geometry(block=64),
    Geometry(tile=32),
    Geometry(max_registers=168),
    Geometry(max_registers=128),
    Geometry(block=64, tile=32, max_registers=168),
]


def seconds(fn, repeats=3):
    fn()
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        fn()
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(geometry, causal, q, k, v, dout):
    """(forward s, forward+backward s, results) of the fused kernels under ``geometry``."""

    def forward():
        return cuda_kernels.forward(cupy, q, k, v, BRANCHES, causal, 0.125, "paper", geometry)

    def both():
        out, lse = forward()
        return out, lse, *cuda_kernels.backward(cupy, dout, q, k, v, out, lse, BRANCHES, causal, 0.125, "paper", geometry)

    return seconds(forward), seconds(both), both()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    rng = cupy.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, args.n, 8, 64), dtype=cupy.float32) for _ in range(4))
    rows = []
    print(f"{'geometry':70s} {'causal':6s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'max |diff|':>11s}", flush=True)
    for causal in (False, True):
        reference = None
        for geometry in GEOMETRIES:
            row = {"geometry": geometry._asdict(), "causal": causal}
            try:
                row["forward_s"], row["forward_backward_s"], results = measure(geometry, causal, q, k, v, dout)
                reference = results if reference is None else reference
                row["max_diff"] = max(float(cupy.abs(a - b).max()) for a, b in zip(results, reference))
                print(f"{geometry!s:70s} {causal!s:6s} {row['forward_s']:8.4f} {row['forward_backward_s']:10.4f} {row['max_diff']:11.2e}", flush=True)
            except Exception as error:  # noqa: BLE001 - a geometry that cannot launch is reported, not fatal
                row["error"] = f"{type(error).__name__}: {str(error)[:160]}"
                print(f"{geometry!s:70s} {causal!s:6s} {row['error']}", flush=True)
            rows.append(row)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
