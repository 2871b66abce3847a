"""How long a worker with tool servers takes to start on a starved machine, by how gevent's monitor reports.

gevent's monitor thread checks the hub every 0.1 s and, each time it finds it blocked, builds a report of
every thread's stack in its own thread, holding the GIL the blocked worker needs. A worker starting is
blocked for seconds (the app's imports: Flask, the MCP SDK, pydantic), so on a starved machine the monitor
built a report at nearly every check. Three ways, each started --runs times with gunicorn (its master, its
worker and the worker's tool servers) held to --cpus of CPU time (a cgroup CPU quota; 0: not held):

    floor         no monitor thread (GEVENT_MONITOR_THREAD_ENABLE=false): what a start costs without one
    every report  gevent's own behaviour: every blocked check builds and prints a report
                  (tests/every_report_app.py sets jarvis.diagnostics.REPORT_EVERY_SECONDS = 0)
    jarvis        at most one report every 10 s while the worker starts, and none built that is not printed

Start = from gunicorn's launch to the first /healthz answered (tests/live.py's LiveServer). The tool
servers are tests/test_tool_loop_live.py's: mcp-server-time from PyPI and tests/mcp_test_server.py.

    python bench/worker_start.py                 # 3 starts each at 0.1 CPU (needs root for the cgroup)
    python bench/worker_start.py --cpus 0        # not held: a fast machine's figures
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.live import LiveServer  # noqa: E402
from tests.test_tool_loop_live import tools_file  # noqa: E402

WAYS = {
    "floor (no monitor)": ({"GEVENT_MONITOR_THREAD_ENABLE": "false"}, "app:app"),
    "every report (gevent's own)": ({}, "tests.every_report_app:app"),
    "jarvis": ({}, "app:app"),
}


def cgroup(cpus: float) -> Path | None:
    """A CPU cgroup (v1 or v2) holding what is put in it to `cpus` of CPU time; None when not asked."""
    if cpus <= 0:
        return None
    quota = int(cpus * 10000)
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        path = Path(f"/sys/fs/cgroup/jarvis-worker-start-{os.getpid()}")
        path.mkdir()
        (path / "cpu.max").write_text(f"{quota} 10000")
    else:
        path = Path(f"/sys/fs/cgroup/cpu/jarvis-worker-start-{os.getpid()}")
        path.mkdir()
        (path / "cpu.cfs_period_us").write_text("10000")
        (path / "cpu.cfs_quota_us").write_text(str(quota))
    return path


def release(held: Path) -> None:
    """Remove the cgroup once the last of its processes is gone (the tool servers of a killed worker
    end when they see their stdin close, a moment later)."""
    deadline = time.monotonic() + 30
    while (held / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        held.rmdir()
    except OSError as error:
        print(f"(the cgroup {held} is left: {error})", file=sys.stderr)


def start_once(upstream: FakeUpstream, env: dict, app: str, held: Path | None) -> tuple[float, int, int]:
    """One start: seconds to the first /healthz, blocked-hub reports printed, log bytes."""
    folder = Path(tempfile.mkdtemp(prefix="jarvis-worker-start-"))
    notes = folder / "notes"
    notes.touch()
    wrap = ["sh", "-c", f'echo $$ > {held}/cgroup.procs && exec "$@"', "sh"] if held else None
    server = LiveServer(folder, {"JARVIS_UPSTREAM_URL": upstream.url,
                                 "JARVIS_TOOLS_FILE": tools_file(folder / "tools.toml", notes), **env},
                        app=app, wrap=wrap)
    began = time.monotonic()
    try:
        server.start(timeout=180)
        took = time.monotonic() - began
    finally:
        log = server.log()
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)  # its data, logs and tools file: one folder a start
    return took, log.count("appears to be blocked"), len(log.encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=0.1, help="CPU time gunicorn may use (0: not held)")
    args = parser.parse_args()
    held = cgroup(args.cpus)
    upstream = FakeUpstream()
    try:
        results = {}
        for _ in range(args.runs):  # interleaved: a machine slowing down meanwhile weighs on each way alike
            for way, (env, app) in WAYS.items():
                results.setdefault(way, []).append(start_once(upstream, env, app, held))
    finally:
        upstream.stop()
        if held is not None:
            release(held)
    print(f"worker start with two tool servers, gunicorn held to {args.cpus:g} CPU" if held else
          "worker start with two tool servers, not held")
    print(f"{'way':<30}{'start p50 (s)':>15}{'range (s)':>15}{'reports p50':>13}{'log p50 (kB)':>14}")
    floor = statistics.median(took for took, _, _ in results["floor (no monitor)"])
    for way, rows in results.items():
        starts = [took for took, _, _ in rows]
        print(f"{way:<30}{statistics.median(starts):>15.1f}{f'{min(starts):.1f}-{max(starts):.1f}':>15}"
              f"{statistics.median(reports for _, reports, _ in rows):>13.0f}"
              f"{statistics.median(size for _, _, size in rows) / 1000:>14.0f}")
    jarvis = statistics.median(took for took, _, _ in results["jarvis"])
    every = statistics.median(took for took, _, _ in results["every report (gevent's own)"])
    print(f"jarvis / floor {jarvis / floor:.2f}; every report / floor {every / floor:.2f}")


if __name__ == "__main__":
    main()
