"""What a tool call costs through Jarvis, and how fast a Stop ends a tool loop, against a real MCP server.

Rows (medians of `--runs`, one at a time), all calling mcp-server-time's `get_current_time` over stdio:

- the baseline: the official SDK's own `stdio_client` and `ClientSession`, in plain asyncio, no Jarvis;
- Jarvis's client (jarvis.mcp_client.ToolServers) from a gevent hub: its thread, loop and hand-off added;
- in a page answer on a real server (gunicorn, one gevent worker, the fake upstream playing the model): from
  the `tool_step` event to the `tool_result` event as the page's client reads them.

Then Stop, in each phase of a loop (POST /stop → the stream's [DONE] at the client, and, while the model
writes, → the upstream seeing its connection closed): while the model writes, and while a tool runs
(tests/mcp_test_server.py's `wait`, 60 s, which notes its own cancellation).

    python bench/tools.py [--runs 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream, Scenario  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402

TIME_SERVER = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]


def sdk_direct(runs: int) -> list[float]:
    """The baseline: the SDK alone, in asyncio."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async def measure():
        times = []
        parameters = StdioServerParameters(command=TIME_SERVER[0], args=TIME_SERVER[1:])
        async with stdio_client(parameters) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            await session.call_tool("get_current_time", {"timezone": "UTC"})  # (warm)
            for _ in range(runs):
                started = time.perf_counter()
                await session.call_tool("get_current_time", {"timezone": "UTC"})
                times.append((time.perf_counter() - started) * 1000)
        return times

    return asyncio.run(measure())


def jarvis_client(runs: int) -> list[float]:
    from jarvis.mcp_client import ToolServers
    from jarvis.tools_config import ToolServer

    servers = ToolServers((ToolServer("time", command=tuple(TIME_SERVER)),))
    try:
        servers.call("time", "get_current_time", {"timezone": "UTC"})  # (started, warm)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            servers.call("time", "get_current_time", {"timezone": "UTC"})
            times.append((time.perf_counter() - started) * 1000)
        return times
    finally:
        servers.close()


def events(response):
    for line in response.iter_lines():
        if line.startswith(b"data: {"):
            yield time.perf_counter(), json.loads(line[6:])
        elif line == b"data: [DONE]":
            yield time.perf_counter(), None


def new_conversation(url: str) -> str:
    return requests.post(url + "/api/conversations", json={}, timeout=10).json()["id"]


def in_a_page_answer(url: str, upstream: FakeUpstream, runs: int) -> list[float]:
    upstream.scenario = Scenario(tool_calls=[{"name": "get_current_time", "arguments": '{"timezone": "UTC"}'}])
    times = []
    for _ in range(runs + 1):
        conversation = new_conversation(url)
        with requests.post(f"{url}/api/conversations/{conversation}/messages", json={"content": "Time?"},
                           stream=True, timeout=60) as response:
            step_at = result_at = None
            for at, event in events(response):
                if event and "tool_step" in event:
                    step_at = at
                if event and "tool_result" in event:
                    result_at = at
        times.append((result_at - step_at) * 1000)
    return times[1:]  # (the first started the server)


def stop_latency(url: str, upstream: FakeUpstream, notes: Path, phase: str, runs: int) -> tuple[list, list]:
    """Stop → [DONE] at the client; and, while the model writes, → its connection closed at the upstream
    (while a tool runs, → the server noting the cancellation)."""
    to_done, at_source = [], []
    for _ in range(runs):
        if phase == "model":
            upstream.scenario = Scenario(tokens=100_000, interval=0.01)
        else:
            upstream.scenario = Scenario(tool_calls=[{"name": "wait", "arguments": '{"seconds": 60}'}])
        conversation = new_conversation(url)
        start = len(notes.read_text())
        with requests.post(f"{url}/api/conversations/{conversation}/messages", json={"content": "Go"},
                           stream=True, timeout=60) as response:
            stream = events(response)
            for _, event in stream:
                if phase == "model" and event and event.get("choices") and \
                        event["choices"][0]["delta"].get("content"):
                    break
                if phase == "tool" and event and "tool_step" in event:
                    deadline = time.monotonic() + 30
                    while "started wait" not in notes.read_text()[start:]:
                        if time.monotonic() > deadline:
                            raise SystemExit("the wait tool never started")
                        time.sleep(0.005)
                    break
            exchange = upstream.chats[-1]
            stopped, stopped_monotonic = time.perf_counter(), time.monotonic()  # (the fake's clock: monotonic)
            requests.post(f"{url}/api/conversations/{conversation}/stop", timeout=10)
            for at, event in stream:
                if event is None:
                    to_done.append((at - stopped) * 1000)
        deadline = time.monotonic() + 10
        if phase == "model":
            while exchange.closed_at is None and time.monotonic() < deadline:
                time.sleep(0.001)
            at_source.append((exchange.closed_at - stopped_monotonic) * 1000 if exchange.closed_at else float("nan"))
        else:
            while "cancelled wait" not in notes.read_text()[start:] and time.monotonic() < deadline:
                time.sleep(0.002)
            at_source.append((time.perf_counter() - stopped) * 1000)
    return to_done, at_source


def row(name: str, times: list[float], baseline: float | None = None) -> str:
    median = statistics.median(times)
    added = f"{median - baseline:+8.2f}" if baseline is not None else "       -"
    return f"| {name:<52} | {median:8.2f} | {max(times):8.2f} | {added} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    arguments = parser.parse_args()
    runs = arguments.runs
    direct = sdk_direct(runs)
    baseline = statistics.median(direct)
    rows = [row("the SDK alone, asyncio (baseline)", direct),
            row("Jarvis's client, from the gevent hub", jarvis_client(runs), baseline)]
    upstream = FakeUpstream()
    scratch = tempfile.TemporaryDirectory(prefix="jarvis-bench-tools-")  # removed at the end
    folder = Path(scratch.name)
    notes = folder / "notes"
    notes.touch()
    test_server = [sys.executable, "-m", "tests.mcp_test_server", str(notes)]
    (folder / "tools.toml").write_text(f'[[mcp]]\nname = "time"\ncommand = {json.dumps(TIME_SERVER)}\n\n'
                                       f'[[mcp]]\nname = "test"\ncommand = {json.dumps(test_server)}\n')
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")},
           "JARVIS_DATA_DIR": str(folder / "data"), "JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_TITLES": "0",
           "JARVIS_TOOLS_FILE": str(folder / "tools.toml"), "JARVIS_MAX_RUNS_PER_CLIENT": "100",
           "PROMETHEUS_MULTIPROC_DIR": str(folder / "metrics")}
    (folder / "metrics").mkdir()
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                               "--bind", f"127.0.0.1:{port}", "-w", "1", "app:app"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", 30)
        rows.append(row("in a page answer: tool_step → tool_result", in_a_page_answer(url, upstream, runs), baseline))
        stops = []
        for phase, name in (("model", "while the model writes"), ("tool", "while a tool runs")):
            to_done, at_source = stop_latency(url, upstream, notes, phase, max(1, runs // 3))
            source = "the upstream's connection closed" if phase == "model" else "the server notes its cancellation"
            stops += [row(f"Stop {name} → [DONE] at the client", to_done),
                      row(f"Stop {name} → {source}", at_source)]
        print(f"A tool call (mcp-server-time get_current_time, stdio), {runs} calls one at a time (ms)\n")
        print(f"| {'path':<52} |   median |    worst | added vs baseline |")
        print("|---|---:|---:|---:|")
        print("\n".join(rows))
        print("\nStop in a tool loop, one worker (ms)\n")
        print(f"| {'phase':<52} |   median |    worst | - |")
        print("|---|---:|---:|---:|")
        print("\n".join(stops))
        return 0
    finally:
        server.terminate()
        server.wait(10)
        upstream.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
