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
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
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
        [*mpiexec(), "-n", "3", sys.executable, "-c", script],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert message in result.stderr
    assert "unreachable" not in result.stdout
    assert elapsed < 60, f"took {elapsed:.0f} s"


# ---- longnet-ref train, sequence-parallel (issue 19, section 2) -----------------------------------

TRAIN = [
    "-m",
    "longnet_ref.cli",
    "train",
    "--segment-lengths",
    "8,32",
    "--dilation-rates",
    "1,2",
    "--d-model",
    "16",
    "--heads",
    "2",
    "--layers",
    "1",
    "--batch",
    "2",
    "--eval-every",
    "2",
    "--backend",
    "numpy",
    "--dtype",
    "float64",
    "--quiet",
]


def _train(ranks, *options, cwd=ROOT):
    command = [*mpiexec(), "-n", str(ranks), sys.executable] if ranks > 1 else [sys.executable]
    return subprocess.run([*command, *TRAIN, *options], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.mpi
def test_train_under_mpiexec_writes_once_and_its_checkpoint_resumes_at_any_p(tmp_path):
    """Two steps at P = 2 (rank 0 alone prints and writes), then the checkpoint continues to step 4
    at P = 2 and in one process without MPI: the same losses and parameters, to rounding."""
    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(256)) * 8)
    first = _train(2, "--text", str(text), "--n", "32", "--steps", "2", "--out", str(tmp_path / "p2"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("longnet-ref train: text N=32") == 1  # one banner: rank 0's
    assert "(sequence-parallel, P=2)" in first.stdout
    assert first.stdout.count(" steps in ") == 1 and f"wrote {tmp_path / 'p2' / 'checkpoint.npz'}" in first.stdout  # rank 0's summary
    for name in ("at_p2", "at_p1"):
        (tmp_path / name).mkdir()
        shutil.copy(tmp_path / "p2" / "checkpoint.npz", tmp_path / name)
    resumed = {
        name: _train(ranks, "--text", str(text), "--resume", str(tmp_path / name / "checkpoint.npz"), "--steps", "4")
        for name, ranks in (("at_p2", 2), ("at_p1", 1))
    }
    for result in resumed.values():
        assert result.returncode == 0, result.stderr[-3000:]
    import json

    import numpy as np

    from .tolerances import PARALLEL_MODEL

    logs = {name: json.loads((tmp_path / name / "log.json").read_text())["records"] for name in resumed}
    assert [r["step"] for r in logs["at_p1"]] == [r["step"] for r in logs["at_p2"]] == [3, 4]
    bound = PARALLEL_MODEL[np.dtype("float64")]
    for one, two in zip(logs["at_p1"], logs["at_p2"]):
        assert one["loss"] == pytest.approx(two["loss"], rel=bound)
    with np.load(tmp_path / "at_p1" / "checkpoint.npz") as one, np.load(tmp_path / "at_p2" / "checkpoint.npz") as two:
        for name in (n for n in one.files if n.startswith("param/")):
            assert np.max(np.abs(one[name] - two[name])) <= bound * np.max(np.abs(two[name])), name


@pytest.mark.mpi
def test_train_under_mpiexec_with_a_bad_option_stops_every_rank_with_one_line(tmp_path):
    result = _train(2, "--n", "33", "--steps", "2", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "longnet-ref train: error: --n 33 is not divisible by the 2 MPI ranks (each rank holds N/P tokens of every sequence): use a multiple of 2"
    ], result.stderr
    assert not (tmp_path / "run").exists()
