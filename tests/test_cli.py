"""The command line: ``longnet-ref demo`` verifies dilated attention against the dense oracle, and
every mistake a new user can make ends in a one-line error and a non-zero exit, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from longnet_ref import backends, bench
from longnet_ref import model as lm
from longnet_ref.checkpoint import load_checkpoint
from longnet_ref.cli import main
from tests.tolerances import SCALAR_ARITHMETIC, SUMMATION
from tests.cli_runs import TINY_TRAIN

ROOT = Path(__file__).resolve().parents[1]


def test_demo_verifies_a_small_configuration(capsys):
    assert (
        main(
            [
                "demo",
                "--n",
                "200",
                "--heads",
                "3",
                "--dim",
                "8",
                "--segment-lengths",
                "16,64,100",
                "--dilation-rates",
                "1,3,6",
                "--causal",
                "--offsets",
                "torchscale",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "OK: every error" in printed and "attended (query, key) pairs" in printed


def test_demo_reports_bad_configurations_as_an_error(capsys):
    assert main(["demo", "--n", "64", "--segment-lengths", "16,32", "--dilation-rates", "1"]) == 2
    assert "same length" in capsys.readouterr().err


def run_cli(*args, env=None):
    """``python -m longnet_ref.cli ARGS`` in a subprocess, on this checkout."""
    return subprocess.run([sys.executable, "-m", "longnet_ref.cli", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=300, env=env)


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


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["demo", "--n", "0"], "--n: expected a positive integer, got '0'"),
        (["demo", "--segment-lengths", "256.5,512"], "--segment-lengths: expected comma-separated positive integers"),
        (["demo", "--dilation-rates", "1,-2"], "--dilation-rates: expected comma-separated positive integers"),
        (["bench", "--backend", "fast"], "--backend: invalid choice: 'fast'"),
        (["bench", "--repeats", "0"], "--repeats: expected a positive integer"),
    ],
)
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
        return [dict(ranks=p, n=p * setup.n_per_rank, forward_s=1.0, forward_backward_s=2.0, bytes_per_rank=[(0, 0, 0)] * p) for p in setup.ranks]

    monkeypatch.setattr(bench, "weak_scaling", fake_weak_scaling)
    assert main(["bench", "--distributed", "--backend", "numpy", "--repeats", "5", "--ranks", "1", "2", "--n-per-rank", "512"]) == 0
    (setup,) = seen
    assert (setup.backend, setup.repeats, setup.ranks, setup.n_per_rank) == ("numpy", 5, (1, 2), 512)
    assert "backend = numpy, median of 5" in capsys.readouterr().out


def test_distributed_on_the_gpu_backend_is_an_error(capsys):
    assert main(["bench", "--distributed", "--backend", "cupy"]) == 2
    assert "--backend must be one of reference, numpy, numba" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, command, typed",
    [
        (["bench", "--n", "5"], "bench", "--n 5"),  # argparse's prefix matching would read --n-per-rank 5
        (["train", "--step", "3"], "train", "--step 3"),
        (["generate", "--checkpoint", "c", "--prompt", "a", "--temp", "0"], "generate", "--temp 0"),
        (["pattern", "--n", "0"], "pattern", "--n 0"),
        (["demo", "surplus"], "demo", "surplus"),
    ],
)
def test_an_option_is_named_in_full_and_an_unknown_one_is_reported_by_its_command(capsys, args, command, typed):
    assert_refused(capsys, args, f"longnet-ref {command}: error: unrecognized arguments: {typed}", f"(see longnet-ref {command} --help)")


def test_ranks_without_distributed_is_an_error(capsys):
    assert main(["bench", "--ranks", "2"]) == 2
    assert "--ranks applies only with --distributed" in capsys.readouterr().err


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
    assert 'pip install ".[gpu]"' in error  # the form that works in a clone


def test_missing_extras_are_named_with_the_install_command(capsys, monkeypatch, tmp_path):
    block_import(monkeypatch, "matplotlib", "matplotlib.pyplot")
    assert main(["pattern", "--output-dir", str(tmp_path)]) == 3
    assert capsys.readouterr().err.strip() == (
        'longnet-ref pattern: error: this command needs matplotlib: pip install "longnet-ref[bench]" (in a clone of the repository: pip install ".[bench]")'
    )
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
            block = text[text.index("  " + option) :].split("\n  -")[0]
            # every option has help text, and every option that takes a value shows its default
            assert len(block.split()) > 2, f"{command} {option} has no help"
            if option not in ("--causal", "--distributed", "--memory"):
                assert "default:" in block, f"{command} {option}: {block}"


# ---- every mistake of a new user: one line on stderr, a non-zero exit, before any work ------------


def run_main(args):
    """``main(args)``'s exit status, whether it returns it or argparse raises ``SystemExit``."""
    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def assert_refused(capsys, args, *fragments, status=2):
    code = run_main(args)
    captured = capsys.readouterr()
    assert code == status, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return captured


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    """A 4-step passkey run of the tiny model (its directory holds checkpoint.npz, log.json)."""
    out = tmp_path_factory.mktemp("passkey") / "run"
    assert main(["train", *TINY_TRAIN, "--steps", "4", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--text", str(folder / "t.txt"), "--out", str(folder / "run")]) == 0
    return folder / "run"


def never_called(*args, **kwargs):
    pytest.fail("the command did work before refusing")


@pytest.mark.parametrize(
    "option",
    [
        ["train", "--out"],
        ["pattern", "--output-dir"],
        ["bench", "--preset", "paper", "--output-dir"],
    ],
)
def test_an_output_path_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch, option):
    monkeypatch.setattr(bench, "run", never_called)
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    monkeypatch.setattr("longnet_ref.figures.generate", never_called)
    existing = tmp_path / "a-file"
    existing.write_text("x")
    assert_refused(capsys, [*option, str(existing)], f"{option[-1]} {existing}: exists and is not a directory")
    assert_refused(capsys, [*option, str(existing / "below")], "is a file, not a directory")


def test_bench_checks_its_output_directory_before_the_benchmark_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", never_called)
    (tmp_path / "results").write_text("x")
    assert_refused(capsys, ["bench", "--output-dir", str(tmp_path / "results")], "exists and is not a directory")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["demo", "--n", "100000000"], ["demo --n 100000000", "bytes", "the dense oracle", "available; lower --n"]),
        (["demo", "--dim", "1000000000"], ["bytes", "lower"]),
        (["train", "--n", "100000000"], ["a training step of 16 x 100000000 tokens", "bytes", "lower --n"]),
        (["train", "--d-model", "1000000"], ["params, gradients, AdamW moments", "bytes"]),
        (["train", "--layers", "100000000"], ["bytes"]),
        (["train", "--attention", "dense", "--n", "65536"], ["dense attention scores", "bytes"]),
    ],
)
def test_work_that_cannot_fit_in_memory_is_refused_with_the_bytes_it_needs(tmp_path, capsys, monkeypatch, args, fragments):
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    monkeypatch.setattr("longnet_ref.cli.demo.dilated_attention", never_called)
    monkeypatch.setattr("longnet_ref.cli.memory.available_bytes", lambda: 64 * 2**30)  # the same on every machine
    out = [] if args[0] != "train" else ["--out", str(tmp_path / "r")]
    assert_refused(capsys, [*args, *out], *fragments)
    assert not (tmp_path / "r").exists()


def test_the_evaluation_is_forwarded_in_slices_of_the_training_batch(monkeypatch):
    from longnet_ref.data import PasskeyTask
    from longnet_ref.train import TrainConfig, TrainState, evaluate

    task = PasskeyTask(16)
    config = lm.LongNetConfig(vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=4, segment_lengths=(4, 8), dilation_rates=(1, 2))
    state = TrainState.fresh(config, TrainConfig(steps=1, batch_size=3))
    batch = task.batch(8, np.random.default_rng(0))
    seen = []
    forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda c, p, tokens, **kw: seen.append(tokens.shape[0]) or forward(c, p, tokens, **kw))
    sliced = evaluate(state, batch)
    assert seen == [3, 3, 2]
    logits, _ = forward(config, state.params, batch.tokens)  # all at once, for the expected mean
    expected = -np.mean(log_softmax(logits[:, -1])[np.arange(8), batch.targets[:, -1]])
    np.testing.assert_allclose(sliced["eval_loss"], expected, **SUMMATION[np.dtype(config.dtype)])


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_train_on_a_missing_gpu_extra_fails_before_the_banner_and_the_output_directory(tmp_path, capsys, monkeypatch):
    block_import(monkeypatch, "cupy")
    captured = assert_refused(
        capsys, ["train", "--backend", "cupy", "--out", str(tmp_path / "r")], "needs CuPy", 'pip install "longnet-ref[gpu]"', 'pip install ".[gpu]"', status=3
    )
    assert captured.out == "" and not (tmp_path / "r").exists()


def test_train_n_too_short_names_the_options_not_internal_fields(capsys, tmp_path):
    captured = assert_refused(capsys, ["train", "--n", "3", "--out", str(tmp_path / "r")], "--n 3 is too short", "--passkey-span 4", "--n >= 6")
    assert "reach_fraction" not in captured.err


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--eval-every", "-1"],
        ["train", "--checkpoint-every", "-1"],
        ["train", "--blas-threads", "0"],
        ["train", "--steps", "0"],
        ["train", "--batch", "-2"],
        ["train", "--lr", "0"],
        ["train", "--lr", "nan"],
        ["train", "--lr", "inf"],
        ["train", "--clip", "-1"],
        ["train", "--weight-decay", "inf"],
        ["train", "--warmup", "-1"],
        ["train", "--n", "2.5"],
        ["train", "--seed", "-1"],
        ["train", "--window", "0"],
        ["train", "--heads", "x"],
        ["train", "--segment-lengths", "64,,128"],
        ["train", "--attention", "sparse"],
        ["train", "--backend", "fast"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--temperature", "inf"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--temperature", "nan"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--temperature", "-1"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--max-new-tokens", "-1"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--top-k", "0"],
        ["generate", "--checkpoint", "c", "--prompt", "a", "--seed", "-3"],
        ["generate", "--prompt", "a"],
        ["generate", "--checkpoint", "c"],
        ["demo", "--n", "-5"],
        ["demo", "--dim", "0"],
        ["demo", "--batch", "1e9"],
        ["demo", "--seed", "nan"],
        ["bench", "--max-n", "0"],
        ["nonsense"],
        [],
    ],
)
def test_a_malformed_option_is_one_line_naming_it(capsys, args):
    captured = assert_refused(capsys, args, "error:", "(see longnet-ref")
    assert captured.out == ""


@pytest.mark.parametrize(
    "checkpoint, message",
    [
        ("README.md", "is not a longnet-ref checkpoint: not a .npz archive"),
        ("docs", "is a directory, not a file"),
        ("nothing.npz", "does not exist"),
    ],
)
def test_generate_names_a_bad_checkpoint_without_inventing_a_file_name(capsys, monkeypatch, checkpoint, message):
    monkeypatch.chdir(ROOT)
    captured = assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", "x"], checkpoint, message)
    assert "README.npz" not in captured.err and captured.out == ""


def test_a_damaged_checkpoint_is_one_line_from_generate_and_from_resume(tmp_path, capsys, passkey_run):
    truncated = tmp_path / "checkpoint.npz"
    truncated.write_bytes((passkey_run / "checkpoint.npz").read_bytes()[:2000])
    for args in (
        ["generate", "--checkpoint", str(truncated), "--prompt", "3"],
        ["train", "--resume", str(truncated), "--steps", "9", "--out", str(tmp_path / "r")],
    ):
        assert_refused(capsys, args, str(truncated), "truncated")


def test_generate_checks_everything_before_printing_the_prompt(capsys, text_run):
    checkpoint = str(text_run / "checkpoint.npz")
    captured = assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", ""], "--prompt must not be empty")
    assert captured.out == ""
    captured = assert_refused(
        capsys, ["generate", "--checkpoint", checkpoint, "--prompt", "abc", "--max-new-tokens", str(10**18)], "bytes", "lower --max-new-tokens"
    )
    assert captured.out == ""


def test_generate_on_a_passkey_checkpoint_takes_a_passkey_and_prints_the_answer(capsys, passkey_run):
    checkpoint = str(passkey_run / "checkpoint.npz")
    assert main(["generate", "--checkpoint", checkpoint, "--prompt", "3", "--seed", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("passkey 3 hidden 4 times from position ") and "of a 16-token sequence" in lines[0]
    assert lines[1].startswith("answer: ") and lines[1].endswith(("(correct)", "(wrong)"))
    captured = assert_refused(
        capsys,
        ["generate", "--checkpoint", checkpoint, "--prompt", "Dilated attention"],
        "is a passkey-retrieval model",
        "an integer from 1 to 8",
        "--text FILE",
    )
    assert captured.out == ""
    assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", "9"], "from 1 to 8, got '9'")
    assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", "3", "--temperature", "0.5"], "--temperature applies to text checkpoints only")


def test_a_run_is_not_overwritten_by_another_unless_asked(tmp_path, capsys, monkeypatch, passkey_run, text_run):
    text = text_run.parent / "t.txt"
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    before = (passkey_run / "checkpoint.npz").read_bytes()
    assert_refused(capsys, ["train", *TINY_TRAIN, "--text", str(text), "--out", str(passkey_run)], f"--out {passkey_run} already holds a run", "--overwrite")
    assert (passkey_run / "checkpoint.npz").read_bytes() == before
    monkeypatch.undo()  # train for real from here on
    monkeypatch.chdir(tmp_path)  # the default directories differ per task
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--text", str(text), "--eval-every", "0"]) == 0
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-passkey", "train-text"]
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--overwrite"]) == 0


@pytest.mark.parametrize(
    "option, value, saved",
    [
        ("--d-model", "32", "16"),
        ("--lr", "0.1", "0.003"),
        ("--layers", "2", "1"),
        ("--heads", "2", "4"),
        ("--attention", "dense", "dilated"),
        ("--segment-lengths", "4,16", "4,8"),
        ("--batch", "3", "2"),
        ("--dtype", "float64", "float32"),
        ("--seed", "1", "0"),
        ("--n", "32", "16"),
        ("--passkey-span", "2", "4"),
        ("--offsets", "torchscale", "paper"),
        ("--dilation-rates", "1,4", "1,2"),
        ("--window", "5", "None"),
        ("--weight-decay", "0.5", "0.1"),
        ("--clip", "2.0", "1.0"),
    ],
)
def test_resume_refuses_options_that_contradict_its_checkpoint(tmp_path, capsys, monkeypatch, passkey_run, option, value, saved):
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    assert_refused(
        capsys,
        ["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "8", option, value, "--out", str(tmp_path / "r")],
        f"{option} {value} conflicts with the checkpoint's {saved}",
    )


def test_resume_with_nothing_left_to_do_is_an_error_not_an_empty_log(tmp_path, capsys, monkeypatch, passkey_run):
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    log = (passkey_run / "log.json").read_bytes()
    for steps in (["--steps", "3"], ["--steps", "4"], []):
        assert_refused(capsys, ["train", "--resume", str(passkey_run / "checkpoint.npz"), *steps], "the checkpoint is at step 4 of 4", "nothing to do", "N > 4")
    assert (passkey_run / "log.json").read_bytes() == log


def test_train_runs_without_tqdm_and_matplotlib(tmp_path, capsys, monkeypatch):
    block_import(monkeypatch, "tqdm", "matplotlib", "matplotlib.pyplot")
    assert main(["train", *TINY_TRAIN, "--steps", "4", "--out", str(tmp_path / "q")]) == 0  # --quiet: a base install
    assert not (tmp_path / "q" / "loss.png").exists() and (tmp_path / "q" / "checkpoint.npz").exists()
    assert "no loss.png: drawing it needs matplotlib" in capsys.readouterr().out
    loud = [a for a in TINY_TRAIN if a != "--quiet"]
    assert main(["train", *loud, "--steps", "4", "--out", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    # plain progress lines: every step of 4 (steps // 20 rounds up to 1), evaluations at 2 and 4
    steps = [line.split()[1] for line in out.splitlines() if line.startswith("step ")]
    assert steps == ["1/4", "2/4", "3/4", "4/4"]
    assert "held-out loss" in [line for line in out.splitlines() if line.startswith("step 2/4")][0]


def test_an_unexpected_exception_is_one_line_asking_for_a_report(capsys, monkeypatch):
    def bug(args):
        raise RuntimeError("an internal\ninvariant broke")

    monkeypatch.setattr("longnet_ref.cli.demo.run", bug)
    assert_refused(capsys, ["demo"], "unexpected RuntimeError: an internal invariant broke", "please report it", status=70)


def test_help_has_a_description_per_command_and_each_default_once(capsys):
    for command in ("demo", "bench", "pattern", "train", "generate"):
        text = help_text(capsys, command)
        description = text.split("\n\n")[1]
        assert len(description.split()) > 5, f"{command} has no description"
        options = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
        for option in options:
            block = text[text.index("  " + option) :].split("\n  -")[0]
            assert block.count("default") <= 1, f"{command} {option}: {block}"
            assert "(default: None)" not in block, f"{command} {option}: {block}"
    generate_help = help_text(capsys, "generate")
    for required in ("--checkpoint", "--prompt"):
        block = generate_help[generate_help.index("  " + required) :].split("\n  -")[0]
        assert "default" not in block
    train_help = help_text(capsys, "train")
    assert "--attention {dilated,dense,window}" in train_help
    assert "--backend {" + ",".join(backends.BACKENDS) + "}" in train_help


def test_every_module_the_readme_lists_in_the_api_is_an_attribute_of_the_package():
    listed = {"complexity"}  # README, "The public API (all importable from longnet_ref)"
    code = "import longnet_ref; print(sorted(m for m in %r if hasattr(longnet_ref, m)))" % sorted(listed)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == str(sorted(listed))


@pytest.mark.parametrize(
    "args",
    [
        ["--n", "1", "--causal"],  # one row that attends itself: dq = dk = 0 exactly
        ["--n", "8", "--heads", "3", "--segment-lengths", "4", "--dilation-rates", "2"],  # rows no branch covers: lse = -inf
        ["--n", "64", "--segment-lengths", "16", "--dilation-rates", str(2**40)],  # r > w: one row per segment
    ],
)
def test_demo_passes_configurations_with_vanishing_gradients_and_uncovered_rows(capsys, args):
    assert main(["demo", *args, "--backend", "numpy"]) == 0, capsys.readouterr().out
    assert "OK: every error" in capsys.readouterr().out


def test_the_demo_check_counts_a_one_sided_infinity_or_nan_as_an_error():
    from longnet_ref.cli.demo import max_relative_error

    oracle = np.array([-np.inf, 2.0, 0.5])
    assert max_relative_error(oracle.copy(), oracle) == 0.0
    assert max_relative_error(np.array([0.0, 2.0, 0.5]), oracle) == np.inf
    assert np.isnan(max_relative_error(np.array([-np.inf, np.nan, 0.5]), oracle))
    assert max_relative_error(np.array([-np.inf, 2.0, 0.6]), oracle) == abs(0.6 - 0.5) / 2.0  # relative above 1
    assert max_relative_error(np.array([1e-3, 0.0]), np.array([1e-17, 0.0])) == abs(1e-3 - 1e-17)  # absolute below 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "8"], "--window applies only with --attention window"),
        (["--text", "README.md", "--passkey-span", "2"], "--passkey-span applies only to the passkey task"),
    ],
)
def test_an_option_the_run_would_ignore_is_refused(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(ROOT)
    assert_refused(capsys, ["train", *args, "--out", str(tmp_path / "r")], message)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--out", ""],
        ["pattern", "--output-dir", ""],
        ["bench", "--output-dir", ""],
        ["train", "--text", ""],
        ["generate", "--checkpoint", "", "--prompt", "x"],
    ],
)
def test_an_empty_path_is_refused(capsys, args):
    assert_refused(capsys, args, "must not be empty")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("longnet-ref 0.")


def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "r"
    assert_refused(
        capsys,
        ["train", *TINY_TRAIN, "--steps", "6", "--lr", "1e20", "--checkpoint-every", "1", "--out", str(out)],
        "are not finite at step",
        "training diverged",
        "--lr 1e+20",
    )
    state, _ = load_checkpoint(out / "checkpoint.npz")  # the last step whose parameters were finite
    assert all(np.isfinite(p).all() for p in state.params.values())
    assert not (out / "log.json").exists()


# ---- what the options of a run reach (found by injected bugs: each test below failed with one) ------


def test_every_training_option_reaches_the_runs_configs(tmp_path):
    """The values typed on the command line, read back from log.json and the checkpoint; the
    cosine ends at ``min_lr = lr / 10`` (the help's promise): with ``--warmup 1 --steps 3`` the
    last step's lr is exactly ``lr / 10``."""
    out = tmp_path / "r"
    options = ["--steps", "3", "--warmup", "1", "--lr", "0.02", "--weight-decay", "0.25", "--clip", "0.5", "--seed", "3"]
    assert main(["train", *TINY_TRAIN, *options, "--out", str(out)]) == 0
    log = json.loads((out / "log.json").read_text())
    train = log["train"]
    assert (train["steps"], train["warmup"], train["lr"], train["weight_decay"], train["clip"], train["seed"]) == (3, 1, 0.02, 0.25, 0.5, 3)
    assert train["min_lr"] == pytest.approx(0.002, **SCALAR_ARITHMETIC)  # lr / 10
    assert log["model"]["seed"] == 3  # one --seed: the initialisation and the data
    assert [r["lr"] for r in log["records"]] == pytest.approx([0.02, 0.011, 0.002], **SCALAR_ARITHMETIC)  # warm-up 1, cosine half-way, min_lr
    state, _ = load_checkpoint(out / "checkpoint.npz")
    assert state.train.seed == state.config.seed == 3 and state.train.clip == 0.5 and state.train.weight_decay == 0.25


def test_every_model_option_reaches_the_models_config(tmp_path):
    """The model options typed, read back from log.json and the checkpoint's LongNetConfig."""
    out = tmp_path / "r"
    options = ["--attention", "window", "--window", "5", "--offsets", "torchscale", "--no-rope", "--dtype", "float64", "--seed", "2"]
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", *options, "--out", str(out)]) == 0
    model = json.loads((out / "log.json").read_text())["model"]
    expected = {"attention": "window", "window": 5, "offsets": "torchscale", "rope": False, "dtype": "float64", "seed": 2}
    expected |= {"d_model": 16, "n_heads": 4, "n_layers": 1, "segment_lengths": [4, 8], "dilation_rates": [1, 2], "backend": "numpy"}
    assert {name: model[name] for name in expected} == expected
    assert load_checkpoint(out / "checkpoint.npz")[0].config.to_dict() == model


def test_resume_reads_a_moved_text_from_the_text_option(tmp_path):
    """A text run resumes after its file moved when ``--text`` names the new place (the error for
    a missing file says to do so), and the checkpoint then records the new place."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--text", str(text), "--out", str(tmp_path / "r")]) == 0
    moved = text.rename(tmp_path / "moved.txt")
    assert main(["train", "--resume", str(tmp_path / "r" / "checkpoint.npz"), "--steps", "2", "--text", str(moved), "--quiet"]) == 0
    state, extra = load_checkpoint(tmp_path / "r" / "checkpoint.npz")
    assert state.step == 2 and extra["text"] == str(moved.absolute())


def test_the_held_out_evaluation_does_not_change_the_training_run(tmp_path):
    """The held-out batch has its own generator: evaluating every step or never trains the same
    model on the same batches (the same losses, bit for bit, and the same parameters)."""
    runs = {}
    for every in ("1", "0"):
        out = tmp_path / f"eval-{every}"
        assert main(["train", *TINY_TRAIN, "--steps", "3", "--eval-every", every, "--out", str(out)]) == 0
        runs[every] = json.loads((out / "log.json").read_text())["records"], load_checkpoint(out / "checkpoint.npz")[0]
    (evaluated, state), (plain, plain_state) = runs["1"], runs["0"]
    assert all("eval_loss" in r for r in evaluated) and not any("eval_loss" in r for r in plain)
    assert [r["loss"] for r in evaluated] == [r["loss"] for r in plain]
    for name, value in plain_state.params.items():
        np.testing.assert_array_equal(state.params[name], value, err_msg=name)


def test_resume_runs_on_the_backend_given(tmp_path, passkey_run):
    """``--backend`` may differ from the checkpoint's on resume (its help says so), and then it is used."""
    assert load_checkpoint(passkey_run / "checkpoint.npz")[0].config.backend == "numpy"
    out = tmp_path / "r"
    assert main(["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "5", "--backend", "reference", "--quiet", "--out", str(out)]) == 0
    assert json.loads((out / "log.json").read_text())["model"]["backend"] == "reference"
    assert load_checkpoint(out / "checkpoint.npz")[0].config.backend == "reference"


def test_the_passkey_answer_is_the_models_arg_max_at_the_query(capsys, monkeypatch, passkey_run):
    """The model reads the task's sequence (the key hidden --passkey-span = 4 times, filler from
    --seed, the query last) and the printed answer is the arg-max of its logits at the query, not
    a token of the prompt."""
    from longnet_ref.cli import generate as command
    from longnet_ref.data import PasskeyTask

    prompts = []
    real_generate = command.generate
    monkeypatch.setattr(command, "generate", lambda config, params, tokens, *a, **kw: prompts.append(tokens) or real_generate(config, params, tokens, *a, **kw))
    state, _ = load_checkpoint(passkey_run / "checkpoint.npz")
    task = PasskeyTask(16, span=4)  # TINY's --n 16 and the default --passkey-span 4
    for key, seed in ((3, 5), (8, 1)):
        tokens = task.batch(1, np.random.default_rng(seed), keys=[key]).tokens
        assert (tokens == key).sum() == 4 and tokens[0, -1] == 0  # hidden four times, the query last
        logits, _ = lm.forward(state.config, state.params, tokens)
        assert main(["generate", "--checkpoint", str(passkey_run / "checkpoint.npz"), "--prompt", str(key), "--seed", str(seed)]) == 0
        lines = capsys.readouterr().out.splitlines()
        where = int(np.flatnonzero(tokens[0] == key)[0])
        assert lines[0] == f"passkey {key} hidden 4 times from position {where} of a 16-token sequence (filler: --seed {seed}); asked for at position 15"
        answer = int(logits[0, -1].argmax())
        assert lines[1] == f"answer: {answer} ({'correct' if answer == key else 'wrong'})"
        np.testing.assert_array_equal(prompts.pop(), tokens[0])  # the sequence the answer came from


# ---- the checks of generate and --resume on the checkpoint's task (found by a systematic audit) -----


@pytest.mark.parametrize("prompt", ["0", "9", "-1", "3.0"])
def test_the_passkey_prompt_is_an_integer_from_one_to_the_number_of_keys(capsys, passkey_run, prompt):
    """Token 0 is the query marker and 9 the first filler of the default 8 keys: neither is a passkey."""
    checkpoint = str(passkey_run / "checkpoint.npz")
    captured = assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", prompt], f"an integer from 1 to 8, got {prompt!r}")
    assert captured.out == ""


@pytest.mark.parametrize(
    "source, extra, generate_says, resume_says",
    [
        ("passkey", {}, "it does not say which task it was trained on", "the checkpoint does not say which task it was trained on"),
        ("passkey", {"task": "poetry", "n": 16}, "it does not say which task it was trained on", "the checkpoint does not say which task it was trained on"),
        (
            "text",
            {"task": "passkey", "n": 16, "passkey_span": 4},
            "the model's vocabulary (256) is not its passkey task's (25)",
            "the model's vocabulary (256) is not its task's (25)",
        ),
        (
            "passkey",
            {"task": "passkey", "n": 16, "passkey_span": 20},
            "its passkey task is not valid (span 20 does not fit before the query",
            "--n 16 is too short for the passkey task with --passkey-span 20",
        ),
    ],
    ids=["no task", "unknown task", "vocabulary of another task", "a passkey span that does not fit"],
)
def test_a_checkpoint_whose_task_is_missing_or_not_its_models_is_refused(
    tmp_path, capsys, monkeypatch, passkey_run, text_run, source, extra, generate_says, resume_says
):
    from longnet_ref.checkpoint import save_checkpoint

    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    state, _ = load_checkpoint((passkey_run if source == "passkey" else text_run) / "checkpoint.npz")
    checkpoint = str(save_checkpoint(state, tmp_path / "c.npz", extra))
    captured = assert_refused(capsys, ["generate", "--checkpoint", checkpoint, "--prompt", "3"], generate_says)
    assert captured.out == ""
    assert_refused(capsys, ["train", "--resume", checkpoint, "--steps", "9", "--out", str(tmp_path / "r")], resume_says)


def test_resume_of_a_passkey_run_refuses_a_text(tmp_path, capsys, monkeypatch, passkey_run, text_run):
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    text = str(text_run.parent / "t.txt")
    assert_refused(
        capsys,
        ["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "9", "--text", text, "--out", str(tmp_path / "r")],
        "--text conflicts with the checkpoint",
        "trained on the passkey task",
    )


def test_resume_accepts_the_warm_up_its_run_was_capped_at(tmp_path, capsys, passkey_run):
    """The passkey run trained 4 steps with the default --warmup 30, capped at its 4 steps: repeating
    any --warmup >= 4 repeats that run's option (the run continues); a --warmup below 4 contradicts it."""
    assert load_checkpoint(passkey_run / "checkpoint.npz")[0].train.warmup == 4
    resume = ["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "5", "--quiet"]
    assert_refused(capsys, [*resume, "--warmup", "3", "--out", str(tmp_path / "r")], "--warmup 3 conflicts with the checkpoint's 4")
    for warmup in ("4", "30"):
        assert run_main([*resume, "--warmup", warmup, "--out", str(tmp_path / warmup)]) == 0
        assert load_checkpoint(tmp_path / warmup / "checkpoint.npz")[0].step == 5


@pytest.mark.parametrize("every, saves", [("0", [3]), ("2", [2, 3]), ("1", [1, 2, 3, 3])])
def test_checkpoint_every_k_steps_and_at_the_end(tmp_path, monkeypatch, every, saves):
    """``--checkpoint-every k`` writes the checkpoint at every k-th step, and always at the end
    (``0: only at the end``, the help's promise): the steps of the states saved, in order."""
    from longnet_ref.cli import train as command

    saved = []
    real = command.save_checkpoint
    monkeypatch.setattr(command, "save_checkpoint", lambda state, *a, **kw: saved.append(state.step) or real(state, *a, **kw))
    assert main(["train", *TINY_TRAIN, "--steps", "3", "--checkpoint-every", every, "--out", str(tmp_path / "r")]) == 0
    assert saved == saves
    assert load_checkpoint(tmp_path / "r" / "checkpoint.npz")[0].step == 3


def test_parallel_on_one_rank_checks_what_sequence_parallel_training_needs_before_any_work(tmp_path):
    """``--parallel`` forces sequence-parallel training even as one process (the help's promise), so
    its requirements are checked up front there too: one line, exit 2, nothing written."""
    pytest.importorskip("mpi4py")
    result = run_cli("train", *TINY_TRAIN, "--steps", "1", "--parallel", "--attention", "dense", "--out", str(tmp_path / "r"))
    assert_one_line_error(result, "--attention dense is not sequence-parallel")
    assert result.returncode == 2
    assert result.stdout == "" and not (tmp_path / "r").exists()


def test_resume_into_a_directory_holding_another_run_is_refused(tmp_path, capsys, monkeypatch, passkey_run, text_run):
    """``--resume A --out B`` continues A's run in B: a B holding another run is not overwritten."""
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    before = (text_run / "checkpoint.npz").read_bytes()
    args = ["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "9", "--out", str(text_run)]
    assert_refused(capsys, args, f"--out {text_run} already holds a run", "--overwrite")
    assert (text_run / "checkpoint.npz").read_bytes() == before


def test_the_held_out_batch_is_drawn_from_seed_10000_plus_the_runs_seed(tmp_path):
    """The help's promise (64 passkey sequences drawn once from seed 10000 + --seed): the logged
    held-out loss at the last step is that batch's loss under the checkpoint written at that step."""
    from longnet_ref.data import PasskeyTask
    from longnet_ref.train import evaluate

    out = tmp_path / "r"
    assert main(["train", *TINY_TRAIN, "--steps", "2", "--seed", "7", "--out", str(out)]) == 0
    logged = json.loads((out / "log.json").read_text())["records"][-1]["eval_loss"]
    state, _ = load_checkpoint(out / "checkpoint.npz")
    batch = PasskeyTask(16, span=4).batch(64, np.random.default_rng(10_007))  # TINY's --n 16, the default span 4
    assert logged == pytest.approx(evaluate(state, batch)["eval_loss"], rel=SUMMATION[np.dtype(np.float32)]["rtol"])
    other = PasskeyTask(16, span=4).batch(64, np.random.default_rng(10_000))
    assert evaluate(state, other)["eval_loss"] != pytest.approx(logged, rel=SUMMATION[np.dtype(np.float32)]["rtol"])


def test_parameters_that_turn_non_finite_stop_the_run_before_a_checkpoint_even_with_a_finite_loss(tmp_path, capsys, monkeypatch):
    """The loss of a step is computed before its update: an update that makes a parameter infinite
    shows in the parameters first. The run stops there, keeping no checkpoint of them."""

    def fit_that_overflows(state, task, *, on_record, **kwargs):
        state.params["ln_f.bias"][0] = np.inf
        state.step += 1
        on_record({"step": state.step, "loss": 1.0, "lr": 0.0, "grad_norm": 0.0, "seconds": 1.0, "tokens_per_s": 1.0})
        pytest.fail("the run went on past non-finite parameters")

    monkeypatch.setattr("longnet_ref.cli.train.fit", fit_that_overflows)
    out = tmp_path / "r"
    assert_refused(
        capsys, ["train", *TINY_TRAIN, "--steps", "3", "--checkpoint-every", "1", "--out", str(out)], "are not finite at step 1", "training diverged"
    )
    assert not (out / "checkpoint.npz").exists()


def test_a_text_given_by_a_relative_path_resumes_from_another_directory(tmp_path, monkeypatch):
    """The checkpoint records the text's absolute path, so --resume finds it from any directory."""
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--text", "t.txt", "--out", "r"]) == 0
    assert load_checkpoint(tmp_path / "r" / "checkpoint.npz")[1]["text"] == str(tmp_path / "t.txt")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["train", "--resume", str(tmp_path / "r" / "checkpoint.npz"), "--steps", "2", "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "r" / "checkpoint.npz")[0].step == 2


def test_resume_refuses_no_rope_for_a_run_with_rope(tmp_path, capsys, monkeypatch, passkey_run):
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    args = ["train", "--resume", str(passkey_run / "checkpoint.npz"), "--steps", "8", "--no-rope", "--out", str(tmp_path / "r")]
    assert_refused(capsys, args, "--no-rope True conflicts with the checkpoint's False")


def test_the_log_states_the_tasks_chance_loss(passkey_run, text_run):
    """Chance: a uniform guess among the 8 passkeys (ln 8 nats), among the 256 bytes of text (ln 256)."""
    assert json.loads((passkey_run / "log.json").read_text())["chance_loss"] == pytest.approx(3 * np.log(2), **SCALAR_ARITHMETIC)
    assert json.loads((text_run / "log.json").read_text())["chance_loss"] == pytest.approx(8 * np.log(2), **SCALAR_ARITHMETIC)


def test_resume_of_a_text_run_whose_file_moved_asks_for_it(tmp_path, capsys, monkeypatch):
    """Without --text, a text that is gone is named, and the message says how to continue."""
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--text", str(text), "--out", str(tmp_path / "r")]) == 0
    text.rename(tmp_path / "moved.txt")
    monkeypatch.setattr("longnet_ref.cli.train.fit", never_called)
    assert_refused(
        capsys, ["train", "--resume", str(tmp_path / "r" / "checkpoint.npz"), "--steps", "2"], f"({text.absolute()} is gone); give it with --text FILE"
    )


@pytest.mark.parametrize(
    "task, accepted, refused, message",
    [
        ("text", 17, 16, "--n 16 needs at least n + 1 = 17"),  # bytes of the file: one window of n + 1
        ("passkey", 6, 5, "--n 5 is too short for the passkey task with --passkey-span 4"),  # 4 copies, a filler, the query
    ],
)
def test_the_smallest_task_a_run_accepts_and_the_first_it_refuses(tmp_path, capsys, task, accepted, refused, message):
    """The text's bytes for ``--n 16``: a window is n + 1 = 17 bytes. The passkey's ``--n`` for the
    default span 4: ``max(1, floor(n / 4)) + 4 < n`` first holds at n = 6 (the help's rule)."""
    if task == "text":
        runs = {}
        for size in (accepted, refused):
            (tmp_path / f"{size}.txt").write_bytes(bytes(range(65, 65 + size)))
            runs[size] = ["--n", "16", "--text", str(tmp_path / f"{size}.txt")]
    else:
        runs = {n: ["--n", str(n)] for n in (accepted, refused)}
    args = [*TINY_TRAIN, "--steps", "1", "--eval-every", "0"]
    assert main(["train", *args, *runs[accepted], "--out", str(tmp_path / "ok")]) == 0
    assert_refused(capsys, ["train", *args, *runs[refused], "--out", str(tmp_path / "no")], message)


def test_without_tqdm_a_progress_line_is_printed_at_every_evaluation(tmp_path, capsys, monkeypatch):
    """Plain lines every ``steps / PROGRESS_LINES`` steps *and* at every evaluation (the help's
    promise): with 2 lines per run of 4 steps, steps 2 and 4, and step 3 for its evaluation."""
    block_import(monkeypatch, "tqdm")
    monkeypatch.setattr("longnet_ref.cli.train.PROGRESS_LINES", 2)
    tiny = [a for a in TINY_TRAIN if a != "--quiet"]
    assert main(["train", *tiny, "--steps", "4", "--eval-every", "3", "--out", str(tmp_path / "r")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "3/4", "4/4"]
    assert "held-out loss" in lines[1] and "held-out loss" not in lines[0]


def test_a_passkey_written_once_is_said_to_be_at_its_position(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--passkey-span", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out / "checkpoint.npz"), "--prompt", "3"]) == 0
    assert capsys.readouterr().out.startswith("passkey 3 hidden at position ")


def test_blas_threads_limits_the_blas_pool_of_the_run(tmp_path, monkeypatch):
    """``--blas-threads k`` is the BLAS thread limit the run trains under (threadpoolctl's)."""
    import threadpoolctl

    limits = []
    real = threadpoolctl.threadpool_limits
    monkeypatch.setattr(threadpoolctl, "threadpool_limits", lambda limit, **kw: limits.append((limit, kw)) or real(limit, **kw))
    assert main(["train", *TINY_TRAIN, "--steps", "1", "--eval-every", "0", "--blas-threads", "3", "--out", str(tmp_path / "r")]) == 0
    assert limits == [(3, {"user_api": "blas"})]


def test_the_summary_counts_its_steps_in_words(tmp_path, capsys):
    """``... ; 1 step in ...`` for one step, ``2 steps`` for two (the summary line of a run)."""
    loud = [a for a in TINY_TRAIN if a != "--quiet"]
    for steps, words in (("1", "; 1 step in "), ("2", "; 2 steps in ")):
        assert main(["train", *loud, "--steps", steps, "--eval-every", "0", "--out", str(tmp_path / steps)]) == 0
        assert words in capsys.readouterr().out
