"""The conformance kit checked on itself (issue 20): this package's backends and a slow loop
implementation pass; each classic mistake (tests/conformance_mutants.py) fails in the section
where it lives, and only there, with a small counterexample; the kit's oracle agrees with the
independent loop oracle of tests/oracle.py and with the library's reference."""

import json
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from longnet_ref import dilated_attention
from longnet_ref.cli import main
from longnet_ref.conformance import check
from longnet_ref.conformance import oracle as kit_oracle
from longnet_ref.conformance.targets import numpy_backward, numpy_forward
from longnet_ref.validation import InputTypeError

from . import conformance_mutants as mutants
from . import oracle as loop_oracle
from .tolerances import SUMMATION

EXAMPLES = 5  # per section: enough for Hypothesis to find each mistake below (seeded), CI stays fast
SEED = 3
_REPORTS = {}


def run(forward, backward=None, **kwargs):
    """``check`` with the tests' settings; a report is computed once per argument set."""
    key = (forward, backward, tuple(sorted((name, repr(value)) for name, value in kwargs.items())))
    if key not in _REPORTS:
        _REPORTS[key] = check(forward, backward, max_examples=EXAMPLES, seed=SEED, **kwargs)
    return _REPORTS[key]


def test_the_numpy_backend_conforms():
    report = run(numpy_forward, numpy_backward)
    assert report.ok, str(report)
    assert report.sections == {**{f"§{i}": "pass" for i in range(1, 8)}, "§8": "n/a"}


def test_the_torchscale_offsets_conform_when_claimed():
    torchscale = run(partial(numpy_forward, offsets="torchscale"), partial(numpy_backward, offsets="torchscale"), offsets="torchscale")
    assert torchscale.ok, str(torchscale)
    assert torchscale.sections["§8"] == "pass"


def test_a_correct_slow_loop_implementation_conforms_and_without_backward_the_gradient_is_not_applicable():
    report = run(mutants.loop_forward)
    assert report.ok, str(report)
    assert report.sections["§5"] == "n/a"


# (forward, backward, the section it must fail, words of the diagnosis, the causal setting checked:
# the non-causal mistakes are checked with causal=False only, to keep CI fast)
MISTAKES = [
    (mutants.union_forward, None, "§4", "union", False),
    (mutants.no_diagonal_forward, None, "§3", "diagonal", None),
    (mutants.other_offsets_forward, None, "§2", "'torchscale' rule", False),
    (mutants.scale_one_over_d_forward, None, "§1", "scale 1/D", False),
    (mutants.padded_forward, None, "§3", "padding", False),
    (mutants.averaged_forward, None, "§4", "averages", False),
    (mutants.library_forward, mutants.detached_weights_backward, "§5", "mixture weights", False),
    (mutants.nan_spreading_forward, None, "§7", "does not attend it", None),
]


@pytest.mark.parametrize(
    ("forward", "backward", "section", "diagnosis", "causal"), MISTAKES, ids=[m[0].__name__ + (f"+{m[1].__name__}" if m[1] else "") for m in MISTAKES]
)
def test_each_classic_mistake_fails_in_its_own_section_with_a_small_counterexample(forward, backward, section, diagnosis, causal):
    report = run(forward, backward, causal=causal)
    assert [f.section for f in report.failures] == [section], str(report)
    failure = report.failures[0]
    assert diagnosis in failure.message
    config = failure.config
    assert config["n"] <= 5 and config["heads"] <= 3 and config["batch"] == 1 and len(config["segment_lengths"]) <= 2
    assert failure.seed == config["seed"]


def test_the_wrong_offset_rule_is_also_caught_when_torchscale_offsets_are_claimed():
    report = run(mutants.branches_forward, offsets="torchscale")
    assert report.sections["§2"] == "fail"
    assert "'paper' rule" in report.failure("§2").message


def test_outside_the_domain_is_not_applicable_inside_an_exception_is_a_failure():
    def forward(q, k, v, segment_lengths, dilation_rates, *, causal):
        if causal or len(segment_lengths) > 1:
            raise NotImplementedError("only non-causal single-branch attention")
        return dilated_attention(q, k, v, segment_lengths, dilation_rates)

    assert run(forward, domain=["non_causal", "one_branch"]).ok
    report = run(forward, domain=["non_causal"])
    assert report.sections["§1"] == "fail"
    assert "NotImplementedError: only non-causal single-branch attention" in report.failure("§1").message


def test_the_report_is_a_table_and_json():
    report = run(mutants.union_forward, causal=False)  # computed once, by the test above
    text = str(report)
    assert "| §4 | The mixture" in text and "NOT CONFORMANT" in text and f"seed={SEED}" in text
    data = json.loads(report.to_json())
    assert data["ok"] is False and data["failures"][0]["section"] == "§4"
    assert [s["status"] for s in data["sections"]] == list(report.sections.values())


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(offsets="blocks"), ValueError, "offsets"),
        (dict(dtype="float16"), ValueError, "dtype"),
        (dict(max_examples=0), ValueError, "max_examples"),
        (dict(causal="yes"), InputTypeError, "causal"),
        (dict(framework="tensorflow"), ValueError, "framework"),
        (dict(domain=["even_n"]), ValueError, "domain"),
    ],
)
def test_bad_options_are_refused_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        check(numpy_forward, **kwargs)
    with pytest.raises(InputTypeError, match="forward"):
        check("numpy_forward")


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 10),
    heads=st.integers(1, 3),
    branches=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=3),
    causal=st.booleans(),
    rule=st.sampled_from(["paper", "torchscale"]),
    seed=st.integers(0, 2**16),
)
def test_the_kits_oracle_agrees_with_the_loop_oracle_and_the_reference(n, heads, branches, causal, rule, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, n, heads, 3))
    v, dout = rng.standard_normal((2, 1, n, heads, 2))
    w, r = (list(x) for x in zip(*branches))
    m = kit_oracle.multiplicity(n, heads, tuple(w), tuple(r), causal, rule)
    np.testing.assert_array_equal(m, loop_oracle.multiplicity(n, heads, w, r, causal, rule))
    out = kit_oracle.forward(q, k, v, m, 1 / np.sqrt(3))
    np.testing.assert_allclose(out, loop_oracle.dilated_attention(q, k, v, w, r, causal=causal, offsets=rule)[0], **SUMMATION[np.dtype(np.float64)])
    np.testing.assert_allclose(out, dilated_attention(q, k, v, w, r, causal=causal, offsets=rule), **SUMMATION[np.dtype(np.float64)])
    grads = kit_oracle.gradients(dout, q, k, v, m, 1 / np.sqrt(3))
    for got, want in zip(grads, loop_oracle.dilated_attention_gradients(dout, q, k, v, w, r, causal=causal, offsets=rule)):
        np.testing.assert_allclose(got, want, **SUMMATION[np.dtype(np.float64)])


TARGETS = "longnet_ref.conformance.targets"


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_longnet_ref_check_of_our_backends_exits_0(backend, capsys, tmp_path):
    report = tmp_path / "report.json"
    status = main(
        ["check", f"{TARGETS}:{backend}_forward", "--backward", f"{TARGETS}:{backend}_backward", "--examples", "4", "--seed", "0", "--json", str(report)]
    )
    assert status == 0
    assert "CONFORMANT" in capsys.readouterr().out
    assert json.loads(report.read_text())["ok"] is True


def test_longnet_ref_check_of_a_wrong_implementation_exits_1_and_names_the_section(capsys):
    assert main(["check", "tests.conformance_mutants:scale_one_over_d_forward", "--examples", str(EXAMPLES), "--seed", str(SEED), "--causal", "no"]) == 1
    out = capsys.readouterr().out
    assert "| §1 | Tensors and layout: shape, dtype, scale 1/sqrt(D) | fail |" in out and "dense attention with scale 1/D" in out


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["no_such_module:forward"], "cannot import 'no_such_module'"),
        (["math:pi"], "not callable"),
        (["math"], "MODULE:FUNCTION"),
        (["math:sqrt", "--bogus"], "unrecognized arguments: --bogus"),
        (["math:sqrt", "--offsets", "blocks"], "--offsets"),
        (["math:sqrt", "--examples", "0"], "--examples"),
    ],
)
def test_longnet_ref_check_usage_errors_are_one_line_with_exit_2(argv, says, capsys):
    try:
        status = main(["check", *argv])
    except SystemExit as exit_:  # argparse's errors (one line, from check's own parser)
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1


def test_a_usage_error_from_the_installed_command_has_no_traceback():
    result = subprocess.run([sys.executable, "-m", "longnet_ref.cli", "check", "no_such_module:forward"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_the_conformance_page_shows_the_recorded_peer_table(capsys):
    """docs/conformance.md's table and counterexamples are what ``conformance_peers.py --show``
    prints from the committed JSON (no torch needed), so the page cannot drift from the run."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("conformance_peers", root / "benchmarks" / "conformance_peers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--show", str(root / "benchmarks" / "results" / "conformance_peers.json")]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| ", "- "))]
    page = (root / "docs" / "conformance.md").read_text()
    assert len(shown) >= 10 and all(line in page for line in shown)


def test_the_array_api_adapter_checks_the_reference_on_array_api_strict_arrays():
    pytest.importorskip("array_api_strict")
    report = check(numpy_forward, numpy_backward, framework="array-api-strict", max_examples=2, seed=0, causal=False)
    assert report.ok, str(report)
    assert report.settings["framework"] == "array-api-strict"


def test_a_framework_is_imported_only_when_asked_and_its_absence_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert run(numpy_forward, numpy_backward, causal=False).ok  # numpy needs no torch
    with pytest.raises(ImportError, match="framework 'torch' is not installed"):
        check(numpy_forward, framework="torch")
