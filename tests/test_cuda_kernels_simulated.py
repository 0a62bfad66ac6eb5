"""The CUDA kernels of ``backend="cupy"``, executed by Numba's CUDA simulator on the CPU.

CI has no GPU. Under ``NUMBA_ENABLE_CUDASIM=1`` every thread of every block runs the kernel's
Python code, shared memory and ``syncthreads`` included, so the kernel *logic* (indices,
tiles, masks, online softmax, mixture, both backward passes) is checked against the NumPy
reference here. What only a GPU run proves: compilation to PTX, speed, and real concurrency
(``tests/test_gpu.py``, ``pytest -m gpu``). The simulator must be enabled before Numba is
imported, hence the subprocess.
"""

import os
import subprocess
import sys
import textwrap

SIMULATED = textwrap.dedent(
    """
    import numpy as np
    from longnet_ref import reference
    from longnet_ref.backends import cuda_kernels
    from longnet_ref.config import validate_branches

    # float64: both sides sum O(N) terms in different orders -> ~1e-15; 1e-12 leaves margin.
    # float32: unit roundoff 6e-8 over the same sums -> 1e-5 absolute on O(1) values.
    TOLERANCE = {np.float64: 1e-12, np.float32: 2e-5}
    cases = [  # (B, N, H, D, Dv, w, r, causal, offsets)
        (1, 23, 2, 3, 2, [4, 9, 40], [1, 2, 3], False, "paper"),     # ragged, w > N
        (2, 19, 3, 2, 3, [5, 19], [2, 4], True, "torchscale"),       # block offsets, causal
        (1, 17, 5, 2, 2, [3, 6], [6, 11], True, "paper"),            # r > w: offsets past the segment
        (1, 70, 1, 2, 2, [70], [1], True, "paper"),                  # 2 thread blocks, 3+ tiles
        (1, 0, 2, 3, 3, [4], [2], False, "paper"),                   # empty sequence
    ]
    rng = np.random.default_rng(1)
    checked = 0
    for dtype in (np.float64, np.float32):
        for B, N, H, D, Dv, w, r, causal, offsets in cases:
            q, k = (rng.standard_normal((B, N, H, D)).astype(dtype) for _ in range(2))
            v, dout = (rng.standard_normal((B, N, H, Dv)).astype(dtype) for _ in range(2))
            if N > 5 and dtype == np.float64:
                v[0, 3, 0, 0] = np.nan  # a NaN value row must reach exactly the rows that attend it
            branches, scale = validate_branches(w, r), 1 / np.sqrt(D)
            expected = reference.forward(q, k, v, branches, causal, scale, offsets)
            got = cuda_kernels.forward(np, q, k, v, branches, causal, scale, offsets)
            expected += reference.backward(dout, q, k, v, *expected[:2], branches, causal, scale, offsets)
            got += cuda_kernels.backward(np, dout, q, k, v, *expected[:2], branches, causal, scale, offsets)
            for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
                assert a.dtype == b.dtype and a.shape == b.shape, name
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
                finite = np.isfinite(b)
                np.testing.assert_allclose(a[finite], b[finite], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype], err_msg=name)
                np.testing.assert_array_equal(a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)], err_msg=name)
            checked += 1
    print("simulated kernels agree on", checked, "cases")
    """
)


def test_cuda_kernels_agree_with_the_reference_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    result = subprocess.run([sys.executable, "-c", SIMULATED], env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "simulated kernels agree on 10 cases" in result.stdout


def test_cupy_backend_rejects_head_dims_it_cannot_hold():
    import numpy as np
    import pytest

    from longnet_ref.backends import cuda_kernels

    q = np.zeros((1, 4, 1, cuda_kernels.MAX_DIM + 1))
    with pytest.raises(ValueError, match="head dimensions up to"):
        cuda_kernels.check_dims(q, q)
