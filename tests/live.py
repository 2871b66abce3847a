"""Real gunicorn for live tests: started with the project's gunicorn.conf.py on a free loopback port."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from jarvis.diagnostics import is_start_up_report
from tests.clients import chat_body, parse_event_block
from tests.net import free_port

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, describe, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy; return that, or fail with describe()."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(describe())
        time.sleep(interval)



KILLED_CPU = [0.0]  # CPU seconds of the workers LiveServer.stop() killed (see there)

class LiveServer:
    """One gunicorn master (gevent workers) serving app:app; its error log is a file the test can read."""

    def __init__(self, tmp_path: Path, env: dict | None = None, args: list[str] | None = None,
                 app: str = "app:app", wrap: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"gunicorn-{self.port}.log"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("JARVIS_") and key != "PYTHONDONTWRITEBYTECODE"}  # see conftest
        self.data_dir = tmp_path / f"data-{self.port}"
        # The metrics files live in the test's folder, so even a killed server leaves nothing in /tmp.
        metrics_dir = tmp_path / f"metrics-{self.port}"
        metrics_dir.mkdir()
        # Titles by the model off: a first answer's title request would be one more upstream request racing
        # the ones a test counts (tests/test_titles.py turns it on).
        self.env.update({"JARVIS_HEARTBEAT_SECONDS": "5", "PYTHONUNBUFFERED": "1", "JARVIS_TITLES": "0",
                         "JARVIS_DATA_DIR": str(self.data_dir), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
        self.env.update(env or {})
        # `wrap` runs gunicorn through another command (one that enters a namespace, say).
        self.command = [*(wrap or []), sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                        "--bind", f"127.0.0.1:{self.port}", "--error-logfile", str(self.log_path),
                        *(args or []), app]
        self.process: subprocess.Popen | None = None
        self._log_from = 0  # where log() starts reading: a shared server's next test sees only its own lines

    def start(self, timeout: float = 30.0) -> LiveServer:
        for attempt in range(3):
            self.stderr_path = self.log_path.with_suffix(".stderr")
            with open(self.stderr_path, "wb") as stderr:
                self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env,
                                                stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_until(self._answers, timeout, lambda: f"gunicorn did not answer within {timeout} s:\n{self.log()}")
                return self
            except AssertionError:
                self.stop()  # a start that never answered leaves no gunicorn behind (its test has no teardown)
                raise
            except RuntimeError:
                # Another test process took the free port between our pick and gunicorn's bind: pick again.
                if attempt == 2 or "Address already in use" not in self.log():
                    raise
                self._move_to(free_port())
        return self

    def _move_to(self, port: int) -> None:
        old = f"127.0.0.1:{self.port}"
        self.command = [f"127.0.0.1:{port}" if part == old else part for part in self.command]
        self.port, self.url = port, f"http://127.0.0.1:{port}"

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}"
                               f"{self.stderr_path.read_text(errors='replace')}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).ok
        except (requests.ConnectionError, requests.Timeout):
            return False  # not listening yet, or a worker still importing on a busy machine: ask again

    # -- looking inside -----------------------------------------------------

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_from)
            return log.read().decode(errors="replace")

    def for_next_test(self) -> LiveServer:
        """A server shared by tests (marker shared_servers), handed to the next one once the last one's streams have
        ended (their end lines are written after their last byte): its log read from here on, and
        started again if the last test left it dead."""
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        if self.process.poll() is not None:
            return self.start()  # the same log file: the dead server's lines stay before the offset
        wait_until(lambda: requests.get(self.url + "/healthz", timeout=5).json()["open_streams"] == 0, 10,
                   lambda: f"the last test left streams open:\n{self.log()[-4000:]}")
        # A fresh page opens the newest conversation: the next test starts with none.
        for conversation in requests.get(self.url + "/api/conversations", timeout=5).json()["data"]:
            requests.delete(f"{self.url}/api/conversations/{conversation['id']}", timeout=5).raise_for_status()
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        return self

    def wait_for_log(self, text: str, timeout: float = 10.0, count: int = 1) -> str:
        """The log, once `text` appears in it `count` times (a bounded poll of the file)."""
        return wait_until(lambda: (log := self.log()).count(text) >= count and log, timeout,
                          lambda: f"{text!r} x{count} not in the log within {timeout} s:\n{self.log()[-4000:]}")

    def assert_log_clean(self, *also: str) -> str:
        """The log has no ERROR line and no traceback (nor any of `also`); return it."""
        log = self.log()
        for forbidden in ("[ERROR]", '"level": "ERROR"', "Traceback", *also):
            assert forbidden not in log, f"{forbidden!r} in the log:\n{log[-4000:]}"
        return log

    def end_lines(self, count: int = 0, timeout: float = 10.0) -> list[str]:
        """The streams' end lines, once there are at least `count`: a stream's line is written after its
        last byte left, so a client can have read it all before the line is there."""
        if count:
            self.wait_for_log("stream end outcome=", timeout, count)
        return [line for line in self.log().splitlines() if "stream end outcome=" in line]

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def worker(self) -> psutil.Process:
        workers = self.workers()
        assert len(workers) == 1, workers
        return workers[0]

    def chat(self, stream: bool = True, fault: dict | None = None, **body) -> requests.Response:
        return requests.post(self.url + "/v1/chat/completions", json={**chat_body(fault, stream), **body},
                             stream=stream, timeout=30)

    # -- stopping ------------------------------------------------------------

    def send_signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def stop(self) -> int:
        """Kill gunicorn and its workers: what a test had to see, it has seen (tests of a graceful stop
        send their own signals); a polite stop would cost every test 0.4 s."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        try:
            workers = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            workers = []
        for process in workers:
            try:
                times = process.cpu_times()
                process.kill()
            except psutil.NoSuchProcess:
                continue
            # Killed with their master, the workers are reaped by init: their CPU is counted here instead
            # (tests/conftest.py's CPU per test).
            KILLED_CPU[0] += times.user + times.system + times.children_user + times.children_system
        self.process.kill()
        return self.process.wait()


def sse_events(response: requests.Response):
    """Parse a Jarvis SSE response into (kind, value, arrival_time) tuples: kind is data, comment or done.
    The response is closed once its events end or the generator is dropped: no socket is left to the GC."""
    buffer = b""
    try:
        for chunk in _read1_chunks(response):
            buffer += chunk
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                now = time.monotonic()
                for kind, value in parse_event_block(block):
                    yield (kind, value, now)
    finally:
        response.close()


def _read1_chunks(response: requests.Response):
    while True:
        chunk = response.raw.read1(65536)
        if not chunk:
            return
        yield chunk


def hub_reports(log: str) -> list[str]:
    """gevent's blocked-hub reports in a log, each from its header line ("... appears to be blocked") on.

    Each starts with a line of 80 '='. Split on that, not on the header's words: a report lists every
    thread's stack with its source lines, and a second monitor thread caught writing its own report shows
    gevent's line `'\n%s : Greenlet %s appears to be blocked' %` (seen on a busy machine: one report
    counted as two)."""
    return [part.split("\n", 1)[1] if "\n" in part else "" for part in re.split(r"^={80}$", log, flags=re.M)[1:]
            if "appears to be blocked" in part]


def blocked_hub_reports(log: str) -> list[str]:
    """gevent's blocked-hub reports in a server's log, each from its header on, leaving out those that are
    not a serving worker's hub: one still starting (gunicorn's load_wsgi and post_worker_init, before it
    accepts any connection), which may take over 20 ms on a slow machine (Werkzeug compiling routes, a
    first import reading its file), or opening its listening socket's server in gunicorn's run() (seen
    once in a busy parallel phase: 'server = StreamServer(' in the stack); a hub that gevent's own
    monitor thread came to have, reported "blocked" while that thread sleeps between its checks; and one
    caught in gunicorn's heartbeat (below)."""
    reports = []
    for report in hub_reports(log):
        blocked = report.split("Info:", 1)[0]
        starting = is_start_up_report(report)
        monitor = "gevent/_monitor.py" in blocked and "thread_sleep" in blocked and "/jarvis/" not in blocked
        # gunicorn's once-a-second heartbeat, an os.utime of a file in /dev/shm (jarvis/server_config.py): a
        # call of microseconds, so a report there is the OS not running the worker for 20 ms (seen once with
        # one core kept busy and PostgreSQL writing), not anything the worker did.
        heartbeat = blocked.rstrip().endswith("os.utime(self._tmp.fileno(), (new_time, new_time))")
        if not starting and not monitor and not heartbeat:
            reports.append(report)
    return reports
