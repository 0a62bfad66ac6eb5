"""The CUDA kernels of ``backend="cupy-fused"``, executed by Numba's CUDA simulator on the CPU.

CI has no GPU. Under ``NUMBA_ENABLE_CUDASIM=1`` every thread of every block runs the kernel's
Python code, shared memory and ``syncthreads`` included, so the kernel *logic* (indices,
tiles, masks, online softmax, mixture, both backward passes, the float16 path) is checked
against the reference here. What only a GPU run proves: compilation to PTX, speed, and real
concurrency (``tests/test_gpu.py``, ``pytest -m gpu``). The simulator must be enabled before
Numba is imported, hence a subprocess per check (``tests/simulated_cuda_kernels.py``).
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longnet_ref.backends import cuda_kernels

ROOT = Path(__file__).resolve().parent.parent


def simulate(check, *args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    command = [sys.executable, "-m", "tests.simulated_cuda_kernels", check, *map(str, args)]
    result = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and f"ok {check}" in result.stdout, f"{' '.join(command[1:])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"


def test_kernels_agree_with_the_reference_on_random_tiny_problems():
    """Ragged, causal or not, both offset rules, several thread blocks and tiles; the seed is in
    the failure message (rerun: ``NUMBA_ENABLE_CUDASIM=1 python -m tests.simulated_cuda_kernels random SEED``)."""
    simulate("random", random.randrange(2**32))


@pytest.mark.parametrize("check", ["production-geometry", "nan-rows", "weightless-rows", "empty-sequence", "zero-value-dim", "float16"])
def test_kernels_in_the_simulator(check):
    """production-geometry: the real block and tile sizes across two blocks (the cross-block
    gradient case); nan-rows: a NaN reaches exactly the rows that attend it; weightless-rows: a
    query whose every score is -inf contributes nothing to any gradient (SPEC §5); zero-value-dim:
    Dv = 0 keeps the true lse; float16: float32 accumulation, outputs in float16."""
    simulate(check)


def test_fused_backend_rejects_head_dims_it_cannot_hold():
    q = np.zeros((1, 4, 1, cuda_kernels.MAX_DIM + 1))
    with pytest.raises(ValueError, match="head dimensions up to"):
        cuda_kernels.check_dims(q, q)
