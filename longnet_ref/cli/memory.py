"""Memory a command will need, estimated from its options and refused up front if it cannot fit.

The estimates count the large arrays a command holds at its peak (inputs, outputs, gradients,
cached activations, the dense oracle's ``(H, N, N)`` matrices); they are a lower bound of the
real peak, good to the factor that matters: a run that needs 95 GiB on a 24 GiB machine is told
so in a second instead of failing (or swapping) after minutes of work.
"""

from __future__ import annotations

import os
from pathlib import Path

from .options import UsageError

GIB = 2**30


def available_bytes() -> int:
    """Memory this process may still take: ``MemAvailable``, capped by a cgroup limit if one is set."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return 2**62  # unknown: do not refuse
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def refuse_if_too_big(parts: dict[str, int], what: str, hint: str) -> None:
    """Raise a ``UsageError`` naming the bytes if ``sum(parts)`` exceeds the available memory.

    Args:
        parts: Name of each large group of arrays -> its bytes.
        what: What needs them, e.g. ``"demo --n 100000000"``.
        hint: Which options make it smaller.
    """
    needed = sum(parts.values())
    available = available_bytes()
    if needed > available:
        largest = ", ".join(f"{name} {size / GIB:.1f} GiB" for name, size in sorted(parts.items(), key=lambda p: -p[1])[:3])
        raise UsageError(
            f"{what} needs about {needed:,} bytes ({needed / GIB:.1f} GiB: {largest}), more than the "
            f"{available:,} bytes ({available / GIB:.1f} GiB) available; {hint}"
        )


def demo_bytes(batch: int, n: int, heads: int, dim: int, itemsize: int, backends: int) -> dict[str, int]:
    """``demo``: q, k, v, dout, and per backend out, lse, dq, dk, dv; the dense oracle's matrices."""
    rows = batch * n * heads
    return {
        "q, k, v, dout": 4 * rows * dim * itemsize,
        "out, lse, dq, dk, dv per backend": backends * rows * (4 * dim + 1) * itemsize,
        # multiplicity (H, N, N) int64 and its log as a float64 bias, then the scores and
        # probabilities of dense attention (B, H, N, N), forward and backward
        "the dense oracle's (H, N, N) matrices": heads * n * n * 16 + 4 * batch * heads * n * n * itemsize,
    }


def train_step_bytes(config, batch: int, n: int) -> dict[str, int]:
    """One training step of ``model.loss_and_grads`` + AdamW on ``batch`` sequences of ``n`` tokens.

    Params, gradients and both AdamW moments; per layer the activations the backward keeps
    (about 25 ``(B, N, C)`` arrays: LayerNorm inputs and outputs, q, k, v, o, the MLP's 4C hidden
    layer before and after GELU); the logits, probabilities and their gradient ``(B, N, V)``;
    dense attention's ``(B, H, N, N)`` scores and probabilities.
    """
    from ..model import parameter_count

    itemsize = 4 if config.dtype == "float32" else 8
    params = parameter_count(config)
    parts = {
        "params, gradients, AdamW moments": 4 * params * itemsize,
        "activations": batch * n * config.d_model * (25 * config.n_layers + 10) * itemsize,
        "logits": 3 * batch * n * config.vocab_size * itemsize,
    }
    if config.attention == "dense":
        parts["dense attention scores"] = 3 * batch * config.n_heads * n * n * itemsize
    return parts
