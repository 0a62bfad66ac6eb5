"""Benchmarks: every figure is a ratio to something measured in the same run.

These machines are shared and noisy, so a time alone means little. Each configuration reports

- forward and forward+backward time (median of ``repeats`` runs, after a warm-up that also
  compiles the kernels),
- GFLOP/s from ``longnet_ref.complexity`` (forward: 2 (D + Dv) per attended pair, i.e. 4 D;
  backward counted as 2.5x the forward, the FlashAttention convention),
- the fraction of this machine's GEMM rate, measured in the same run (best of a few
  2048 x 2048 products of the same dtype),
- speed-ups over the NumPy reference and over dense attention (timed on one head and scaled by
  ``B * H``, exact for dense attention's per-head cost) where those fit in memory,
- optionally peak memory, measured in a fresh subprocess: the kernel's peak-RSS mark (``VmHWM``),
  reset after loading the kernels, over the bytes of q, k, v, dout, out, lse, dq, dk, dv.

Docs: ``docs/numba.md`` (results) and ``docs/complexity.md``.
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import complexity
from .attention import dilated_attention, dilated_attention_backward
from .dense import dense_attention, dense_attention_backward

BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 convention)


@dataclass(frozen=True)
class Config:
    name: str
    n: int
    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    batch: int = 1
    heads: int = 8
    dim: int = 64
    causal: bool = False
    dtype: str = "float32"


PAPER_BRANCHES = dict(segment_lengths=(2048, 4096, 8192, 16384), dilation_rates=(1, 2, 4, 8))
LM_BRANCHES = dict(segment_lengths=(2048, 4096, 8192, 16384, 32768), dilation_rates=(1, 2, 4, 6, 12))

PRESETS = {
    "quick": [Config("quick", 4096, (256, 512, 1024), (1, 2, 4), heads=4, dim=64)],
    "paper": [
        Config(f"paper N={n}{' causal' if causal else ''}", n, causal=causal, **PAPER_BRANCHES)
        for n in (16384, 65536)
        for causal in (False, True)
    ],
    "lm": [Config(f"paper LM N={n}", n, **LM_BRANCHES) for n in (32768, 65536)],
    "sweep": [Config(f"sweep N=2^{e}", 2**e, heads=4, **PAPER_BRANCHES) for e in range(14, 21)],
}


@dataclass
class Result:
    config: Config
    backend: str
    gemm_gflops: float
    forward_s: float
    forward_backward_s: float
    forward_flops: int
    forward_fraction: float = 0.0  # median over repeats of (GFLOP/s / GEMM GFLOP/s measured just before)
    forward_backward_fraction: float = 0.0
    reference_forward_s: float | None = None
    reference_forward_backward_s: float | None = None
    dense_forward_s: float | None = None
    dense_forward_backward_s: float | None = None
    peak_memory_ratio: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def forward_gflops(self):
        return self.forward_flops / self.forward_s / 1e9

    @property
    def forward_backward_gflops(self):
        return (1 + BACKWARD_FLOP_FACTOR) * self.forward_flops / self.forward_backward_s / 1e9

    def as_dict(self):
        row = asdict(self)
        row.update(
            forward_gflops=self.forward_gflops,
            forward_backward_gflops=self.forward_backward_gflops,
            time_per_token_us=self.forward_backward_s / self.config.n * 1e6,
        )
        return row


def gemm_gflops(dtype, size=2048, repeats=5, backend="numba") -> float:
    """The matrix-multiply rate now: best of ``repeats`` square products (on the GPU for cupy)."""
    size = 8192 if backend == "cupy" else size  # a GPU needs a larger product to reach its rate
    a, b = _gemm_operands(np.dtype(dtype), size, backend)
    a @ b
    best = min(_seconds(lambda: a @ b, backend) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


@functools.lru_cache(maxsize=4)
def _gemm_operands(dtype, size, backend):
    """Made once: ``interleaved`` measures the GEMM rate before every repeat."""
    rng = np.random.default_rng(0)
    return tuple(_to_device(rng.standard_normal((size, size)).astype(dtype), backend) for _ in range(2))


def _to_device(x, backend):
    if backend != "cupy":
        return x
    import cupy

    return cupy.asarray(x)


def _seconds(fn, backend="numba") -> float:
    """Wall time of ``fn()``; for the GPU, from a synchronised start to a synchronised end."""
    sync = (lambda: None) if backend != "cupy" else __import__("cupy").cuda.Device().synchronize
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _median_seconds(fn, repeats, backend="numba") -> float:
    return statistics.median(_seconds(fn, backend) for _ in range(repeats))


def _inputs(config: Config, heads=None, batch=None, backend="numpy"):
    rng = np.random.default_rng(0)
    shape = (batch or config.batch, config.n, heads or config.heads, config.dim)  # (B, N, H, D)
    return tuple(_to_device(rng.standard_normal(shape, dtype=np.float32).astype(config.dtype), backend) for _ in range(4))


def _forward_backward(q, k, v, dout, config, backend):
    args = (config.segment_lengths, config.dilation_rates)
    out, lse = dilated_attention(q, k, v, *args, causal=config.causal, backend=backend, return_lse=True)
    return dilated_attention_backward(dout, q, k, v, out, lse, *args, causal=config.causal, backend=backend)


def interleaved(fn, flops, repeats, dtype, backend="numba"):
    """Median time of ``fn``, median of ``(flops / time) / GEMM rate``, and median GEMM rate over
    ``repeats`` runs, each preceded by its own GEMM measurement: load that drifts during a
    configuration (a shared machine) moves numerator and denominator together."""
    times, fractions, rates = [], [], []
    for _ in range(repeats):
        rates.append(gemm_gflops(dtype, repeats=2, backend=backend))
        times.append(_seconds(fn, backend))
        fractions.append(flops / times[-1] / 1e9 / rates[-1])
    return statistics.median(times), statistics.median(fractions), statistics.median(rates)


def time_dilated(config: Config, backend: str, repeats: int, flops: int = 0):
    """Forward and forward+backward: ``(seconds, fraction of GEMM, GEMM GFLOP/s)`` for each."""
    if backend == "numba":  # compile / load every kernel outside the timing
        from .backends.numba_cpu import warm_up

        warm_up(np.dtype(config.dtype))
    small = Config(config.name, min(config.n, 4096), config.segment_lengths, config.dilation_rates, 1, 1, config.dim, config.causal, config.dtype)
    _forward_backward(*_inputs(small, backend=backend), small, backend)  # GPU kernels compile per dtype on first use
    q, k, v, dout = _inputs(config, backend=backend)
    args = (config.segment_lengths, config.dilation_rates)
    forward = lambda: dilated_attention(q, k, v, *args, causal=config.causal, backend=backend)
    both = lambda: _forward_backward(q, k, v, dout, config, backend)
    return (
        interleaved(forward, flops, repeats, config.dtype, backend),
        interleaved(both, (1 + BACKWARD_FLOP_FACTOR) * flops, repeats, config.dtype, backend),
    )


def time_dense_one_head(config: Config, repeats: int):
    """Dense attention timed on one (batch, head) and scaled by ``B * H``."""
    q, k, v, dout = _inputs(config, heads=1, batch=1)

    def both():
        out, lse = dense_attention(q, k, v, causal=config.causal, return_lse=True)
        dense_attention_backward(dout, q, k, v, out, lse, causal=config.causal)

    forward = _median_seconds(lambda: dense_attention(q, k, v, causal=config.causal), repeats)
    return forward * config.batch * config.heads, _median_seconds(both, repeats) * config.batch * config.heads


PEAK_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from longnet_ref import dilated_attention, dilated_attention_backward

    def status(field):  # kB, from the kernel's own accounting
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])

    c = json.loads(sys.argv[1])
    w, r = c["segment_lengths"], c["dilation_rates"]
    tiny = np.zeros((1, 8, 1, c["dim"]), c["dtype"])
    o, l = dilated_attention(tiny, tiny, tiny, w, r, backend=c["backend"], return_lse=True)  # load kernels
    dilated_attention_backward(o, tiny, tiny, tiny, o, l, w, r, backend=c["backend"])
    baseline = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0)
    shape = (c["batch"], c["n"], c["heads"], c["dim"])
    q, k, v, dout = (np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(c["dtype"]) for _ in range(4))
    out, lse = dilated_attention(q, k, v, w, r, causal=c["causal"], backend=c["backend"], return_lse=True)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, w, r, causal=c["causal"], backend=c["backend"])
    arrays = (q, k, v, dout, out, lse, *grads)
    print(json.dumps({"peak_kib": status("VmHWM") - baseline, "array_kib": sum(a.nbytes for a in arrays) / 1024}))
    """
)


def peak_memory_ratio(config: Config, backend: str) -> float:
    """Peak resident memory of forward + backward over the bytes of q, k, v, out, lse, dout, dq, dk, dv."""
    settings = dict(asdict(config), backend=backend)
    result = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_SCRIPT, json.dumps(settings)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["peak_kib"] / measured["array_kib"]


def run(configs, backend="numba", repeats=3, reference_max_n=16384, dense_max_n=16384, memory=False, progress=True):
    """Measure every configuration; returns a list of :class:`Result`."""
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is optional
        tqdm = None
    bar = tqdm(total=len(configs), desc="benchmark", unit="config") if (progress and tqdm) else None
    results = []
    for config in configs:
        if bar:
            bar.set_postfix_str(config.name)
        flops = complexity.dilated_flops(
            config.n, config.heads, config.dim, config.segment_lengths, config.dilation_rates,
            causal=config.causal, batch=config.batch,
        ).total
        (forward_s, forward_fraction, gemm), (both_s, both_fraction, _) = time_dilated(config, backend, repeats, flops)
        result = Result(config, backend, gemm, forward_s, both_s, flops, forward_fraction, both_fraction)
        if backend != "numpy" and config.n <= reference_max_n:
            (reference_forward, *_), (reference_both, *_) = time_dilated(config, "numpy", 1, flops)
            result.reference_forward_s, result.reference_forward_backward_s = reference_forward, reference_both
        if config.n <= dense_max_n:
            result.dense_forward_s, result.dense_forward_backward_s = time_dense_one_head(config, 1)
        if memory:
            result.peak_memory_ratio = peak_memory_ratio(config, backend)
        results.append(result)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return results


def _ratio(numerator, denominator):
    return f"{numerator / denominator:7.1f}x" if numerator else "      --"


def format_table(results) -> str:
    header = (
        f"{'configuration':28s} {'fwd s':>8s} {'GF/s':>6s} {'%GEMM':>6s} {'fwd+bwd s':>10s} {'GF/s':>6s} {'%GEMM':>6s}"
        f" {'us/token':>9s} {'vs numpy':>9s} {'vs dense':>9s} {'GEMM GF/s':>10s} {'peak mem':>9s}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.config.name:28s} {r.forward_s:8.3f} {r.forward_gflops:6.1f} {r.forward_fraction:6.1%}"
            f" {r.forward_backward_s:10.3f} {r.forward_backward_gflops:6.1f} {r.forward_backward_fraction:6.1%}"
            f" {r.forward_backward_s / r.config.n * 1e6:9.2f}"
            f" {_ratio(r.reference_forward_backward_s, r.forward_backward_s):>9s}"
            f" {_ratio(r.dense_forward_backward_s, r.forward_backward_s):>9s}"
            f" {r.gemm_gflops:10.1f} {'' if r.peak_memory_ratio is None else f'{r.peak_memory_ratio:8.2f}x':>9s}"
        )
    lines.append("%GEMM: median over repeats of GFLOP/s / the GEMM rate measured just before each repeat (GEMM GF/s: median).")
    lines.append("vs numpy / vs dense: forward+backward speed-up over the NumPy reference / dense attention, same run.")
    return "\n".join(lines)


def save(results, output_dir) -> list[Path]:
    """Write ``results.json`` and, if matplotlib is installed, ``throughput.png`` and ``scaling.png``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / "results.json"]
    written[0].write_text(json.dumps([r.as_dict() for r in results], indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r.config.name for r in results]
    x = np.arange(len(results))
    ax.bar(x - 0.2, [r.forward_fraction for r in results], 0.4, label="forward")
    ax.bar(x + 0.2, [r.forward_backward_fraction for r in results], 0.4, label="forward+backward")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("fraction of this run's GEMM rate")
    ax.legend()
    fig.tight_layout()
    written.append(output_dir / "throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    if len({r.config.n for r in results}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r.config.n for r in results]
        ax.semilogx(ns, [r.forward_s / r.config.n * 1e6 for r in results], "o-", base=2, label="forward")
        ax.semilogx(ns, [r.forward_backward_s / r.config.n * 1e6 for r in results], "s-", base=2, label="forward+backward")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("time per token [us]")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        written.append(output_dir / "scaling.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


WEAK_SCALING_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from mpi4py import MPI
    from longnet_ref import distributed

    c = json.loads(sys.argv[1])
    comm = MPI.COMM_WORLD
    w, r, options = c["segment_lengths"], c["dilation_rates"], dict(causal=c["causal"], backend=c["backend"])
    rng = np.random.default_rng(comm.Get_rank())
    shape = (1, c["n_per_rank"], c["heads"], c["dim"])
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(c["dtype"]) for _ in range(4))

    def step():
        comm.Barrier()
        start = MPI.Wtime()
        out, lse, fwd = distributed.dilated_attention(q, k, v, w, r, comm=comm, return_lse=True, return_stats=True, **options)
        comm.Barrier()
        middle = MPI.Wtime()
        *_, bwd = distributed.dilated_attention_backward(dout, q, k, v, out, lse, w, r, comm=comm, return_stats=True, **options)
        comm.Barrier()
        return middle - start, MPI.Wtime() - start, fwd, bwd

    step()  # warm-up: kernels and sub-communicators
    runs = [step() for _ in range(c["repeats"])]
    forward_s = sorted(x[0] for x in runs)[len(runs) // 2]
    both_s = sorted(x[1] for x in runs)[len(runs) // 2]
    fwd, bwd = runs[0][2], runs[0][3]
    bytes_per_rank = comm.gather((fwd.bytes_received, bwd.bytes_received + bwd.bytes_sent, fwd.bytes_sent), root=0)
    if comm.Get_rank() == 0:
        print(json.dumps(dict(ranks=comm.Get_size(), n=c["n_per_rank"] * comm.Get_size(), forward_s=forward_s,
                              forward_backward_s=both_s, bytes_per_rank=bytes_per_rank)))
    """
)


def weak_scaling(n_per_rank=8192, ranks=(1, 2, 4), segment_lengths=(2048, 16384), dilation_rates=(1, 8), heads=4, dim=64,
                 causal=False, backend="numba", dtype="float32", repeats=3):
    """Weak scaling over MPI: ``N = P * n_per_rank`` on ``P`` ranks; time and bytes per rank.

    Launches ``mpiexec -n P`` for each ``P`` (MPICH from the ``mpi`` extra, or the system's).
    """
    import os
    import shutil

    mpiexec = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if mpiexec is None:
        raise RuntimeError("no mpiexec found: pip install 'longnet-ref[mpi]'")
    settings = json.dumps(dict(n_per_rank=n_per_rank, segment_lengths=list(segment_lengths), dilation_rates=list(dilation_rates),
                               heads=heads, dim=dim, causal=causal, backend=backend, dtype=dtype, repeats=repeats))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    rows = []
    for p in ranks:
        result = subprocess.run([mpiexec, "-n", str(p), sys.executable, "-c", WEAK_SCALING_WORKER, settings],
                                capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def format_weak_scaling(rows, segment_lengths, dilation_rates, heads, dim, itemsize=4) -> str:
    lines = [
        f"weak scaling: N = P x {rows[0]['n'] // rows[0]['ranks']}, w = {list(segment_lengths)}, r = {list(dilation_rates)}, H = {heads}, D = {dim}",
        f"{'P':>3s} {'N':>8s} {'fwd s':>8s} {'fwd+bwd s':>10s} {'fwd recv B/rank (max)':>22s} {'bwd moved B/rank (max)':>23s}",
    ]
    for row in rows:
        received = max(b[0] for b in row["bytes_per_rank"])
        backward = max(b[1] for b in row["bytes_per_rank"])
        lines.append(f"{row['ranks']:3d} {row['n']:8d} {row['forward_s']:8.3f} {row['forward_backward_s']:10.3f} {received:22,d} {backward:23,d}")
    chunk = rows[0]["n"] // rows[0]["ranks"]  # L = N / P
    shared = [(w, r) for w, r in zip(segment_lengths, dilation_rates) if w > chunk]
    if shared:
        formula = sum(heads * (w - chunk) // r * 2 * dim * itemsize for w, r in shared)
        lines.append(f"paper's claim: bytes per rank depend on w/r, not N. Docstring formula B H (w - L)/r (D + Dv) itemsize = {formula:,d}"
                     " for every P >= w / L.")
    lines.append("time: with more ranks than cores (this machine: 2) ranks share cores, so time per rank grows with P here.")
    return "\n".join(lines)
