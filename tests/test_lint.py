"""Lint and format (ruff, as configured in pyproject.toml [tool.ruff]): an unused or undefined name,
an import regression, a NumPy 2 deprecation or unformatted code fails the suite, and so CI."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is in the test extra (pip install '.[test]')"
    result = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is missing: it is in the test extra (pip install '.[test]')"
    result = subprocess.run([ruff, "format", "--check", "--no-cache", str(ROOT)], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode == 0, "run `ruff format .`: " + result.stdout + result.stderr


def test_every_tolerance_comes_from_the_one_table():
    """A tolerance written as a number in a test (an rtol, atol, or approx rel or abs given a literal) has no
    justification beside it; every one lives in tests/tolerances.py, with its reason. (An exact
    comparison says so: ``assert_array_equal``, or ``rtol=0`` with a tabled ``atol``.)"""
    literal = re.compile(r"\b(rtol|atol|rel|abs)\s*=\s*(?!0\b)[0-9.]")
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.name != "tolerances.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert not found, "\n".join(found)
