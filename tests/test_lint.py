"""The code base passes ruff (configured in pyproject.toml)."""

import shutil
import subprocess

from tests.live import ROOT


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff")
    assert ruff, "ruff is installed by requirements-dev.txt"
    result = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
