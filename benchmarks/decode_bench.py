"""Time per generated token and cache bytes: bounded dilated KV cache vs dense KV cache.

    python benchmarks/decode_bench.py            # positions 1K..1M, paper-like branches (minutes)
    python benchmarks/decode_bench.py --quick    # a seconds-long smoke run (the test suite calls it)

For every position ``P`` both caches are put in the state that decoding positions ``0..P-1``
leaves, then ``--steps`` consecutive steps ``P, P+1, ...`` are timed one by one (after one
untimed warm-up step); the table gives their median, interquartile range and minimum. The
dilated caches of all positions take turns step by step, so a busy machine loads them alike.

Reaching ``P = 2**20`` does not take ``2**20`` steps: ``DilatedKVCache.fill`` builds the state at
``P`` from the rows of the current segments only (the last ``max_i w_i`` positions; a test checks
it equals stepping), and the dense cache is filled with ``P`` rows at once. The dense rows are
one random row repeated (a broadcast view, no memory): the time of a step does not depend on the
values, and drawing gigabytes of random numbers would dominate the run. Dense is measured up to
``--dense-max-position`` or while its cache fits in half the available memory.

Docs: ``docs/decoding.md`` (the recorded table). Times depend on the machine and its load; the
JSON output records the load average and the CPU count next to the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's longnet_ref, not an installed one

from longnet_ref.decode import DenseKVCache, DilatedKVCache

# Paper-like geometric branches (LongNet Table 1 style): w doubles while r doubles, so every
# branch holds ceil(w/r) = 2048 rows per head and the cache is 5 * 2048 rows, at any position.
FULL = {
    "positions": [2**10, 2**13, 2**16, 2**19, 2**20],
    "segment_lengths": [2048, 4096, 8192, 16384, 32768],
    "dilation_rates": [1, 2, 4, 8, 16],
    "num_heads": 8,
    "head_dim": 64,
    "batch": 1,
    "steps": 32,
}
QUICK = {
    "positions": [2**6, 2**9],
    "segment_lengths": [64, 128],
    "dilation_rates": [1, 2],
    "num_heads": 2,
    "head_dim": 16,
    "batch": 1,
    "steps": 4,
}


def available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux), else a conservative 4 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def random_tokens(cache, rng, count):
    """``count`` random ``(q_t, k_t, v_t)`` triples of the cache's sizes, float32."""
    shape = (cache.batch, cache.num_heads)
    dims = (cache.head_dim, cache.head_dim, cache.value_dim)
    return [tuple(rng.standard_normal(shape + (d,), dtype=np.float32) for d in dims) for _ in range(count)]


def time_steps(caches, rng, steps: int) -> list[np.ndarray]:
    """Seconds per step of ``steps`` consecutive steps of every cache, after one untimed warm-up step.

    The caches take turns (step j of every cache, then step j + 1), so that on a busy machine
    every position sees the same load and their medians can be compared.
    """
    tokens = [random_tokens(cache, rng, steps + 1) for cache in caches]
    seconds = [[] for _ in caches]
    for j in range(steps + 1):
        for cache, cache_tokens, times in zip(caches, tokens, seconds):
            begin = time.perf_counter()
            cache.step(*cache_tokens[j])
            if j > 0:
                times.append(time.perf_counter() - begin)
    return [np.array(times) for times in seconds]


def dilated_at(position, config, rng):
    """A ``DilatedKVCache`` in the state of position ``position``, built by ``fill`` from the tail."""
    cache = DilatedKVCache(
        config["batch"],
        config["num_heads"],
        config["head_dim"],
        config["head_dim"],
        config["segment_lengths"],
        config["dilation_rates"],
        dtype=np.float32,
    )
    start = cache.first_needed_position(position)
    shape = (config["batch"], position - start, config["num_heads"], config["head_dim"])  # (B, L, H, D)
    cache.fill(rng.standard_normal(shape, dtype=np.float32), rng.standard_normal(shape, dtype=np.float32), start=start)
    return cache


def dense_at(position, config, rng, steps):
    """A ``DenseKVCache`` at ``position`` with room for the timed steps (no regrowth while timing)."""
    batch, heads, dim = config["batch"], config["num_heads"], config["head_dim"]
    cache = DenseKVCache(batch, heads, dim, dim, dtype=np.float32, capacity=position + steps + 1)
    row = rng.standard_normal((batch, 1, heads, dim), dtype=np.float32)
    rows = np.broadcast_to(row, (batch, position, heads, dim))  # (B, P, H, D), no memory
    cache.fill(rows, rows)
    return cache


def summary(seconds: np.ndarray) -> dict:
    p25, median, p75 = np.percentile(seconds, [25, 50, 75])
    return {"median_s": median, "p25_s": p25, "p75_s": p75, "min_s": seconds.min(), "max_s": seconds.max(), "steps": len(seconds)}


def run(config, dense_max_position, seed=0) -> list[dict]:
    """Dilated at every position (interleaved, one cache per position), then dense position by position."""
    rng = np.random.default_rng(seed)
    positions, steps = config["positions"], config["steps"]
    caches = [dilated_at(position, config, rng) for position in positions]
    rows = [
        {"position": position, "dilated": summary(seconds) | {"cache_bytes": cache.nbytes}}
        for position, cache, seconds in zip(positions, caches, time_steps(caches, rng, steps))
    ]
    del caches
    for row in rows:
        position = row["position"]
        dense_bytes = (position + steps + 1) * config["batch"] * config["num_heads"] * 2 * config["head_dim"] * 4
        if position > dense_max_position:
            row["dense"] = {"skipped": f"position > --dense-max-position={dense_max_position}"}
        elif dense_bytes > available_bytes() / 2:
            row["dense"] = {"skipped": f"needs {dense_bytes / 2**30:.1f} GiB, more than half the available memory"}
        else:
            cache = dense_at(position, config, rng, steps)
            row["dense"] = summary(time_steps([cache], rng, steps)[0]) | {"cache_bytes": cache.nbytes}
            del cache
        print(format_row(row), flush=True)
    return rows


def format_time(seconds) -> str:
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def format_bytes(size) -> str:
    return f"{size / 2**20:,.1f} MiB" if size >= 2**20 else f"{size / 2**10:,.1f} KiB"


def format_row(row) -> str:
    cells = [f"{row['position']:,}"]
    for kind in ("dilated", "dense"):
        result = row[kind]
        if "skipped" in result:
            cells += ["skipped", "—"]
        else:
            cells += [
                f"{format_time(result['median_s'])} [{format_time(result['p25_s'])}, " + f"{format_time(result['p75_s'])}] ({format_time(result['min_s'])})",
                format_bytes(result["cache_bytes"]),
            ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| position t | dilated: time per token, median [IQR] (min) | dilated cache | dense: time per token, median [IQR] (min) | dense cache |\n"
    "| ---: | ---: | ---: | ---: | ---: |"
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration, seconds: a smoke run")
    parser.add_argument("--steps", type=int, help="timed steps per position (default 32; 4 with --quick)")
    parser.add_argument("--positions", type=lambda s: [int(x) for x in s.split(",")], help="comma-separated positions")
    parser.add_argument("--dense-max-position", type=int, default=2**20, help="skip dense beyond this position")
    parser.add_argument(
        "--blas-threads",
        type=int,
        default=1,
        help="BLAS threads (default 1: a step is one matrix-vector product per head, too small to split; "
        "extra threads only add latency jitter on a busy machine)",
    )
    parser.add_argument("--output", default="bench-results/decode.json", help="JSON file for the results")
    args = parser.parse_args(argv)
    config = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        config["steps"] = args.steps
    if args.positions is not None:
        if min(args.positions) < 1:
            parser.error("--positions must be >= 1")
        config["positions"] = args.positions
    load = os.getloadavg()
    print(
        f"branches w={config['segment_lengths']} r={config['dilation_rates']}, H={config['num_heads']}, "
        f"D={config['head_dim']}, B={config['batch']}, float32, {config['steps']} timed steps per position; "
        f"{os.cpu_count()} CPUs, {args.blas_threads} BLAS thread(s), load average {load[0]:.1f}"
    )
    print(HEADER, flush=True)
    with threadpool_limits(args.blas_threads, user_api="blas"):
        rows = run(config, args.dense_max_position)
    first, last = rows[0]["dilated"]["median_s"], rows[-1]["dilated"]["median_s"]
    print(f"dilated median time per token at t={rows[-1]['position']:,} / at t={rows[0]['position']:,}: {last / first:.2f}x")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "config": config,
        "rows": rows,
        "load_average": load,
        "cpu_count": os.cpu_count(),
        "blas_threads": args.blas_threads,
        "numpy": np.__version__,
        "machine": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    output.write_text(json.dumps(record, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
