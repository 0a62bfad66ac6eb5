"""The timing loop: every figure is a ratio to something measured in the same run.

Each configuration reports the median forward and forward+backward time over ``repeats`` runs
(after a warm-up that also compiles the kernels), the fraction of this machine's GEMM rate
measured just before each run, and speed-ups over the NumPy reference and dense attention.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import complexity
from ..attention import dilated_attention, dilated_attention_backward
from ..dense import dense_attention, dense_attention_backward
from ..backends import to_backend_arrays
from .gemm import gemm_gflops, seconds
from .presets import DEFAULT_BACKEND, DEFAULT_REPEATS, DENSE_MAX_N, REFERENCE_MAX_N, Config

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from numpy.typing import DTypeLike

BACKWARD_FLOP_FACTOR = 2.5  # backward FLOPs / forward FLOPs (FlashAttention-2 convention)
"""Backward FLOPs over forward FLOPs, the FlashAttention-2 convention: forward+backward counts ``3.5x`` the forward."""


@dataclass
class Result:
    """The measurements of one configuration on one backend (times in seconds).

    Attributes:
        config: The configuration measured.
        backend: ``"numba"``, ``"numpy"`` or ``"cupy"``.
        gemm_gflops: This machine's GEMM rate, median over the repeats (GFLOP/s).
        forward_s: Median forward time.
        forward_backward_s: Median forward+backward time.
        forward_flops: Forward FLOPs, ``2 (D + Dv)`` per attended pair (``longnet_ref.complexity``).
        forward_fraction: Median over repeats of the forward's GFLOP/s over the GEMM rate
            measured just before.
        forward_backward_fraction: The same for forward+backward.
        reference_forward_s: The NumPy reference's forward time, or ``None`` if not timed.
        reference_forward_backward_s: Its forward+backward time, or ``None``.
        dense_forward_s: Dense attention's forward time (one head, scaled by ``B H``), or ``None``.
        dense_forward_backward_s: Its forward+backward time, or ``None``.
        peak_memory_ratio: Peak resident memory over the arrays' bytes, or ``None``.
        extra: Free-form additions, written to ``results.json`` as they are.
    """

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
    def forward_gflops(self) -> float:
        """The forward's rate, ``forward_flops / forward_s / 1e9``.

        Returns:
            GFLOP/s of the median forward time.
        """
        return self.forward_flops / self.forward_s / 1e9

    @property
    def forward_backward_gflops(self) -> float:
        """The forward+backward rate, ``(1 + BACKWARD_FLOP_FACTOR) forward_flops / forward_backward_s / 1e9``.

        Returns:
            GFLOP/s of the median forward+backward time.
        """
        return (1 + BACKWARD_FLOP_FACTOR) * self.forward_flops / self.forward_backward_s / 1e9

    def as_dict(self) -> dict[str, Any]:
        """One row of ``results.json``: every field, the two rates and the time per token.

        Returns:
            The fields (``config`` as a nested dict), plus ``forward_gflops``,
            ``forward_backward_gflops`` and ``time_per_token_us`` (microseconds per row of ``N``).
        """
        row = asdict(self)
        row.update(
            forward_gflops=self.forward_gflops,
            forward_backward_gflops=self.forward_backward_gflops,
            time_per_token_us=self.forward_backward_s / self.config.n * 1e6,
        )
        return row


def inputs(config: Config, heads: int | None = None, batch: int | None = None, backend: str = "numpy") -> tuple[Any, Any, Any, Any]:
    """``q, k, v, dout``: ``(B, N, H, D)`` unit normals of the configuration's dtype.

    Drawn in float32 from a fixed seed (0), then cast, so float32 and float64 runs see the same
    values.

    Args:
        config: Supplies ``N``, ``D``, the dtype, and ``B``, ``H`` unless overridden.
        heads: ``H`` instead of ``config.heads``.
        batch: ``B`` instead of ``config.batch``.
        backend: ``"cupy"`` puts the arrays on the GPU; otherwise NumPy arrays.

    Returns:
        Four ``(B, N, H, D)`` arrays of ``config.dtype`` (CuPy arrays for ``"cupy"``).

    Raises:
        ImportError: ``backend="cupy"`` and CuPy is not installed.
    """
    rng = np.random.default_rng(0)
    shape = (batch or config.batch, config.n, heads or config.heads, config.dim)  # (B, N, H, D)
    return tuple(to_backend_arrays(rng.standard_normal(shape, dtype=np.float32).astype(config.dtype), backend) for _ in range(4))


def forward_backward(q: Any, k: Any, v: Any, dout: Any, config: Config, backend: str) -> tuple[Any, Any, Any]:
    """One forward and backward of dilated attention, as timed (paper Eqs. 9-10; SPEC §5).

    Args:
        q: ``(B, N, H, D)`` queries of the backend's array library.
        k: ``(B, N, H, D)`` keys.
        v: ``(B, N, H, D)`` values.
        dout: ``(B, N, H, D)`` upstream gradient.
        config: Supplies the branches and ``causal``.
        backend: ``"numba"``, ``"numpy"`` or ``"cupy"``.

    Returns:
        ``(dq, dk, dv)``, the shapes and dtype of ``(q, k, v)``.

    Raises:
        ValueError: The configuration or the arrays are invalid (SPEC §7).
    """
    branches = (config.segment_lengths, config.dilation_rates)
    out, lse = dilated_attention(q, k, v, *branches, causal=config.causal, backend=backend, return_lse=True)
    return dilated_attention_backward(dout, q, k, v, out, lse, *branches, causal=config.causal, backend=backend)


def interleaved(fn: Callable[[], Any], flops: float, repeats: int, dtype: DTypeLike, backend: str = DEFAULT_BACKEND) -> tuple[float, float, float]:
    """Median time of ``fn``, median of ``(flops / time) / GEMM rate``, and median GEMM rate over ``repeats`` runs.

        fraction_j = (flops / t_j / 1e9) / gemm_j,   each run j preceded by its own GEMM measurement

    Load that drifts during a configuration (a shared machine) moves numerator and denominator
    together.

    Args:
        fn: The call to time.
        flops: FLOPs of one call of ``fn``.
        repeats: Runs; the medians are reported.
        dtype: The GEMM's dtype (the attention's).
        backend: ``"cupy"`` measures the GPU's GEMM and synchronises; otherwise the CPU.

    Returns:
        ``(median seconds, median fraction of GEMM, median GEMM GFLOP/s)``.

    Raises:
        statistics.StatisticsError: ``repeats < 1``.
    """
    times, fractions, rates = [], [], []
    for _ in range(repeats):
        rates.append(gemm_gflops(dtype, repeats=2, backend=backend))
        times.append(seconds(fn, backend))
        fractions.append(flops / times[-1] / 1e9 / rates[-1])
    return statistics.median(times), statistics.median(fractions), statistics.median(rates)


def time_dilated(config: Config, backend: str, repeats: int, flops: int = 0) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Forward and forward+backward: ``(seconds, fraction of GEMM, GEMM GFLOP/s)`` for each.

    Compiles or loads every kernel first, and runs a small problem once, outside the timing.

    Args:
        config: The configuration to time.
        backend: ``"numba"``, ``"numpy"`` or ``"cupy"``.
        repeats: Runs per measurement; medians are reported.
        flops: The forward's FLOPs; forward+backward counts ``1 + BACKWARD_FLOP_FACTOR`` times it.

    Returns:
        ``((forward s, fraction, GEMM GF/s), (forward+backward s, fraction, GEMM GF/s))``.

    Raises:
        ValueError: The configuration is invalid (SPEC §7).
        ImportError: The backend's optional extra is not installed.
    """
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


def speedup_over_reference(config: Config, backend: str, repeats: int) -> tuple[float, float, tuple[float, float, float]]:
    """The NumPy reference's median forward and forward+backward seconds, and the forward+backward
    speed-up over it: ``(median, min, max)`` of per-repeat ratios.

    The reference spends its time in many small BLAS calls, which a competing process slows
    10-20x when BLAS is multi-threaded: measured one after the other, the ratio swung from 2.8x
    to 41.7x between runs. Here both sides run with the same number of threads (BLAS limited to
    Numba's thread count for the reference) and alternate repeat by repeat, so drifting load
    moves both; the spread of the ratios is reported with the median.
    """
    import numba
    from threadpoolctl import threadpool_limits

    q, k, v, dout = inputs(config)
    branches = (config.segment_lengths, config.dilation_rates)
    forward = {name: (lambda name=name: dilated_attention(q, k, v, *branches, causal=config.causal, backend=name)) for name in ("numpy", backend)}
    both = {name: (lambda name=name: forward_backward(q, k, v, dout, config, name)) for name in ("numpy", backend)}
    both["numpy"]()  # warm-up of both sides
    both[backend]()
    reference_forward, reference_both, ratios = [], [], []
    for _ in range(repeats):
        with threadpool_limits(numba.get_num_threads(), user_api="blas"):
            reference_forward.append(seconds(forward["numpy"]))
            reference_both.append(seconds(both["numpy"]))
        ratios.append(reference_both[-1] / seconds(both[backend], backend))
    spread = (statistics.median(ratios), min(ratios), max(ratios))
    return statistics.median(reference_forward), statistics.median(reference_both), spread


def time_dense_one_head(config: Config, repeats: int) -> tuple[float, float]:
    """Dense attention timed on one (batch, head) and scaled by ``B * H`` (exact for its per-head cost).

        t(B, H) = B H t(1, 1)

    Args:
        config: The configuration; dense attention runs on its ``N``, ``D``, dtype and ``causal``.
        repeats: Runs per measurement; the median is reported.

    Returns:
        ``(forward seconds, forward+backward seconds)``, scaled to ``B * H``.

    Raises:
        MemoryError: The ``(N, N)`` score matrix does not fit (``N`` too large; see ``DENSE_MAX_N``).
    """
    q, k, v, dout = inputs(config, heads=1, batch=1)

    def both():
        out, lse = dense_attention(q, k, v, causal=config.causal, return_lse=True)
        dense_attention_backward(dout, q, k, v, out, lse, causal=config.causal)

    forward = statistics.median(seconds(lambda: dense_attention(q, k, v, causal=config.causal)) for _ in range(repeats))
    both_s = statistics.median(seconds(both) for _ in range(repeats))
    return forward * config.batch * config.heads, both_s * config.batch * config.heads


def run(
    configs: Sequence[Config],
    backend: str = DEFAULT_BACKEND,
    repeats: int = DEFAULT_REPEATS,
    reference_max_n: int = REFERENCE_MAX_N,
    dense_max_n: int = DENSE_MAX_N,
    memory: bool = False,
    progress: bool = True,
) -> list[Result]:
    """Measure every configuration; returns a list of [`Result`][longnet_ref.bench.Result].

        forward FLOPs = 2 (D + Dv) x attended pairs,   backward FLOPs = BACKWARD_FLOP_FACTOR x forward

    FLOPs come from [`complexity`][longnet_ref.complexity]; the speed-ups over the NumPy
    reference and dense attention are measured in the same run.

    Args:
        configs: The configurations, run in order.
        backend: ``"numba"``, ``"numpy"`` or ``"cupy"``.
        repeats: Runs per measurement; medians are reported.
        reference_max_n: Time the NumPy reference (for a non-numpy backend) up to this ``N``;
            0 never.
        dense_max_n: Time dense attention up to this ``N``; 0 never.
        memory: Also measure the peak memory ratio, in a fresh subprocess per configuration.
        progress: Show a tqdm progress bar (if tqdm is installed).

    Returns:
        One [`Result`][longnet_ref.bench.Result] per configuration, in order.

    Raises:
        ValueError: A configuration is invalid (SPEC §7).
        ImportError: The backend's optional extra is not installed.
        subprocess.CalledProcessError: With ``memory=True``, the measuring subprocess failed.
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
        c = config
        flops = complexity.dilated_flops(c.n, c.heads, c.dim, c.segment_lengths, c.dilation_rates, causal=c.causal, batch=c.batch).total
        (forward_s, forward_fraction, gemm), (both_s, both_fraction, _) = time_dilated(config, backend, repeats, flops)
        result = Result(config, backend, gemm, forward_s, both_s, flops, forward_fraction, both_fraction)
        if backend == "numba" and config.n <= reference_max_n:  # CPU vs CPU: interleaved, same threads
            result.reference_forward_s, result.reference_forward_backward_s, result.extra["vs_reference"] = speedup_over_reference(config, backend, repeats)
        elif backend != "numpy" and config.n <= reference_max_n:
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
