"""The timing loop: every figure is a ratio to something measured in the same run.

Each configuration reports the median forward and forward+backward time over ``repeats`` runs
(after a warm-up that also compiles the kernels), the fraction of this machine's GEMM rate
measured just before each run, and speed-ups over the NumPy reference and dense attention.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import complexity
from ..attention import dilated_attention, dilated_attention_backward
from ..dense import dense_attention, dense_attention_backward
from .gemm import gemm_gflops, seconds, to_device
from .presets import DEFAULT_BACKEND, DEFAULT_REPEATS, DENSE_MAX_N, REFERENCE_MAX_N, Config

BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 convention)


@dataclass
class Result:
    """The measurements of one configuration on one backend (times in seconds)."""

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


def inputs(config: Config, heads=None, batch=None, backend="numpy"):
    """``q, k, v, dout``: ``(B, N, H, D)`` unit normals of the configuration's dtype."""
    rng = np.random.default_rng(0)
    shape = (batch or config.batch, config.n, heads or config.heads, config.dim)  # (B, N, H, D)
    return tuple(to_device(rng.standard_normal(shape, dtype=np.float32).astype(config.dtype), backend) for _ in range(4))


def forward_backward(q, k, v, dout, config, backend):
    branches = (config.segment_lengths, config.dilation_rates)
    out, lse = dilated_attention(q, k, v, *branches, causal=config.causal, backend=backend, return_lse=True)
    return dilated_attention_backward(dout, q, k, v, out, lse, *branches, causal=config.causal, backend=backend)


def interleaved(fn, flops, repeats, dtype, backend=DEFAULT_BACKEND):
    """Median time of ``fn``, median of ``(flops / time) / GEMM rate``, and median GEMM rate over
    ``repeats`` runs, each preceded by its own GEMM measurement: load that drifts during a
    configuration (a shared machine) moves numerator and denominator together."""
    times, fractions, rates = [], [], []
    for _ in range(repeats):
        rates.append(gemm_gflops(dtype, repeats=2, backend=backend))
        times.append(seconds(fn, backend))
        fractions.append(flops / times[-1] / 1e9 / rates[-1])
    return statistics.median(times), statistics.median(fractions), statistics.median(rates)


def time_dilated(config: Config, backend: str, repeats: int, flops: int = 0):
    """Forward and forward+backward: ``(seconds, fraction of GEMM, GEMM GFLOP/s)`` for each."""
    if backend == "numba":  # compile / load every kernel outside the timing
        from ..backends.numba_cpu import warm_up

        warm_up(np.dtype(config.dtype))
    small = Config(config.name, min(config.n, 4096), config.segment_lengths, config.dilation_rates, 1, 1, config.dim, config.causal, config.dtype)
    forward_backward(*inputs(small, backend=backend), small, backend)  # GPU kernels compile per dtype on first use
    q, k, v, dout = inputs(config, backend=backend)
    branches = (config.segment_lengths, config.dilation_rates)
    forward = lambda: dilated_attention(q, k, v, *branches, causal=config.causal, backend=backend)
    both = lambda: forward_backward(q, k, v, dout, config, backend)
    return (
        interleaved(forward, flops, repeats, config.dtype, backend),
        interleaved(both, (1 + BACKWARD_FLOP_FACTOR) * flops, repeats, config.dtype, backend),
    )


def time_dense_one_head(config: Config, repeats: int):
    """Dense attention timed on one (batch, head) and scaled by ``B * H`` (exact for its per-head cost)."""
    q, k, v, dout = inputs(config, heads=1, batch=1)

    def both():
        out, lse = dense_attention(q, k, v, causal=config.causal, return_lse=True)
        dense_attention_backward(dout, q, k, v, out, lse, causal=config.causal)

    forward = statistics.median(seconds(lambda: dense_attention(q, k, v, causal=config.causal)) for _ in range(repeats))
    both_s = statistics.median(seconds(both) for _ in range(repeats))
    return forward * config.batch * config.heads, both_s * config.batch * config.heads


def run(configs, backend=DEFAULT_BACKEND, repeats=DEFAULT_REPEATS, reference_max_n=REFERENCE_MAX_N, dense_max_n=DENSE_MAX_N,
        memory=False, progress=True):
    """Measure every configuration; returns a list of :class:`Result`.

    FLOPs come from ``longnet_ref.complexity`` (forward: 2 (D + Dv) per attended pair; the
    backward counted as ``BACKWARD_FLOP_FACTOR`` times the forward).
    """
    from .memory import peak_memory_ratio

    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is optional: no progress bar then
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
