"""Weak scaling of the distributed module: ``N = P * n_per_rank`` on ``P`` MPI ranks.

[`weak_scaling`][longnet_ref.bench.weak_scaling.weak_scaling] launches, for every ``P``,
``mpiexec -n P python -m longnet_ref.bench.weak_scaling '<settings as JSON>'``; under mpiexec
this module's [`worker`][longnet_ref.bench.weak_scaling.worker] times forward and
forward+backward on every rank (median of ``repeats``, after a warm-up that builds the kernels
and sub-communicators) and rank 0 prints the times and the bytes each rank moved, as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .presets import WeakScaling

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds longnet_ref/


def worker(settings: dict) -> dict | None:
    """One rank's share of one weak-scaling measurement (run under mpiexec); rank 0 returns the row.

    Each rank holds a ``(1, L, H, D)`` chunk; forward and forward+backward are timed between
    barriers (median of ``repeats`` after one warm-up).

    Args:
        settings: A [`WeakScaling`][longnet_ref.bench.WeakScaling] as a dict
            (``dataclasses.asdict``).

    Returns:
        On rank 0, ``{"ranks", "n", "forward_s", "forward_backward_s", "bytes_per_rank"}`` where
        ``bytes_per_rank`` lists, per rank, ``(forward bytes received, backward bytes moved,
        forward bytes sent)``; ``None`` on every other rank.

    Raises:
        ImportError: mpi4py is not installed (the ``mpi`` extra).
        ValueError: The configuration is invalid (raised on every rank).
    """
    from mpi4py import MPI

    from .. import distributed

    comm = MPI.COMM_WORLD
    w, r = settings["segment_lengths"], settings["dilation_rates"]
    options = dict(causal=settings["causal"], backend=settings["backend"])
    rng = np.random.default_rng(comm.Get_rank())
    shape = (1, settings["n_per_rank"], settings["heads"], settings["dim"])  # (B, L, H, D): this rank's chunk
    q, k, v, dout = (rng.standard_normal(shape, dtype=np.float32).astype(settings["dtype"]) for _ in range(4))

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
    runs = [step() for _ in range(settings["repeats"])]
    forward_s = sorted(x[0] for x in runs)[len(runs) // 2]
    both_s = sorted(x[1] for x in runs)[len(runs) // 2]
    fwd, bwd = runs[0][2], runs[0][3]
    bytes_per_rank = comm.gather((fwd.bytes_received, bwd.bytes_received + bwd.bytes_sent, fwd.bytes_sent), root=0)
    if comm.Get_rank() != 0:
        return None
    return dict(
        ranks=comm.Get_size(), n=settings["n_per_rank"] * comm.Get_size(), forward_s=forward_s, forward_backward_s=both_s, bytes_per_rank=bytes_per_rank
    )


class MpiexecNotFound(RuntimeError):
    """No ``mpiexec`` on this machine: the distributed benchmark cannot start.

    Raised by [`find_mpiexec`][longnet_ref.bench.weak_scaling.find_mpiexec]; the CLI turns it
    into a one-line message and exit status 3.
    """


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the ``mpi`` extra's MPICH) first, then the PATH.

    Returns:
        The path of the ``mpiexec`` executable.

    Raises:
        MpiexecNotFound: There is none in either place.
    """
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("mpiexec", path=path)
    if found is None:
        raise MpiexecNotFound('no mpiexec found: pip install "longnet-ref[mpi]" (MPICH), or install an MPI')
    return found


def weak_scaling(setup: WeakScaling | None = None) -> list[dict]:
    """One row per rank count of ``setup.ranks``: times and bytes moved per rank, ``N = P L`` (paper §3.1).

    Launches ``mpiexec -n P python -m longnet_ref.bench.weak_scaling`` for each ``P``, with this
    copy of ``longnet_ref`` first on ``PYTHONPATH``.

    Args:
        setup: The benchmark; ``None`` means the default [`WeakScaling`][longnet_ref.bench.WeakScaling].

    Returns:
        One dict per ``P`` of ``setup.ranks``, in order: rank 0's row of ``worker``
        (``ranks``, ``n``, ``forward_s``, ``forward_backward_s``, ``bytes_per_rank``).

    Raises:
        MpiexecNotFound: No ``mpiexec`` is installed.
        subprocess.CalledProcessError: An ``mpiexec`` run failed (bad configuration, MPI error).
    """
    setup = WeakScaling() if setup is None else setup
    mpiexec = find_mpiexec()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),  # this copy of longnet_ref
        OMPI_ALLOW_RUN_AS_ROOT="1",  # Open MPI refuses root without these; MPICH ignores them
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMPI_MCA_rmaps_base_oversubscribe="1",
    )
    settings = json.dumps(asdict(setup))
    rows = []
    for p in setup.ranks:
        result = subprocess.run(
            [mpiexec, "-n", str(p), sys.executable, "-m", "longnet_ref.bench.weak_scaling", settings], capture_output=True, text=True, env=env, check=True
        )
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


if __name__ == "__main__":
    row = worker(json.loads(sys.argv[1]))
    if row is not None:
        print(json.dumps(row))
