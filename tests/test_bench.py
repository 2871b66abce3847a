"""The benchmark scripts run end to end at tiny sizes, so they cannot rot (no timing is asserted)."""

import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from tests.live import ROOT

pytestmark = pytest.mark.live


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """Run a benchmark script (or `-c CODE`) from the checkout, with a temporary folder of its own as TMPDIR,
    and check that it leaves nothing there: every data folder, log, PostgreSQL cluster and metrics folder
    it made is removed by the time it exits (a script run over and over must not fill /tmp)."""
    scratch = tempfile.mkdtemp(prefix="jarvis-bench-tmp-")  # short: a PostgreSQL socket's path is limited
    os.chmod(scratch, 0o755)  # as /tmp lets them, the postgres user reaches a cluster's folder made in it
    try:
        result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "TMPDIR": scratch})
        left = sorted(os.listdir(scratch))
        assert left == [], f"{args[0]} left {left} in its TMPDIR\n{result.stdout}{result.stderr}"
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.mark.long(16)
def test_bench_run_smoke():  # no timing asserted: it runs beside other tests
    result = bench("bench/run.py", "--smoke", "--floor", "--baseline", "HEAD", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for heading in (
        "1. Added latency",
        "2. Per-chunk cost",
        "3. Concurrency",
        "4. Cancel under load",
        "5. Leaks",
        "6. Memory",
        "Summary",
        "ERROR lines in Jarvis's log: 0",
    ):
        assert heading in result.stdout, result.stdout
    assert "not closed" in result.stdout and "nan" not in result.stdout
    for row in ("floor: added time to first token", "jarvis: CPU per 1-token stream", "floor: 10 streams: completion",
                "relay: 10 streams: completion", "jarvis@HEAD: 10 streams: completion"):
        assert row in result.stdout, result.stdout


@pytest.mark.serial
def test_store_benchmark_smoke():
    result = bench("bench/store_hub_block.py", "--writes", "50", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "store thread (Jarvis)" in result.stdout and "directly on the hub" in result.stdout


@pytest.mark.model
@pytest.mark.serial
def test_local_model_benchmark_smoke():
    # One concurrency level (2: the slots shared): a second level is the same loop again, 1.1 s of the serial phase.
    result = bench("bench/local_model.py", "--tokens", "8", "--concurrency", "2", "--history", "100",
                   "--no-llama-server", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Jarvis, 4 slots" in result.stdout and "Jarvis, 1 slot (baseline)" in result.stdout
    assert "with its prefix kept" in result.stdout and re.search(r"prompt tokens read: \d+ vs \d+\)", result.stdout), \
        result.stdout  # both turns' counts read from the log (the second's was None: read before its line)
    # Counted as the tests count them (tests.live.blocked_hub_reports): a report of the worker's start (opening
    # its listening socket, a system call of microseconds, seen while a busy machine did not run it) is not a
    # block of a serving hub; each one counted is printed with where the hub was.
    assert "gevent monitor reports of a hub blocked > 20 ms: 0" in result.stdout, result.stdout


@pytest.mark.model
def test_prompt_abort_benchmark_smoke():  # no timing asserted
    # --no-busy: the GIL-busy column's spinning thread was 3.5 of the script's 4.7 CPU-s here (each Python
    # callback waits out the spinner's switch interval), and it is the same timing code as the idle column.
    result = bench("bench/prompt_abort.py", "--words", "10", "--runs", "1", "--cancels", "1", "--no-busy", timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("no callback", "Jarvis: strlen over a flag (C)", "a Python ctypes callback", "cancel -> llama_decode"):
        assert row in result.stdout, result.stdout


def test_failover_benchmark_smoke():  # --smoke: one case of each kind, five gunicorn starts instead of nine
    result = bench("bench/failover.py", "--runs", "1", "--smoke", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("one upstream (JARVIS_UPSTREAM_URL)", "two, the first refuses the connection",
                "two, the first dead (timeout 1 s)", "failover cost (median, minus one upstream): refused",
                ", 503 "):
        assert row in result.stdout, result.stdout


@pytest.mark.long
def test_store_load_benchmark_smoke():
    result = bench("bench/store_load.py", "--answers", "20", "--seconds", "1", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SQLite (WAL, its own thread)" in result.stdout and "PostgreSQL (pool, wait_poll)" in result.stdout


def test_accounts_benchmark_smoke():  # no timing asserted
    result = bench("bench/accounts.py", "--runs", "2", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("no accounts (baseline)", "with a personal key", "with a session cookie", "sign-in, unknown name",
                "account with limits"):
        assert row in result.stdout, result.stdout



def test_worker_start_benchmark_smoke():  # no timing asserted; not held to a CPU quota (no cgroup needed)
    result = bench("bench/worker_start.py", "--runs", "1", "--cpus", "0", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("floor (no monitor)", "every report (gevent's own)", "jarvis ", "jarvis / floor"):
        assert row in result.stdout, result.stdout


@pytest.mark.long
def test_search_benchmark_smoke():
    result = bench("bench/search.py", "--conversations", "200", "--runs", "2", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SQLite      rare word" in result.stdout and "PostgreSQL  prefix" in result.stdout


def test_profile_summary_gives_a_socket_call_to_whoever_made_it(tmp_path):
    profile = tmp_path / "raw.txt"
    profile.write_text(
        "process 1;Relay._pump (jarvis/relay.py:220);Response.read1 (jarvis/http1.py:113);"
        "SocketMixin.recv (gevent/_socketcommon.py:657) 6\n"
        "Hub.run (gevent/hub.py:647) 3\n"
        "write_chunk (gunicorn/util.py:342);SocketMixin.sendall (gevent/_socketcommon.py:693) 1\n")
    result = bench("bench/profile_summary.py", str(profile), "--cpu-us", "50", timeout=60)
    assert result.returncode == 0, result.stderr
    rows = {line[:45].strip(): line[45:].split() for line in result.stdout.splitlines()[1:]}
    assert rows["upstream HTTP client"] == ["60.0%", "30.0"]
    assert rows["the hub's loop (libev, callbacks, switches)"] == ["30.0%", "15.0"]
    assert rows["writing the response (gunicorn, worker.py)"] == ["10.0%", "5.0"]


SPLIT_TOKENS = r"""
import socket, sys
sys.path.insert(0, ".")
from bench.run import Stream

client, server = socket.socketpair()
events = b"".join(b'data: {"content": "%d.5|"}\n\n' % n for n in range(3)) + b"data: [DONE]\n\n"
cut = events.index(b"1.5|") + 2  # a token's stamp split across two HTTP chunks, as a server that fell behind does
chunks = [events[:cut], events[cut:]]
server.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n")
stream = Stream().run(client, {"tokens": 3}, keep_latencies=False)
print(stream.tokens, stream.complete)
"""


def test_the_bench_client_counts_a_token_split_across_http_chunks():
    result = bench("-c", SPLIT_TOKENS, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "True"]


@pytest.mark.long(20)
def test_tools_benchmark_smoke():  # no timing asserted
    result = bench("bench/tools.py", "--runs", "1", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("the SDK alone, asyncio (baseline)", "Jarvis's client, from the gevent hub",
                "in a page answer: tool_step → tool_result", "Stop while a tool runs → the server notes"):
        assert row in result.stdout, result.stdout
    assert "nan" not in result.stdout, result.stdout  # every Stop reached its source


def test_attachments_benchmark_smoke():  # no timing asserted
    result = bench("bench/attachments.py", "--runs", "1", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    for row in ("text only (baseline)", "PDF, 10.", "photo, 4000 x 3000 JPEG"):
        assert row in result.stdout, result.stdout
