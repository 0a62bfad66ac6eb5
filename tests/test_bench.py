"""``longnet-ref bench`` runs and writes its table, JSON and plots (no timing is asserted: the
benchmarks show performance, the tests only that the harness works)."""

import json

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
