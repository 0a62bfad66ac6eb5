"""Lint and format (ruff, as configured in pyproject.toml [tool.ruff]): an unused or undefined name,
an import regression, a NumPy 2 deprecation or unformatted code fails the suite, and so CI."""

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
