"""``benchmarks/cpu_peer.py``: the PyTorch CPU peer computes dilated attention, and the script
runs without torch (an optional benchmark dependency) by saying so."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_peer.py"


def load_script():
    spec = importlib.util.spec_from_file_location("cpu_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_torch_the_peer_says_skipped_and_exits_zero(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert load_script().main(["--n", "16384"]) == 0
    assert capsys.readouterr().out.startswith("skipped: PyTorch is not installed")


@pytest.mark.parametrize("causal", [False, True])
def test_the_peer_computes_the_same_dilated_attention_as_ours(causal):
    """torchscale's gather / flash attention / scatter / lse mix equals backend="numba" with the
    torchscale offsets (N = 4096, the paper's branches), and the flash operator equals SDPA."""
    torch = pytest.importorskip("torch")
    load_script().check_peer_matches_ours(torch, causal)


def test_the_numba_page_shows_the_recorded_peer_table(monkeypatch, capsys):
    """docs/numba.md's table is the one ``cpu_peer.py --show`` prints from the committed JSON (no
    torch needed), so the page cannot drift from the measurement it quotes."""
    monkeypatch.setitem(sys.modules, "torch", None)  # --show must not need torch
    recorded = SCRIPT.parents[0] / "results" / "cpu_peer.json"
    assert load_script().main(["--show", str(recorded)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    page = (SCRIPT.parents[1] / "docs" / "numba.md").read_text()
    assert len(rows) == 10 and all(row in page for row in rows)
