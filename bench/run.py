"""Benchmarks: Jarvis (one gunicorn gevent worker) against the same stub upstream called directly, same run.

Starts bench/upstream.py and Jarvis on free loopback ports, runs each scenario
through Jarvis and directly against the upstream, and prints tables with
medians, p99 and ratios:

    1 latency      sequential streams of 200 tokens over one keep-alive connection
    2 chunk        one 5,000-token stream: chunks/s, and Jarvis's CPU per chunk
    3 concurrency  100/300/500/1000 streams of 100 tokens at 20 ms: completion, added per-token latency
    4 cancel       under 300 running streams, 50 clients leave mid-stream and 20 before the first token
    5 leaks        10,000 streams closed at random moments: RSS, fds, greenlets before and after
    6 memory       RSS per open idle stream, with 1,000 open

    python bench/run.py            # everything, a few minutes
    python bench/run.py --smoke    # tiny sizes, seconds (run by the test suite so this cannot rot)
    python bench/run.py --only concurrency
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
import psutil  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.net import free_port, wait_for_http  # noqa: E402

STAMP = re.compile(rb'"content": ?"(\d+\.\d+)\|')
FULL = {"latency_streams": 50, "chunk_tokens": 5000, "concurrency": [100, 300, 500, 1000], "concurrency_tokens": 100,
        "cancel_background": 300, "cancel_mid": 50, "cancel_early": 20, "steady_seconds": 1.0, "leak_streams": 10000,
        "memory_streams": 1000}
SMOKE = {"latency_streams": 3, "chunk_tokens": 200, "concurrency": [10], "concurrency_tokens": 15,
         "cancel_background": 10, "cancel_mid": 3, "cancel_early": 2, "steady_seconds": 0.2, "leak_streams": 40,
         "memory_streams": 20}


# -- processes -----------------------------------------------------------------

class Servers:
    def __init__(self, workdir: Path, floor: bool = False):
        self.upstream_port, self.jarvis_port = free_port(), free_port()
        self.log = workdir / "jarvis.log"
        self.upstream = subprocess.Popen([sys.executable, str(ROOT / "bench" / "upstream.py"), "--port",
                                          str(self.upstream_port)], stdout=subprocess.DEVNULL)
        env = {key: value for key, value in os.environ.items() if not key.startswith("JARVIS_")}
        env.update({"JARVIS_UPSTREAM_URL": f"http://127.0.0.1:{self.upstream_port}/v1",
                    "JARVIS_DATA_DIR": str(workdir / "data"), "GEVENT_MONITOR_THREAD_ENABLE": "false"})
        self.jarvis = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                                        "--bind", f"127.0.0.1:{self.jarvis_port}", "--workers", "1",
                                        "--error-logfile", str(self.log), "app:app"], cwd=ROOT, env=env)
        self.floor = None
        if floor:
            self.floor_port = free_port()
            env["PASSTHROUGH_UPSTREAM_URL"] = f"http://127.0.0.1:{self.upstream_port}/v1"
            self.floor = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config",
                                           str(ROOT / "gunicorn.conf.py"), "--bind", f"127.0.0.1:{self.floor_port}",
                                           "--workers", "1", "--error-logfile", str(workdir / "floor.log"),
                                           "bench.passthrough:app"], cwd=ROOT, env=env)
            wait_for_http(f"http://127.0.0.1:{self.floor_port}/healthz")
        wait_for_http(f"http://127.0.0.1:{self.upstream_port}/v1/models")
        wait_for_http(f"http://127.0.0.1:{self.jarvis_port}/healthz")
        self.worker = psutil.Process(self.jarvis.pid).children()[0]

    def targets(self, with_floor: bool = False):
        floor = [("floor", self.floor_port)] if self.floor and with_floor else []
        return [("direct", self.upstream_port), *floor, ("jarvis", self.jarvis_port)]

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
        processes = [process for process in (self.jarvis, self.floor, self.upstream) if process is not None]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


# -- one streaming client ----------------------------------------------------------

def request_bytes(options: dict) -> bytes:
    body = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}],
                       "x_bench": options}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Stream:
    """Reads one SSE response from a socket; notes first-token time, per-token latencies and completion."""

    def __init__(self):
        self.sent_at = self.first_token_at = self.done_at = None
        self.tokens = 0
        self.latencies: list[float] = []
        self.complete = False

    def run(self, sock, options: dict, keep_latencies: bool = True, stop_after: int | None = None,
            stop_at_headers: bool = False):
        self.sent_at = time.monotonic()
        sock.sendall(request_bytes(options))
        pending = b""
        while True:
            data = sock.recv(65536)
            now = time.monotonic()
            if not data:
                return self
            pending += data
            if stop_at_headers and b"\r\n\r\n" in pending:
                return self
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
            if b"[DONE]" in pending and pending.endswith(b"0\r\n\r\n"):
                self.done_at = now
                self.complete = True
                return self


def one_stream(port: int, options: dict, **kwargs) -> Stream:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return Stream().run(sock, options, **kwargs)


def percentile(values, fraction):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * fraction))] if values else float("nan")


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True)))


# -- scenarios ---------------------------------------------------------------------

def scenario_latency(servers, sizes, summary):
    results = {}
    for name, port in servers.targets():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            Stream().run(sock, {"tokens": 200})  # warm the connection (and Jarvis's upstream pool)
            streams = [Stream().run(sock, {"tokens": 200}) for _ in range(sizes["latency_streams"])]
        results[name] = ([(s.first_token_at - s.sent_at) * 1000 for s in streams],
                         [(s.done_at - s.sent_at) * 1000 for s in streams])
    rows = []
    for index, label in ((0, "time to first token"), (1, "total, 200 tokens")):
        direct, jarvis = results["direct"][index], results["jarvis"][index]
        added = statistics.median(jarvis) - statistics.median(direct)
        rows.append([label, f"{statistics.median(direct):.2f}", f"{statistics.median(jarvis):.2f}",
                     f"{percentile(jarvis, 0.99):.2f}", f"{added:+.2f}",
                     f"{statistics.median(jarvis) / statistics.median(direct):.2f}x"])
        summary[f"added {label} (median ms)"] = added
    table(f"1. Added latency: {sizes['latency_streams']} sequential streams of 200 tokens, one keep-alive connection",
          ["ms", "direct p50", "jarvis p50", "jarvis p99", "added p50", "ratio"], rows)


def scenario_chunk(servers, sizes, summary):
    tokens = sizes["chunk_tokens"]
    rates = {}
    cpu_per_chunk = None
    for name, port in servers.targets():
        one_stream(port, {"tokens": 100}, keep_latencies=False)
        before = servers.worker.cpu_times()
        stream = one_stream(port, {"tokens": tokens}, keep_latencies=False)
        after = servers.worker.cpu_times()
        assert stream.complete and stream.tokens == tokens, (name, stream.tokens)
        rates[name] = tokens / (stream.done_at - stream.sent_at)
        if name == "jarvis":
            cpu_per_chunk = ((after.user + after.system) - (before.user + before.system)) / tokens * 1e6
    added_us = (1 / rates["jarvis"] - 1 / rates["direct"]) * 1e6
    summary["added per-chunk wall time (µs)"] = added_us
    summary["jarvis CPU per chunk (µs)"] = cpu_per_chunk
    table(f"2. Per-chunk cost: one {tokens}-token stream, no delay",
          ["", "direct", "jarvis", "ratio"],
          [["chunks/s", f"{rates['direct']:.0f}", f"{rates['jarvis']:.0f}",
            f"{rates['jarvis'] / rates['direct']:.2f}x"],
           ["µs per chunk (wall)", f"{1e6 / rates['direct']:.1f}", f"{1e6 / rates['jarvis']:.1f}", f"{added_us:+.1f}"],
           ["jarvis worker CPU µs per chunk", "", f"{cpu_per_chunk:.1f}", ""]])


def scenario_concurrency(servers, sizes, summary):
    rows, floor_rows = [], []
    for count in sizes["concurrency"]:
        measured = {}
        # The pass-through copies raw bytes, so only paced tokens (one event per read) compare fairly.
        for name, port in servers.targets(with_floor=True):
            pool = gevent.pool.Pool(count)
            cpu_before = sum(servers.worker.cpu_times()[:2])
            tokens = sizes["concurrency_tokens"]
            streams = [pool.spawn(one_stream, port, {"tokens": tokens, "interval": 0.02}) for _ in range(count)]
            gevent.joinall(streams, timeout=120)
            if name == "jarvis":
                cpu_per_token = (sum(servers.worker.cpu_times()[:2]) - cpu_before) / (count * tokens) * 1e6
            done = [g.value for g in streams if g.successful() and g.value is not None]
            latencies = [value for stream in done for value in stream.latencies]
            complete = sum(1 for stream in done if stream.complete and stream.tokens == tokens)
            measured[name] = (complete / count, latencies)
        direct, jarvis = measured["direct"], measured["jarvis"]
        added50 = (percentile(jarvis[1], 0.5) - percentile(direct[1], 0.5)) * 1000
        added99 = (percentile(jarvis[1], 0.99) - percentile(direct[1], 0.99)) * 1000
        if "floor" in measured:
            floor = measured["floor"]
            floor_rows.append([count, f"{floor[0]:.1%}", f"{percentile(floor[1], 0.5) * 1000:.1f}",
                               f"{percentile(floor[1], 0.99) * 1000:.1f}", f"{jarvis[0]:.1%}",
                               f"{percentile(jarvis[1], 0.5) * 1000:.1f}", f"{percentile(jarvis[1], 0.99) * 1000:.1f}"])
        rows.append([count, f"{direct[0]:.1%}", f"{jarvis[0]:.1%}", f"{percentile(direct[1], 0.5) * 1000:.1f}",
                     f"{percentile(direct[1], 0.99) * 1000:.1f}", f"{percentile(jarvis[1], 0.5) * 1000:.1f}",
                     f"{percentile(jarvis[1], 0.99) * 1000:.1f}", f"{added50:+.1f}", f"{added99:+.1f}",
                     f"{cpu_per_token:.0f}"])
        summary[f"{count} streams: completion"] = jarvis[0]
        summary[f"{count} streams: added per-token latency p99 (ms)"] = added99
    table(f"3. Concurrency: streams of {sizes['concurrency_tokens']} tokens at 20 ms/token (50 tokens/s), one worker; "
          "latency = receive - upstream send (ms)",
          ["streams", "direct done", "jarvis done", "direct p50", "direct p99", "jarvis p50", "jarvis p99",
           "added p50", "added p99", "jarvis CPU µs/token"], rows)
    if floor_rows:
        table("3b. The floor: a 40-line Flask + gevent pass-through (bench/passthrough.py) on the same load (ms)",
              ["streams", "floor done", "floor p50", "floor p99", "jarvis done", "jarvis p50", "jarvis p99"],
              floor_rows)


def scenario_cancel(servers, sizes, summary):
    rows = []
    for name, port in servers.targets():
        pool = gevent.pool.Pool()
        for _ in range(sizes["cancel_background"]):
            pool.spawn(one_stream, port, {"tokens": 400, "interval": 0.02}, keep_latencies=False)
        gevent.sleep(sizes["steady_seconds"])  # let the background load reach its steady state
        closes = {}

        def leave(request_id: str, early: bool, port=port, closes=closes):
            sock = socket.create_connection(("127.0.0.1", port))
            options = {"tokens": 400, "interval": 0.02, "id": request_id, "delay": 5 if early else 0}
            if early:
                Stream().run(sock, options, keep_latencies=False, stop_at_headers=True)
            else:
                Stream().run(sock, options, keep_latencies=False, stop_after=5)
            closes[request_id] = time.monotonic()
            sock.close()

        leavers = [pool.spawn(leave, f"{name}-mid-{i}", False) for i in range(sizes["cancel_mid"])]
        leavers += [pool.spawn(leave, f"{name}-early-{i}", True) for i in range(sizes["cancel_early"])]
        gevent.joinall(leavers, timeout=60)
        deadline = time.monotonic() + 10
        while True:
            stats = servers.upstream_stats()
            if all(stats.get(i, {}).get("closed_at") for i in closes) or time.monotonic() > deadline:
                break
            gevent.sleep(0.2)
        for kind in ("mid", "early"):
            delays = [(stats[i]["closed_at"] - closes[i]) * 1000 for i in closes
                      if f"-{kind}-" in i and stats.get(i, {}).get("closed_at")]
            missing = sum(1 for i in closes if f"-{kind}-" in i) - len(delays)
            rows.append([name, kind, len(delays), missing, f"{percentile(delays, 0.5):.2f}",
                         f"{percentile(delays, 0.99):.2f}", f"{max(delays) if delays else float('nan'):.2f}"])
            if name == "jarvis":
                summary[f"cancel {kind}-stream under load p99 (ms)"] = percentile(delays, 0.99)
        pool.kill(block=True)
    table(f"4. Cancel under load: {sizes['cancel_background']} running streams; client close -> upstream close (ms)",
          ["path", "when", "closed", "not closed", "p50", "p99", "max"], rows)


def scenario_leaks(servers, sizes, summary):
    rng = random.Random(1)
    port = servers.jarvis_port
    before = settle(servers)

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
    after = settle(servers)
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


def settle(servers) -> dict:
    """Worker state once open streams and pooled upstream connections have settled."""
    deadline = time.monotonic() + 10
    state = servers.worker_state()
    while state["open_streams"] and time.monotonic() < deadline:
        gevent.sleep(0.2)
        state = servers.worker_state()
    gevent.sleep(1.0)
    return servers.worker_state()


def scenario_memory(servers, sizes, summary):
    count = sizes["memory_streams"]
    baseline = settle(servers)
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
                        help="also run scenario 3 through bench/passthrough.py, a minimal pass-through")
    parser.add_argument("--profile", metavar="SVG", help="record the Jarvis worker with py-spy into this flame graph")
    args = parser.parse_args()
    sizes = dict(SMOKE if args.smoke else FULL)
    if args.latency_streams:
        sizes["latency_streams"] = args.latency_streams
    if args.concurrency:
        sizes["concurrency"] = args.concurrency
    summary: dict = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        servers = Servers(Path(workdir), floor=args.floor)
        try:
            print(f"Jarvis worker pid {servers.worker.pid}; {os.cpu_count()} cores; loopback")
            profiler = None
            if args.profile:
                profiler = subprocess.Popen(["py-spy", "record", "--pid", str(servers.worker.pid), "--output",
                                             args.profile, "--rate", "500", "--nonblocking",
                                             *(["--format", "raw"] if args.profile.endswith(".txt") else [])],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                gevent.sleep(1)
            for name in args.only or SCENARIOS:
                SCENARIOS[name](servers, sizes, summary)
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
