"""Peak memory of forward + backward, measured in a fresh process.

``python -m longnet_ref.bench.memory '<config as JSON>'`` loads the kernels, resets the kernel's
peak-RSS mark (``VmHWM``, Linux), runs forward and backward once and prints, as JSON, the peak
growth and the bytes of q, k, v, dout, out, lse, dq, dk, dv. [`peak_memory_ratio`][longnet_ref.bench.memory.peak_memory_ratio]
runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .presets import Config

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds longnet_ref/


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: the kernel's own accounting."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak memory needs Linux)")


def measure(settings: dict) -> dict:
    """Run forward + backward of one configuration; ``{"peak_kib", "array_kib"}`` (Linux only).

        peak_kib = VmHWM after - VmRSS before,   array_kib = bytes of q, k, v, dout, out, lse, dq, dk, dv / 1024

    Meant for a fresh process (``python -m longnet_ref.bench.memory``): earlier allocations of
    the same process would hide in the baseline.

    Args:
        settings: A [`Config`][longnet_ref.bench.Config] as a dict (``dataclasses.asdict``)
            plus ``"backend"``.

    Returns:
        ``{"peak_kib": int, "array_kib": float}``: the peak resident growth and the bytes of the
        nine arrays, both in KiB.

    Raises:
        RuntimeError: ``/proc/self/status`` lacks the field (not Linux).
        OSError: ``/proc/self/clear_refs`` cannot be written.
        KeyError: ``settings`` lacks a field.
        ValueError: The configuration is invalid (from ``dilated_attention``).
    """
    from ..attention import dilated_attention, dilated_attention_backward

    w, r, backend = settings["segment_lengths"], settings["dilation_rates"], settings["backend"]
    tiny = np.zeros((1, 8, 1, settings["dim"]), settings["dtype"])
    o, l = dilated_attention(tiny, tiny, tiny, w, r, backend=backend, return_lse=True)  # load the kernels
    dilated_attention_backward(o, tiny, tiny, tiny, o, l, w, r, backend=backend)
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS high-water mark to the current RSS (Linux >= 4.0)
    shape = (settings["batch"], settings["n"], settings["heads"], settings["dim"])  # (B, N, H, D)
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(settings["dtype"]) for _ in range(4))
    out, lse = dilated_attention(q, k, v, w, r, causal=settings["causal"], backend=backend, return_lse=True)
    grads = dilated_attention_backward(dout, q, k, v, out, lse, w, r, causal=settings["causal"], backend=backend)
    arrays = (q, k, v, dout, out, lse, *grads)
    return {"peak_kib": _status_kib("VmHWM") - baseline, "array_kib": sum(a.nbytes for a in arrays) / 1024}


def peak_memory_ratio(config: Config, backend: str) -> float:
    """Peak resident memory of forward + backward over the bytes of its inputs, outputs and gradients.

        ratio = peak_kib / array_kib   (of ``measure``, in a fresh subprocess)

    Args:
        config: The configuration to run.
        backend: ``"numba"``, ``"numpy"`` or ``"cupy"`` (host memory only for cupy).

    Returns:
        The ratio; 1 would mean no memory beyond the nine arrays.

    Raises:
        subprocess.CalledProcessError: The child process failed (its stderr is on the error).
    """
    settings = json.dumps(dict(asdict(config), backend=backend))
    # The child imports this same copy of longnet_ref, whatever the current directory.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "longnet_ref.bench.memory", settings], capture_output=True, text=True, check=True, env=env)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["peak_kib"] / measured["array_kib"]


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
