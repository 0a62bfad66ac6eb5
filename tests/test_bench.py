"""``longnet-ref bench`` runs and writes its table, JSON and plots (no timing is asserted: the
benchmarks show performance, the tests only that the harness works)."""

import json

import pytest

from longnet_ref import bench
from longnet_ref.cli import main


def test_bench_writes_a_table_json_and_plots(tmp_path, capsys, monkeypatch):
    small = bench.Config("tiny", 512, (64, 128), (1, 2), heads=2, dim=16)
    monkeypatch.setitem(bench.PRESETS, "quick", [small])
    assert main(["bench", "--preset", "quick", "--repeats", "1", "--output-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and "%GEMM" in printed
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows[0]["forward_flops"] == 2 * 2 * 16 * 2 * (512 * 64 + 512 * 128 // 4)  # 4 D per pair, H = 2
    assert 0 < rows[0]["forward_fraction"] and rows[0]["reference_forward_s"] > 0 and rows[0]["dense_forward_s"] > 0
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_peak_memory_is_measured_in_a_fresh_process():
    from longnet_ref.bench.memory import peak_memory_ratio

    tiny = bench.Config("tiny", 256, (64,), (2,), heads=2, dim=8)
    ratio = peak_memory_ratio(tiny, "numpy")
    # The peak includes at least the arrays themselves (q, k, v, dout, out, lse, dq, dk, dv).
    assert ratio >= 0.5


@pytest.mark.mpi
def test_weak_scaling_runs_its_module_under_mpiexec():
    setup = bench.WeakScaling(n_per_rank=64, ranks=(1, 2), segment_lengths=(32, 128), dilation_rates=(1, 2), heads=2, dim=8, backend="numpy", repeats=1)
    rows = bench.weak_scaling(setup)
    assert [(row["ranks"], row["n"]) for row in rows] == [(1, 64), (2, 128)]
    assert sum(b[0] for b in rows[0]["bytes_per_rank"]) == 0  # one rank: nothing to receive
    # two ranks share the w = 128 branch: each receives the other's 64 / 2 sparse rows of K and V
    # for every head (B H (w - L) / r (D + Dv) itemsize, the distributed module's formula)
    assert [b[0] for b in rows[1]["bytes_per_rank"]] == [2 * (128 - 64) // 2 * (8 + 8) * 4] * 2
    assert "weak scaling" in bench.format_weak_scaling(rows, setup)
