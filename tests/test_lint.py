"""The code base passes ruff (configured in pyproject.toml)."""

import subprocess
import sys

from tests.live import ROOT


def test_ruff_finds_nothing():
    # Through this interpreter: in a virtualenv, its bin/ (where pip put ruff) need not be on PATH.
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
