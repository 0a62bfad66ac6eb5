"""The command line: ``longnet-ref demo`` verifies dilated attention against the dense oracle, and
every mistake a new user can make ends in a one-line error and a non-zero exit, no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from longnet_ref import bench
from longnet_ref.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_verifies_a_small_configuration(capsys):
    assert main(["demo", "--n", "200", "--heads", "3", "--dim", "8", "--segment-lengths", "16,64,100",
                 "--dilation-rates", "1,3,6", "--causal", "--offsets", "torchscale", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "OK: every error" in printed and "attended (query, key) pairs" in printed


def test_demo_reports_bad_configurations_as_an_error(capsys):
    assert main(["demo", "--n", "64", "--segment-lengths", "16,32", "--dilation-rates", "1"]) == 2
    assert "same length" in capsys.readouterr().err


def run_cli(*args, env=None):
    """``python -m longnet_ref.cli ARGS`` in a subprocess, on this checkout."""
    return subprocess.run([sys.executable, "-m", "longnet_ref.cli", *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          timeout=300, env=env)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(message) == 1, result.stderr
    for fragment in fragments:
        assert fragment in message[0], message[0]


def test_a_usage_error_ends_with_one_line_and_exit_status_2_without_traceback():
    result = run_cli("demo", "--n", "0")  # was a ZeroDivisionError traceback
    assert result.returncode == 2
    assert_one_line_error(result, "--n: expected a positive integer, got '0'")


@pytest.mark.parametrize("args, fragment", [
    (["demo", "--n", "0"], "--n: expected a positive integer, got '0'"),
    (["demo", "--segment-lengths", "256.5,512"], "--segment-lengths: expected comma-separated positive integers"),
    (["demo", "--dilation-rates", "1,-2"], "--dilation-rates: expected comma-separated positive integers"),
    (["bench", "--backend", "fast"], "--backend: invalid choice: 'fast'"),
    (["bench", "--repeats", "0"], "--repeats: expected a positive integer"),
])
def test_malformed_options_are_usage_errors(args, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and fragment in errors[0]


def test_bench_max_n_excluding_every_configuration_is_an_error_that_writes_nothing(tmp_path, capsys):
    assert main(["bench", "--max-n", "100", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--max-n 100 excludes every configuration" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra_option", [["--preset", "paper"], ["--max-n", "4096"], ["--memory"], ["--output-dir", "x"]])
def test_distributed_rejects_the_options_it_would_ignore(extra_option, capsys, monkeypatch):
    monkeypatch.setattr(bench, "weak_scaling", lambda setup: pytest.fail("must not run"))
    assert main(["bench", "--distributed", *extra_option]) == 2
    assert f"{extra_option[0]} does not apply to --distributed" in capsys.readouterr().err


def test_distributed_honours_backend_repeats_ranks_and_rows_per_rank(capsys, monkeypatch):
    seen = []

    def fake_weak_scaling(setup):
        seen.append(setup)
        return [dict(ranks=p, n=p * setup.n_per_rank, forward_s=1.0, forward_backward_s=2.0, bytes_per_rank=[(0, 0, 0)] * p)
                for p in setup.ranks]

    monkeypatch.setattr(bench, "weak_scaling", fake_weak_scaling)
    assert main(["bench", "--distributed", "--backend", "numpy", "--repeats", "5", "--ranks", "1", "2", "--n-per-rank", "512"]) == 0
    (setup,) = seen
    assert (setup.backend, setup.repeats, setup.ranks, setup.n_per_rank) == ("numpy", 5, (1, 2), 512)
    assert "backend = numpy, median of 5" in capsys.readouterr().out


def test_distributed_on_the_gpu_backend_is_an_error(capsys):
    assert main(["bench", "--distributed", "--backend", "cupy"]) == 2
    assert "--backend must be one of reference, numpy, numba" in capsys.readouterr().err  # the registry's CPU names


def test_ranks_without_distributed_is_an_error(capsys):
    assert main(["bench", "--ranks", "2"]) == 2
    assert "--ranks apply only with --distributed" in capsys.readouterr().err


def block_import(monkeypatch, *modules):
    """Make ``import module`` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_bench_on_cupy_without_the_gpu_extra_names_the_extra(capsys, monkeypatch):
    block_import(monkeypatch, "cupy")
    monkeypatch.delitem(sys.modules, "longnet_ref.backends.cupy_gpu", raising=False)
    assert main(["bench", "--backend", "cupy"]) == 3
    error = capsys.readouterr().err
    assert error.startswith("longnet-ref bench: error: ") and 'pip install "longnet-ref[gpu]"' in error
    assert 'pip install ".[gpu]"' in error  # the command that works in a clone too


def test_missing_extras_are_named_with_the_install_command(capsys, monkeypatch, tmp_path):
    block_import(monkeypatch, "matplotlib", "matplotlib.pyplot")
    assert main(["pattern", "--output-dir", str(tmp_path)]) == 3
    assert capsys.readouterr().err.strip() == 'longnet-ref pattern: error: this command needs matplotlib: pip install "longnet-ref[bench]"'
    block_import(monkeypatch, "mpi4py")
    assert main(["bench", "--distributed"]) == 3
    assert 'pip install "longnet-ref[mpi]"' in capsys.readouterr().err


def test_pattern_writes_to_a_folder_of_the_current_directory_not_docs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from longnet_ref.figures import FIGURES

    monkeypatch.chdir(tmp_path)
    assert main(["pattern"]) == 0
    assert sorted(p.name for p in (tmp_path / "longnet-ref-figures").iterdir()) == sorted(FIGURES)
    assert not (tmp_path / "docs").exists()


def help_text(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option_with_its_default_and_no_markup(capsys):
    top = help_text(capsys)
    assert "``" not in top and "demo" in top and "bench" in top and "pattern" in top
    for command in ("demo", "bench", "pattern"):
        text = help_text(capsys, command)
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        assert options, text
        for option in options:
            block = text[text.index("  " + option):].split("\n  -")[0]
            # every option has help text, and every option that takes a value shows its default
            assert len(block.split()) > 2, f"{command} {option} has no help"
            if option not in ("--causal", "--distributed", "--memory"):
                assert "default:" in block, f"{command} {option}: {block}"
