"""Sequence parallelism over MPI: launches ``tests/mpi`` under ``mpiexec -n 2`` and ``-n 4``.

Needs an MPI (``pip install mpi4py mpich`` gives MPICH's ``mpiexec``; the test extra installs
both). Oversubscribing the 2 cores of CI is fine: correctness does not depend on speed.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mpiexec():
    """The mpiexec beside this Python (a venv's mpich wheel) first, then the PATH."""
    found = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("no mpiexec: install MPI (pip install mpi4py mpich)")
    flags = []
    version = subprocess.run([found, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--oversubscribe"]
    return [found, *flags]


ENV = dict(
    os.environ,
    LONGNET_REF_MPI="1",
    OMPI_ALLOW_RUN_AS_ROOT="1",  # Open MPI refuses root without these; MPICH ignores them
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
    OMPI_MCA_rmaps_base_oversubscribe="1",
    PYTHONPATH=str(ROOT),
)


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 4])
def test_distributed_suite_passes_on_every_rank(ranks):
    result = subprocess.run(
        [*mpiexec(), "-n", str(ranks), sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/mpi"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert result.stdout.count(" passed") == ranks  # every rank ran and passed its tests
    assert "failed" not in result.stdout


ABORTING = textwrap.dedent(
    """
    import numpy as np
    from mpi4py import MPI
    from longnet_ref import distributed

    comm = MPI.COMM_WORLD
    if comm.Get_rank() == 1:  # an unexpected failure in the middle of the computation, on one rank only
        def broken(*args, **kwargs):
            raise RuntimeError("simulated kernel failure")
        distributed.attention_from_scores = broken
    q = np.random.default_rng(0).standard_normal((1, 16, 2, 4))
    distributed.dilated_attention(q, q, q, [64], [2], comm=comm)  # a segment spanning every rank
    comm.Barrier()  # the other ranks would wait here forever without the abort
    print("unreachable")
    """
)

BAD_INPUT = textwrap.dedent(
    """
    import numpy as np
    from mpi4py import MPI
    from longnet_ref import distributed

    comm = MPI.COMM_WORLD
    q = np.zeros((1, 16, 2, 4))
    segment_lengths = [0] if comm.Get_rank() == 1 else [8]  # bad on one rank only
    distributed.dilated_attention(q, q, q, segment_lengths, [1], comm=comm)
    print("unreachable")
    """
)


@pytest.mark.mpi
@pytest.mark.parametrize("script, message", [(BAD_INPUT, "rank 1: segment_lengths[0]"), (ABORTING, "simulated kernel failure")])
def test_a_failure_on_one_rank_ends_every_rank_quickly_with_an_error(script, message):
    start = time.monotonic()
    result = subprocess.run(
        [*mpiexec(), "-n", "3", sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert message in result.stderr
    assert "unreachable" not in result.stdout
    assert elapsed < 60, f"took {elapsed:.0f} s"
