"""MCP servers from npm, installed once per checkout into tests/.npm (npm's registry is reachable where the
suite runs; Debian's `npm` package provides the command: .ci/run installs it)."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PREFIX = ROOT / ".npm"
EVERYTHING = "@modelcontextprotocol/server-everything"


def installed(package: str, entry: str) -> Path:
    """The path of `entry` inside `package`, installed first if it is not (one installer at a time)."""
    npm = shutil.which("npm")
    assert npm, "npm is required for the MCP servers from npm (apt-get install npm)"
    path = PREFIX / "node_modules" / package / entry
    PREFIX.mkdir(exist_ok=True)
    with open(PREFIX / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (test processes of one run install it once)
        if not path.exists():
            result = subprocess.run([npm, "install", "--prefix", str(PREFIX), "--no-audit", "--no-fund",
                                     "--no-save", package], capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, f"npm install {package} failed:\n{result.stdout}\n{result.stderr}"
    assert path.exists(), path
    return path


def everything_command() -> tuple[str, ...]:
    """@modelcontextprotocol/server-everything over stdio: every protocol feature, a long operation with
    progress among its tools."""
    return (shutil.which("node") or "node", str(installed(EVERYTHING, "dist/index.js")), "stdio")
