"""The command line: ``longnet-ref demo`` verifies dilated attention against the dense oracle."""

from longnet_ref.cli import main


def test_demo_verifies_a_small_configuration(capsys):
    assert main(["demo", "--n", "200", "--heads", "3", "--dim", "8", "--segment-lengths", "16,64,100",
                 "--dilation-rates", "1,3,6", "--causal", "--offsets", "torchscale", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "OK: every error" in printed and "attended (query, key) pairs" in printed


def test_demo_reports_bad_configurations_as_an_error(capsys):
    assert main(["demo", "--n", "64", "--segment-lengths", "16,32", "--dilation-rates", "1"]) == 2
    assert "same length" in capsys.readouterr().err
