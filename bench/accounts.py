"""What accounts cost a request: sign-in (Argon2id) and the key check on /v1, on a real server.

One gunicorn (one gevent worker) in front of the fake upstream, on SQLite. Measured, each `--runs` times,
one request at a time on a kept-alive connection:

- sign-in with the right password, a wrong one, and an unknown name (the same work: a dummy hash);
- `GET /v1/models` with no accounts (baseline), with a personal key, and with a session cookie;
- a streamed chat completion (3 tokens, read to [DONE]) with no accounts (its baseline), with a key, and
  with a key whose account has limits (tokens a day: the day's count read from the store; streams at
  once: a row claimed and given back in the store).

Each sign-in comes from its own address (X-Forwarded-For, which Jarvis reads from a proxy on loopback):
from one address, the 11th wrong password in 10 minutes is answered 429 without any hashing.

    python bench/accounts.py [--runs 50]
"""

from __future__ import annotations

import argparse
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

from tests.fake_upstream import FakeUpstream  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402

PASSWORD = "a password for the benchmark"


def timed(call, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - started) * 1000)
        response.close()
    return times


def row(name: str, times: list[float], baseline: float | None = None) -> str:
    median = statistics.median(times)
    added = f"{median - baseline:+8.2f}" if baseline is not None else "       -"
    return f"| {name:<40} | {median:8.2f} | {max(times):8.2f} | {added} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    arguments = parser.parse_args()
    upstream = FakeUpstream()
    scratch = tempfile.TemporaryDirectory(prefix="jarvis-bench-accounts-")  # the data and metrics, removed at the end
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("JARVIS_")},
           "JARVIS_DATA_DIR": os.path.join(scratch.name, "data"), "JARVIS_UPSTREAM_URL": upstream.url,
           "JARVIS_TITLES": "0", "PROMETHEUS_MULTIPROC_DIR": os.path.join(scratch.name, "metrics")}
    os.mkdir(env["PROMETHEUS_MULTIPROC_DIR"])
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                               "--bind", f"127.0.0.1:{port}", "-w", "1", "app:app"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/healthz", 30)
        http = requests.Session()
        rows = []
        open_times = timed(lambda: http.get(url + "/v1/models", timeout=10), arguments.runs)
        baseline = statistics.median(open_times)
        rows.append(row("GET /v1/models, no accounts (baseline)", open_times))
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        upstream.scenario.tokens = 3

        def streamed(headers=None):
            response = http.post(url + "/v1/chat/completions", json=chat, headers=headers or {}, timeout=10)
            assert response.status_code == 200 and response.content.rstrip().endswith(b"[DONE]"), response.text
            return response

        streamed_times = timed(streamed, arguments.runs)
        stream_baseline = statistics.median(streamed_times)
        rows.append(row("chat stream, no accounts (its baseline)", streamed_times))

        def users(*command, password=None):
            return subprocess.run([sys.executable, "-m", "jarvis.users", *command], cwd=ROOT, env=env, check=True,
                                  input=password and password + "\n", capture_output=True, text=True).stdout
        users("add", "alice", password=PASSWORD)
        key = users("key", "alice").strip().splitlines()[-1]
        deadline = time.monotonic() + 10
        while http.get(url + "/v1/models", timeout=10).status_code != 401:  # accounts on within a second
            if time.monotonic() > deadline:
                raise SystemExit("accounts mode never started")
        keyed = timed(lambda: http.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10),
                      arguments.runs)
        rows.append(row("GET /v1/models with a personal key", keyed, baseline))
        rows.append(row("chat stream with a personal key", timed(lambda: streamed({"x-api-key": key}),
                                                                   arguments.runs), stream_baseline))
        users("limit", "alice", "--tokens-per-day", str(10**9), "--max-streams", "4")
        rows.append(row("chat stream, key, account with limits", timed(lambda: streamed({"x-api-key": key}),
                                                                         arguments.runs), stream_baseline))
        signed = requests.Session()
        assert signed.post(url + "/api/session", json={"username": "alice", "password": PASSWORD}).status_code == 204
        rows.append(row("GET /v1/models with a session cookie", timed(lambda: signed.get(url + "/v1/models"),
                                                                     arguments.runs), baseline))
        for name, body in (("sign-in, right password", {"username": "alice", "password": PASSWORD}),
                           ("sign-in, wrong password", {"username": "alice", "password": "not the password"}),
                           ("sign-in, unknown name", {"username": "nobody", "password": "not the password"})):
            addresses = iter(f"198.51.100.{number % 250 + 1}" for number in range(arguments.runs))
            rows.append(row(name, timed(lambda body=body, addresses=addresses: requests.post(
                url + "/api/session", json=body, headers={"X-Forwarded-For": next(addresses)}, timeout=10),
                arguments.runs), baseline))
        print(f"Accounts: one worker, SQLite, {arguments.runs} requests each, one at a time (ms)\n")
        print("| request                                  |   median |    worst | added vs baseline |")
        print("|---|---:|---:|---:|")
        print("\n".join(rows))
        return 0
    finally:
        server.terminate()
        server.wait(10)
        upstream.stop()
        scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
