"""The page's JavaScript unit tests, run with Node's built-in test runner from the same test command."""

import shutil
import subprocess

from tests.live import ROOT


def test_sse_reader_unit_tests_pass_under_node():
    node = shutil.which("node")
    assert node, "Node.js is required for the JavaScript unit tests (apt-get install nodejs)"
    result = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout
