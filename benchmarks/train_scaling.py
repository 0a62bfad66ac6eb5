"""Weak scaling of sequence-parallel training: tokens per rank fixed, P = 1, 2, 4 ranks (issue 19, section 4).

One command runs every P (each under ``mpiexec -n P``), writes the JSON and draws the docs' figure:

    python benchmarks/train_scaling.py --json benchmarks/results/train_scaling.json \\
        --plot docs/figures/train_scaling.png

(``--plot-only`` redraws the figure from an existing JSON.) Each rank holds ``L = --tokens-per-rank``
positions of one sequence of ``N = P L`` and runs ``parallel.loss_and_grads`` + clipping + AdamW,
single-threaded (one BLAS thread, one Numba thread), ``--repeats`` times after one warm-up step.
Per step and per rank it records:

- the wall time (median) and the wall time per token of the whole sequence;
- the bytes of the attention exchange (sent and received, forward and backward, every layer) and
  the size of the one all-reduced gradient buffer;
- the peak resident memory (``ru_maxrss``) after the steps, and before the first step (the
  interpreter, NumPy, the compiled Numba kernels): their difference is what the step adds.

Bytes and memory do not depend on the machine's load; the time does (``os.getloadavg`` is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from train_bench import add_model_arguments, model_config  # after the path: it imports longnet_ref


def worker(args) -> None:
    """One rank of one P: time the steps, count the bytes; rank 0 prints every rank's record as JSON."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    import numba
    from mpi4py import MPI

    from longnet_ref import model as lm
    from longnet_ref import parallel
    from longnet_ref.backends.numba_cpu import warm_up
    from longnet_ref.train import AdamW, TrainConfig, clip_by_global_norm

    numba.set_num_threads(1)
    warm_up(np.dtype(args.dtype))
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    config = model_config(args, backend="numba")
    params = lm.init_params(config)
    optimizer, tc = AdamW.zeros_like(params), TrainConfig()
    length, n = args.tokens_per_rank, args.tokens_per_rank * size
    rng = np.random.default_rng(0)  # the same sequence on every rank; each keeps its chunk
    tokens = rng.integers(0, config.vocab_size, (args.batch, n + 1))
    local_tokens = parallel.chunk(tokens[:, :-1], comm)
    local_targets = parallel.chunk(tokens[:, 1:], comm)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        loss, grads, stats = parallel.loss_and_grads(config, params, local_tokens, local_targets, comm=comm, return_stats=True)
        grads, _ = clip_by_global_norm(grads, tc.clip)
        optimizer.step(params, grads, 1e-4, tc)
        return stats

    stats = step()  # warm-up: first allocations, sub-communicators
    times = []
    for _ in range(args.repeats):
        comm.Barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    record = {
        "rank": rank,
        "seconds": statistics.median(times),
        "attention_bytes_sent": stats.attention.bytes_sent,
        "attention_bytes_received": stats.attention.bytes_received,
        "allreduce_bytes": stats.allreduce_bytes,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "baseline_rss_mib": baseline_kib / 1024,
    }
    records = comm.gather(record)
    if rank == 0:
        step_seconds = max(r["seconds"] for r in records)
        print(
            json.dumps(
                {
                    "P": size,
                    "N": n,
                    "tokens_per_rank": length,
                    "batch": args.batch,
                    "step_seconds": step_seconds,
                    "us_per_token": 1e6 * step_seconds / (args.batch * n),
                    "parameters": sum(p.size for p in params.values()),
                    "ranks": records,
                    "loadavg_1min": os.getloadavg()[0],
                }
            )
        )


def run_all(args) -> list[dict]:
    """``mpiexec -n P`` this script as a worker, for every P; the rows rank 0 printed."""
    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if mpiexec is None:
        sys.exit("train_scaling: no mpiexec: install the mpi extra (pip install 'longnet-ref[mpi]')")
    forwarded = [f"--{k.replace('_', '-')}" for k in ("tokens_per_rank", "batch", "d_model", "layers", "heads", "dtype", "repeats")]
    rows = []
    for size in args.ranks:
        command = [mpiexec, "-n", str(size), sys.executable, __file__, "--worker"]
        for flag in forwarded:
            command += [flag, str(getattr(args, flag[2:].replace("-", "_")))]
        command += ["--segment-lengths", *map(str, args.segment_lengths), "--dilation-rates", *map(str, args.dilation_rates)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"train_scaling: P = {size} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row) -> str:
    mine = row["ranks"]
    return (
        f"P={row['P']} N={row['N']:6d}  step {row['step_seconds']:7.2f} s  {row['us_per_token']:7.1f} us/token  "
        f"attention recv/rank {max(r['attention_bytes_received'] for r in mine):>11,d} B  "
        f"all-reduce {mine[0]['allreduce_bytes']:>9,d} B  peak RSS {max(r['peak_rss_mib'] for r in mine):7.1f} MiB  "
        f"(load {row['loadavg_1min']:.1f})"
    )


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    ranks = [r["P"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    axes[0].plot(ranks, [r["us_per_token"] * r["P"] for r in rows], "o-")
    axes[0].set_ylabel("step time per token of a rank [us]")
    axes[0].set_title("time (shared 2-core CPU: P ranks share 2 cores)", fontsize=8)
    worst = lambda r, key: max(x[key] for x in r["ranks"])
    axes[1].plot(ranks, [worst(r, "attention_bytes_received") / 2**20 for r in rows], "o-", label="attention exchange, received")
    axes[1].plot(ranks, [worst(r, "attention_bytes_sent") / 2**20 for r in rows], "s--", label="attention exchange, sent")
    axes[1].plot(ranks, [r["ranks"][0]["allreduce_bytes"] / 2**20 for r in rows], "^-", label="all-reduced gradient buffer")
    axes[1].set_ylabel("MiB per rank per step")
    axes[1].set_title("bytes per rank", fontsize=8)
    axes[1].legend(fontsize=7)
    axes[2].plot(ranks, [worst(r, "peak_rss_mib") for r in rows], "o-", label="peak RSS")
    axes[2].plot(ranks, [worst(r, "peak_rss_mib") - worst(r, "baseline_rss_mib") for r in rows], "s--", label="peak RSS - before the first step")
    axes[2].set_ylabel("MiB per rank")
    axes[2].set_title("memory per rank", fontsize=8)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(ranks)
        ax.set_xticklabels([f"P={r['P']}\nN={r['N'] // 1024}K" for r in rows])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(result["title"], fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--tokens-per-rank", type=int, default=16384)
    add_model_arguments(p, d_model=64, segment_lengths=[2048, 8192, 32768], dilation_rates=[1, 2, 8])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="draw the figure here (PNG), from the rows")
    p.add_argument("--plot-only", action="store_true", help="redraw --plot from an existing --json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.plot_only:
        plot(json.loads(Path(args.json).read_text()), args.plot)
        return 0
    rows = run_all(args)
    title = (
        f"L={args.layers} C={args.d_model} H={args.heads} B={args.batch} {args.dtype} numba, 1 thread per rank; "
        f"w={args.segment_lengths} r={args.dilation_rates}; {args.tokens_per_rank} tokens per rank"
    )
    result = {"title": title, "command": " ".join(["python", "benchmarks/train_scaling.py", *(argv or sys.argv[1:])]), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
