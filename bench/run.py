"""Benchmarks: Jarvis (one gunicorn gevent worker) beside the same stub upstream called directly, same run.

Starts bench/upstream.py and Jarvis on free loopback ports and runs each
scenario through every target of the run, printing one row per target with
medians, p99 and ratios to the direct line. Targets: `direct` (the stub
itself), `jarvis`, and on request, with --floor, `relay` (bench/socket_relay.py:
gevent sockets copying bytes, no HTTP server) and `floor` (bench/passthrough.py,
a 40-line Flask + gevent pass-through under gunicorn), `baseline` (Jarvis at
another git commit, from a throw-away worktree) and `litellm` (LiteLLM's proxy,
one worker, installed into a throw-away virtualenv under bench/.work/, never
into Jarvis's environment).

    1 latency      sequential streams of 200 tokens over one keep-alive connection; 1-token streams:
                   time to the response headers and server CPU to set up one stream
    2 chunk        one 5,000-token stream: chunks/s, and the server's CPU per chunk
    3 concurrency  100/200/300/500/1000 streams of 100 tokens at 20 ms: completion, first token, added
                   per-token latency, CPU per token
    4 cancel       under 300 running streams, 50 clients leave mid-stream and 20 before the first token
    5 leaks        10,000 streams closed at random moments: RSS, fds, greenlets before and after (Jarvis)
    6 memory       RSS per open idle stream, with 1,000 open (Jarvis)

    python bench/run.py                       # everything, a few minutes
    python bench/run.py --smoke               # tiny sizes, seconds (run by the test suite so this cannot rot)
    python bench/run.py --only concurrency --floor --baseline main --peer litellm
"""

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402
import httptools  # noqa: E402
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.net import free_port, wait_for_http  # noqa: E402

STAMP = re.compile(rb'"content": ?"(\d+\.\d+)\|')
FULL = {"latency_streams": 50, "setup_streams": 500, "chunk_tokens": 5000, "concurrency": [100, 200, 300, 500, 1000],
        "concurrency_tokens": 100,
        "cancel_background": 300, "cancel_mid": 50, "cancel_early": 20, "steady_seconds": 1.0, "cancel_wait": 10,
        "early_delay": 5, "leak_streams": 10000,
        "memory_streams": 1000, "quiet_wait": 30.0}
SMOKE = {"latency_streams": 3, "setup_streams": 5, "chunk_tokens": 200, "concurrency": [10], "concurrency_tokens": 15,
         "cancel_background": 10, "cancel_mid": 3, "cancel_early": 2, "steady_seconds": 0.2, "cancel_wait": 1,
         "early_delay": 0.5, "leak_streams": 40,
         "memory_streams": 20, "quiet_wait": 0}


# -- processes -----------------------------------------------------------------

LITELLM_VERSION = "1.108.2"  # the proxy the issue measured; newer ones need extras this index lacks
PEER_MAX_STREAMS = 300  # the peer takes tens of seconds per burst beyond this


class Target:
    """One server the scenarios run through: its port, the process tree whose CPU is its cost, and
    any header its clients must send."""

    def __init__(self, name: str, port: int, process: psutil.Process | None = None, auth: bytes = b"",
                 max_streams: int | None = None):
        self.name, self.port, self.process, self.auth, self.max_streams = name, port, process, auth, max_streams

    def cpu(self) -> float:
        """User + system seconds of the server's process tree (gunicorn: master and worker)."""
        if self.process is None:
            return float("nan")
        total = 0.0
        for process in [self.process, *self.process.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def start_gunicorn(cwd: Path, app: str, port: int, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(cwd / "gunicorn.conf.py"),
                             "--bind", f"127.0.0.1:{port}", "--workers", "1", "--error-logfile", str(log), app],
                            cwd=cwd, env=env)


def litellm_venv(folder: Path) -> Path:
    """LiteLLM's proxy in its own virtualenv (made once, reused while its version matches)."""
    python = folder / "bin" / "python"
    marker = folder / f"litellm-{LITELLM_VERSION}"
    if not marker.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
        marker.touch()
    return folder / "bin" / "litellm"


class Servers:
    def __init__(self, workdir: Path, floor: bool = False, baseline: str | None = None, peer: str | None = None):
        self.workdir = workdir
        self.processes: list[subprocess.Popen] = []
        self.upstream_port, self.jarvis_port = free_port(), free_port()
        self.log = workdir / "jarvis.log"
        upstream_url = f"http://127.0.0.1:{self.upstream_port}/v1"
        self.upstream = self._start(subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port",
                                                      str(self.upstream_port)], stdout=subprocess.DEVNULL))
        env = {key: value for key, value in os.environ.items() if not key.startswith("JARVIS_")}
        env.update({"JARVIS_UPSTREAM_URL": upstream_url, "JARVIS_DATA_DIR": str(workdir / "data"),
                    "GEVENT_MONITOR_THREAD_ENABLE": "false"})
        self.jarvis = self._start(start_gunicorn(ROOT, "app:app", self.jarvis_port, env, self.log))
        self.extra: list[Target] = []
        self.worktree = None
        if floor:
            port = free_port()
            process = self._start(subprocess.Popen([sys.executable, str(ROOT / "bench" / "socket_relay.py"), "--port",
                                                    str(port), "--upstream-port", str(self.upstream_port)]))
            wait_for_http(f"http://127.0.0.1:{port}/healthz")
            self.extra.append(Target("relay", port, psutil.Process(process.pid)))
            port = free_port()
            process = self._start(start_gunicorn(ROOT, "bench.passthrough:app", port,
                                                 {**env, "PASSTHROUGH_UPSTREAM_URL": upstream_url},
                                                 workdir / "floor.log"))
            wait_for_http(f"http://127.0.0.1:{port}/healthz")
            self.extra.append(Target("floor", port, psutil.Process(process.pid)))
        if baseline:
            self.worktree = workdir / "baseline"
            subprocess.run(["git", "worktree", "add", "-q", "--detach", str(self.worktree), baseline], cwd=ROOT,
                           check=True)
            port = free_port()
            process = self._start(start_gunicorn(self.worktree, "app:app", port,
                                                 {**env, "JARVIS_DATA_DIR": str(workdir / "baseline-data")},
                                                 workdir / "baseline.log"))
            wait_for_http(f"http://127.0.0.1:{port}/healthz")
            self.extra.append(Target(f"jarvis@{baseline}", port, psutil.Process(process.pid)))
        if peer == "litellm":
            self.extra.append(self._start_litellm(upstream_url))
        wait_for_http(f"http://127.0.0.1:{self.upstream_port}/v1/models")
        wait_for_http(f"http://127.0.0.1:{self.jarvis_port}/healthz")
        self.worker = psutil.Process(self.jarvis.pid).children()[0]

    def _start(self, process: subprocess.Popen) -> subprocess.Popen:
        self.processes.append(process)
        return process

    def _start_litellm(self, upstream_url: str) -> Target:
        executable = litellm_venv(ROOT / "bench" / ".work" / "litellm-venv")
        key = "sk-bench-" + os.urandom(12).hex()
        config = self.workdir / "litellm.yaml"
        config.write_text(json.dumps({  # JSON is YAML
            "model_list": [{"model_name": "bench", "litellm_params": {
                "model": "openai/bench", "api_base": upstream_url, "api_key": "unused"}}],
            "litellm_settings": {"num_retries": 0, "request_timeout": 600, "telemetry": False},
            "general_settings": {"master_key": key}}))
        port = free_port()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        with open(self.workdir / "litellm.log", "w") as log:
            process = self._start(subprocess.Popen([str(executable), "--config", str(config), "--host", "127.0.0.1",
                                                    "--port", str(port), "--num_workers", "1"], env=env,
                                                   stdout=subprocess.DEVNULL, stderr=log))
        wait_for_http(f"http://127.0.0.1:{port}/health/liveliness", timeout=120)
        return Target("litellm", port, psutil.Process(process.pid), auth=f"Authorization: Bearer {key}\r\n".encode(),
                      max_streams=PEER_MAX_STREAMS)

    def targets(self, with_extra: bool = True) -> list[Target]:
        direct = Target("direct", self.upstream_port, psutil.Process(self.upstream.pid))
        jarvis = Target("jarvis", self.jarvis_port, psutil.Process(self.jarvis.pid))
        return [direct, *(self.extra if with_extra else []), jarvis]

    def upstream_stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.upstream_port}/_stats") as response:
            return json.load(response)

    def worker_state(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.jarvis_port}/healthz?debug=1") as response:
            health = json.load(response)
        connections = self.worker.net_connections(kind="tcp")
        pooled = sum(1 for c in connections if c.raddr and c.raddr.port == self.upstream_port)
        return {"rss_mb": self.worker.memory_info().rss / 2**20, "fds": self.worker.num_fds(),
                "pooled upstream connections": pooled, "other fds": self.worker.num_fds() - pooled,
                "greenlets": health["greenlets"], "threads": self.worker.num_threads(),
                "open_streams": health["open_streams"]}

    def stop(self):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(self.worktree)], cwd=ROOT, check=False)


# -- one streaming client ----------------------------------------------------------

def request_bytes(options: dict, auth: bytes = b"") -> bytes:
    body = json.dumps({"model": "bench", "stream": True,
                       "messages": [{"role": "user", "content": "x_bench " + json.dumps(options)}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"%sContent-Length: %d\r\n\r\n%s" % (auth, len(body), body))


class Stream:
    """Reads one SSE response from a socket; notes header and first-token times, per-token latencies
    and completion. Tokens are counted in the body llhttp hands back, never in the raw bytes: a server
    that falls behind frames a part of an event as its own HTTP chunk, and the chunk-size line would
    otherwise land inside a token's stamp (`...5142.5\\r\\n22\\r\\n60242|`) and hide it."""

    def __init__(self):
        self.sent_at = self.headers_at = self.first_token_at = self.done_at = None
        self.tokens = 0
        self.latencies: list[float] = []
        self.complete = False

    def run(self, sock, options: dict, keep_latencies: bool = True, stop_after: int | None = None,
            stop_at_headers: bool = False, auth: bytes = b""):
        self.sent_at = time.monotonic()
        sock.sendall(request_bytes(options, auth))
        body = _Body()
        parser = httptools.HttpResponseParser(body)
        pending = b""
        while True:
            data = sock.recv(65536)
            now = time.monotonic()
            if not data:
                return self
            parser.feed_data(data)
            if self.headers_at is None and body.headers_done:
                self.headers_at = now
                if stop_at_headers:
                    return self
            pending += body.take()
            stamps = STAMP.findall(pending)
            if stamps:
                if self.first_token_at is None:
                    self.first_token_at = now
                self.tokens += len(stamps)
                if keep_latencies:
                    self.latencies.extend(now - float(stamp) for stamp in stamps)
                cut = pending.rfind(b"|")
                pending = pending[cut + 1:]
            if stop_after is not None and self.tokens >= stop_after:
                return self
            if body.complete:
                self.done_at = now
                self.complete = b"[DONE]" in pending
                return self


class _Body:
    """llhttp's callbacks for one response: the body's bytes without their HTTP framing."""

    def __init__(self):
        self.headers_done = self.complete = False
        self.parts: list[bytes] = []

    def on_headers_complete(self):
        self.headers_done = True

    def on_body(self, data: bytes):
        self.parts.append(data)

    def on_message_complete(self):
        self.complete = True

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def one_stream(target: Target, options: dict, **kwargs) -> Stream:
    with socket.create_connection(("127.0.0.1", target.port)) as sock:
        return Stream().run(sock, options, auth=target.auth, **kwargs)


QUIET_CPU = 0.1  # of one core, over QUIET_WINDOW: below it the servers are idle (CPU times tick in 10 ms)
QUIET_WINDOW = 0.2


def quiet(servers, sizes) -> None:
    """Wait until every process of the run is idle before measuring the next target: a peer that leaves
    upstream streams running after its clients have gone (LiteLLM does, see scenario 4) would
    otherwise load the stub and the cores while the next target is measured."""
    if not sizes["quiet_wait"]:
        return  # --smoke: seconds matter more than fair numbers
    deadline = time.monotonic() + sizes["quiet_wait"]
    while True:
        before = sum(target.cpu() for target in servers.targets())
        gevent.sleep(QUIET_WINDOW)
        used = sum(target.cpu() for target in servers.targets()) - before
        if used <= QUIET_CPU * QUIET_WINDOW:
            return
        if time.monotonic() > deadline:
            print(f"  (the servers still use {used / QUIET_WINDOW:.0%} of a core after {sizes['quiet_wait']:.0f} s; "
                  "measuring anyway)")
            return


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))] if values else float("nan")


def median(values):
    return statistics.median(values) if values else float("nan")


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))


# -- scenarios ---------------------------------------------------------------------

def scenario_latency(servers, sizes, summary):
    rows, direct = [], None
    for target in servers.targets():
        quiet(servers, sizes)
        with socket.create_connection(("127.0.0.1", target.port)) as sock:
            Stream().run(sock, {"tokens": 200}, auth=target.auth)  # warm the connection and any upstream pool
            streams = [Stream().run(sock, {"tokens": 200}, auth=target.auth) for _ in range(sizes["latency_streams"])]
            one_token = [Stream().run(sock, {"tokens": 1}, auth=target.auth) for _ in range(sizes["latency_streams"])]
            cpu_before = target.cpu()
            setups = sizes["setup_streams"]
            for _ in range(setups):
                Stream().run(sock, {"tokens": 1}, keep_latencies=False, auth=target.auth)
            setup_cpu = (target.cpu() - cpu_before) / setups * 1000
        ttft = median([(s.first_token_at - s.sent_at) * 1000 for s in streams])
        total = median([(s.done_at - s.sent_at) * 1000 for s in streams])
        headers = median([(s.headers_at - s.sent_at) * 1000 for s in one_token])
        headers_200 = median([(s.headers_at - s.sent_at) * 1000 for s in streams])
        if direct is None:
            direct = (ttft, total, headers)
        rows.append([target.name, f"{headers:.2f}", f"{headers_200:.2f}", f"{ttft:.2f}",
                     f"{percentile([(s.first_token_at - s.sent_at) * 1000 for s in streams], 0.99):.2f}",
                     f"{ttft - direct[0]:+.2f}", f"{ttft / direct[0]:.1f}x", f"{total:.2f}",
                     f"{total / direct[1]:.1f}x", f"{setup_cpu:.2f}"])
        summary[f"{target.name}: added time to first token (median ms)"] = ttft - direct[0]
        summary[f"{target.name}: CPU per 1-token stream (ms)"] = setup_cpu
    table(f"1. Added latency: {sizes['latency_streams']} sequential streams of 200 tokens (and of 1 token), one "
          "keep-alive connection per target; CPU = the server's process tree, per 1-token stream",
          ["ms", "headers (1 tok)", "headers (200)", "first token p50", "p99", "added p50", "ratio", "total p50",
           "ratio", "CPU per stream"], rows)


def scenario_chunk(servers, sizes, summary):
    tokens = sizes["chunk_tokens"]
    rows, direct_rate = [], None
    for target in servers.targets():
        quiet(servers, sizes)
        one_stream(target, {"tokens": 100}, keep_latencies=False)
        before = target.cpu()
        stream = one_stream(target, {"tokens": tokens}, keep_latencies=False)
        cpu = (target.cpu() - before) / tokens * 1e6
        assert stream.complete and stream.tokens == tokens, \
            f"{target.name} delivered {stream.tokens} of {tokens} tokens" + ("" if stream.complete else ", unfinished")
        rate = tokens / (stream.done_at - stream.sent_at)
        direct_rate = direct_rate or rate
        rows.append([target.name, f"{rate:.0f}", f"{1e6 / rate:.1f}", f"{1e6 / rate - 1e6 / direct_rate:+.1f}",
                     f"{rate / direct_rate:.2f}x", f"{cpu:.1f}"])
        summary[f"{target.name}: CPU per chunk, one fast stream (µs)"] = cpu
    table(f"2. Per-chunk cost: one {tokens}-token stream, no delay", ["", "chunks/s", "µs per chunk (wall)", "added",
                                                                     "ratio", "server CPU µs per chunk"], rows)


def scenario_concurrency(servers, sizes, summary):
    rows = []
    tokens = sizes["concurrency_tokens"]
    for count in sizes["concurrency"]:
        direct = None
        for target in servers.targets():
            if target.max_streams is not None and count > target.max_streams:
                rows.append([count, target.name, "not run"] + [""] * 9)
                continue
            quiet(servers, sizes)
            pool = gevent.pool.Pool(count)
            stub, client = servers.targets()[0], psutil.Process()
            cpu_before, stub_before, client_before = target.cpu(), stub.cpu(), sum(client.cpu_times()[:2])
            streams = [pool.spawn(one_stream, target, {"tokens": tokens, "interval": 0.02}) for _ in range(count)]
            gevent.joinall(streams, timeout=180)
            per_token = 1e6 / (count * tokens)
            cpu_per_token = (target.cpu() - cpu_before) * per_token
            stub_per_token = (stub.cpu() - stub_before) * per_token
            client_per_token = (sum(client.cpu_times()[:2]) - client_before) * per_token
            pool.kill(block=True)
            done = [g.value for g in streams if g.successful() and g.value is not None]
            latencies = [value for stream in done for value in stream.latencies]
            firsts = [(s.first_token_at - s.sent_at) * 1000 for s in done if s.first_token_at]
            complete = sum(1 for stream in done if stream.complete and stream.tokens == tokens) / count
            p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
            direct = direct or p99
            rows.append([count, target.name, f"{complete:.1%}", f"{percentile(firsts, 0.5):.0f}",
                         f"{percentile(firsts, 0.99):.0f}", f"{p50:.1f}", f"{p99:.1f}", f"{p99 - direct:+.1f}",
                         "" if target.name == "direct" else f"{cpu_per_token:.0f}", f"{stub_per_token:.0f}",
                         f"{client_per_token:.0f}", f"{2e6 / (count * 50):.0f}"])
            summary[f"{target.name}: {count} streams: completion"] = complete
            summary[f"{target.name}: {count} streams: first token p99 (ms)"] = percentile(firsts, 0.99)
            summary[f"{target.name}: {count} streams: added per-token latency p99 (ms)"] = p99 - direct
    table(f"3. Concurrency: streams of {tokens} tokens at 20 ms/token (50 tokens/s), started at once, one worker; "
          "token latency = receive - upstream send (ms); CPU per token (µs) of the server, the stub and this "
          "client, and what two cores allow all three at that rate",
          ["streams", "", "done", "first token p50", "p99", "token p50", "token p99", "added p99", "server CPU",
           "stub CPU", "client CPU", "2-core budget"], rows)


def scenario_cancel(servers, sizes, summary):
    rows = []
    for target in servers.targets():
        quiet(servers, sizes)
        pool = gevent.pool.Pool()
        for _ in range(sizes["cancel_background"]):
            pool.spawn(one_stream, target, {"tokens": 400, "interval": 0.02}, keep_latencies=False)
        gevent.sleep(sizes["steady_seconds"])  # let the background load reach its steady state
        closes = {}

        def leave(request_id: str, early: bool, target=target, closes=closes):
            sock = socket.create_connection(("127.0.0.1", target.port))
            # (The floor sends its headers with the first body bytes: its early leavers wait the delay out.)
            options = {"tokens": 400, "interval": 0.02, "id": request_id, "delay": sizes["early_delay"] if early else 0}
            if early:
                Stream().run(sock, options, keep_latencies=False, stop_at_headers=True, auth=target.auth)
            else:
                Stream().run(sock, options, keep_latencies=False, stop_after=5, auth=target.auth)
            closes[request_id] = time.monotonic()
            sock.close()

        leavers = [pool.spawn(leave, f"{target.name}-mid-{i}", False) for i in range(sizes["cancel_mid"])]
        leavers += [pool.spawn(leave, f"{target.name}-early-{i}", True) for i in range(sizes["cancel_early"])]
        gevent.joinall(leavers, timeout=180)  # a slow peer takes tens of seconds to its fifth token under load
        deadline = time.monotonic() + sizes["cancel_wait"]  # the floor never cancels a silent upstream
        while True:
            stats = servers.upstream_stats()
            if all(stats.get(i, {}).get("closed_at") for i in closes) or time.monotonic() > deadline:
                break
            gevent.sleep(0.05)
        for kind in ("mid", "early"):
            delays = [(stats[i]["closed_at"] - closes[i]) * 1000 for i in closes
                      if f"-{kind}-" in i and stats.get(i, {}).get("closed_at")]
            missing = sum(1 for i in closes if f"-{kind}-" in i) - len(delays)
            left = sum(1 for i in closes if f"-{kind}-" in i)
            never = (sizes["cancel_mid"] if kind == "mid" else sizes["cancel_early"]) - left
            rows.append([target.name, kind, len(delays), missing, never] + (
                [f"{percentile(delays, 0.5):.2f}", f"{percentile(delays, 0.99):.2f}", f"{max(delays):.2f}"]
                if delays else ["-", "-", "-"]))
            if delays:
                summary[f"{target.name}: cancel {kind}-stream under load p99 (ms)"] = percentile(delays, 0.99)
        pool.kill(block=True)
    table(f"4. Cancel under load: {sizes['cancel_background']} running streams; client close -> upstream close (ms)",
          ["path", "when", "closed", "not closed", "never got to leave (180 s)", "p50", "p99", "max"], rows)


def scenario_leaks(servers, sizes, summary):
    rng = random.Random(1)
    port = servers.jarvis_port
    before = settle(servers, sizes["steady_seconds"])

    def random_close(index: int):
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            mode = rng.random()
            options = {"tokens": 20, "interval": 0.005}
            if mode < 0.25:
                Stream().run(sock, options, keep_latencies=False)
            elif mode < 0.4:
                Stream().run(sock, {**options, "delay": 1}, keep_latencies=False, stop_at_headers=True)
            else:
                Stream().run(sock, options, keep_latencies=False, stop_after=rng.randint(1, 19))
            if rng.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        finally:
            sock.close()

    pool = gevent.pool.Pool(100)
    started = time.monotonic()
    for index in range(sizes["leak_streams"]):
        pool.spawn(random_close, index)
    pool.join()
    took = time.monotonic() - started
    after = settle(servers, sizes["steady_seconds"])
    rows = [[key, f"{before[key]:.1f}" if isinstance(before[key], float) else before[key],
             f"{after[key]:.1f}" if isinstance(after[key], float) else after[key],
             f"{after[key] - before[key]:+.1f}" if isinstance(after[key], float) else after[key] - before[key]]
            for key in ("rss_mb", "fds", "pooled upstream connections", "other fds", "greenlets", "threads",
                        "open_streams")]
    summary["leaks: RSS growth (MB)"] = after["rss_mb"] - before["rss_mb"]
    summary["leaks: fd growth"] = after["fds"] - before["fds"]
    summary["leaks: fd growth besides pooled upstream connections"] = after["other fds"] - before["other fds"]
    summary["leaks: greenlet growth"] = after["greenlets"] - before["greenlets"]
    table(f"5. Leaks: {sizes['leak_streams']} streams closed at random moments ({took:.0f} s, 100 at a time), "
          "Jarvis worker", ["", "before", "after", "change"], rows)


def settle(servers, seconds: float) -> dict:
    """Worker state once open streams and pooled upstream connections have settled."""
    deadline = time.monotonic() + 10
    state = servers.worker_state()
    while state["open_streams"] and time.monotonic() < deadline:
        gevent.sleep(0.05)
        state = servers.worker_state()
    gevent.sleep(seconds)  # idle keep-alive connections and freed memory settle
    return servers.worker_state()


def scenario_memory(servers, sizes, summary):
    count = sizes["memory_streams"]
    baseline = settle(servers, sizes["steady_seconds"])
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", servers.jarvis_port))
        sock.sendall(request_bytes({"tokens": 1, "delay": 120}))
        sockets.append(sock)
    deadline = time.monotonic() + 30
    while servers.worker_state()["open_streams"] < count and time.monotonic() < deadline:
        gevent.sleep(0.2)
    loaded = servers.worker_state()
    for sock in sockets:
        sock.close()
    per_stream_kb = (loaded["rss_mb"] - baseline["rss_mb"]) * 1024 / count
    summary["memory per open stream (KB)"] = per_stream_kb
    table(f"6. Memory: {count} open idle streams (upstream silent), Jarvis worker",
          ["", "no streams", f"{loaded['open_streams']} streams", "per stream"],
          [["RSS MB", f"{baseline['rss_mb']:.1f}", f"{loaded['rss_mb']:.1f}", f"{per_stream_kb:.1f} KB"],
           ["fds", baseline["fds"], loaded["fds"], f"{(loaded['fds'] - baseline['fds']) / count:.1f}"]])


SCENARIOS = {"latency": scenario_latency, "chunk": scenario_chunk, "concurrency": scenario_concurrency,
             "cancel": scenario_cancel, "leaks": scenario_leaks, "memory": scenario_memory}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check that the scripts run")
    parser.add_argument("--only", choices=list(SCENARIOS), action="append", help="run only these scenarios")
    parser.add_argument("--latency-streams", type=int, help="how many streams scenario 1 runs")
    parser.add_argument("--concurrency", type=int, action="append", help="stream counts for scenario 3")
    parser.add_argument("--floor", action="store_true",
                        help="also run the scenarios through the two floors: bench/socket_relay.py (gevent sockets "
                             "copying bytes) and bench/passthrough.py (Flask under gunicorn)")
    parser.add_argument("--baseline", metavar="REF", help="also run Jarvis at this git commit (a worktree), "
                                                          "for before/after in one run")
    parser.add_argument("--peer", choices=["litellm"], help="also run LiteLLM's proxy (installed into "
                                                            "bench/.work/, never into this environment)")
    parser.add_argument("--profile", metavar="SVG", help="record a worker with py-spy into this flame graph "
                                                         "(.txt: raw stacks, for bench/profile_summary.py)")
    parser.add_argument("--profile-target", default="jarvis", metavar="NAME",
                        help="whose worker --profile records: jarvis (default), jarvis@REF, floor")
    args = parser.parse_args()
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.latency_streams:
        sizes["latency_streams"] = args.latency_streams
    if args.concurrency:
        sizes["concurrency"] = args.concurrency
    summary: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        servers = Servers(Path(workdir), floor=args.floor, baseline=args.baseline, peer=args.peer)
        try:
            print(f"Jarvis worker pid {servers.worker.pid}; {os.cpu_count()} cores; loopback")
            profiler = None
            if args.profile:
                profiled = next(target for target in servers.targets() if target.name == args.profile_target)
                worker = profiled.process.children()[0]  # gunicorn's one worker
                profiler = subprocess.Popen(["py-spy", "record", "--pid", str(worker.pid), "--output",
                                             args.profile, "--rate", "500", "--nonblocking",
                                             *(["--format", "raw"] if args.profile.endswith(".txt") else [])],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                gevent.sleep(1)  # py-spy attaches
            print(f"servers up in {time.monotonic() - started:.1f} s")
            for name in args.only or SCENARIOS:
                scenario_started = time.monotonic()
                SCENARIOS[name](servers, sizes, summary)
                summary[f"scenario {name} took (s)"] = time.monotonic() - scenario_started
            if profiler is not None:
                profiler.send_signal(2)
                profiler.wait(30)
        finally:
            servers.stop()
            errors = [line for line in servers.log.read_text().splitlines() if "[ERROR]" in line]
    print("\nSummary")
    for key, value in summary.items():
        print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    print(f"  ERROR lines in Jarvis's log: {len(errors)}")
    print(f"  bench took {time.monotonic() - started:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
