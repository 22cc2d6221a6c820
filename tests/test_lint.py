"""pyflakes over the package, the tests and the scripts: no unused imports, undefined names or
redefinitions (style beyond that is reviewed, not enforced)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pyflakes_finds_nothing():
    paths = ["minillama4", "tests", "scripts", "notebooks/conftest.py"]
    out = subprocess.run([sys.executable, "-m", "pyflakes", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
