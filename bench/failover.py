"""What several upstreams cost: failover delay and the model list with a dead upstream, beside one upstream.

Upstreams are the test suite's fake (tests/fake_upstream.py, threads, loopback). Jarvis is gunicorn
with one gevent worker, started afresh for every failover sample, because an upstream that failed
rests for 10 s and is then tried last: a second request would not fail over at all. Each sample
first asks /v1/models (so that the lists are known, as on any worker that has served a request),
then measures one streamed chat from the request's first byte to the first token.

    python bench/failover.py [--runs 7] [--smoke]

--smoke (the test suite's run) takes one case of each kind: one upstream, a refused connection and a 503
for the first token; one upstream and a dead one for the model list. Five gunicorn starts, not nine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fake_upstream import FakeUpstream, Scenario  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402

BODY = {"model": "shared", "messages": [{"role": "user", "content": "hi"}], "stream": True,
        "x_fault": {"tokens": 3}}
ERROR = {"error": {"message": "busy", "type": "server_error", "param": None, "code": None}}


class Jarvis:
    def __init__(self, workdir: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {key: value for key, value in os.environ.items() if not key.startswith("JARVIS_")}
        data = Path(tempfile.mkdtemp(dir=workdir))
        base.update({"JARVIS_DATA_DIR": str(data), "PROMETHEUS_MULTIPROC_DIR": str(data), **env})
        self.log = data / "jarvis.log"
        self.process = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                                         "--bind", f"127.0.0.1:{self.port}", "--error-logfile", str(self.log),
                                         "app:app"], cwd=ROOT, env=base, stdout=subprocess.DEVNULL)
        wait_for_http(self.url + "/healthz")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(30)


def first_token(url: str) -> float:
    """Seconds from sending a streamed chat to its first content chunk; the rest is read to the end."""
    request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(BODY).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first = None
    with urllib.request.urlopen(request, timeout=30) as response:
        for line in response:
            if first is None and line.startswith(b"data: {") and b'"content"' in line:
                first = time.perf_counter() - started
            if b"error" in line:
                raise RuntimeError(f"the client saw an error: {line!r}")
    return first


def models(url: str) -> tuple[float, list[str]]:
    started = time.perf_counter()
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as response:
        data = json.loads(response.read())["data"]
    return time.perf_counter() - started, [model["id"] for model in data]


def upstreams_file(workdir: Path, first_url: str, second_url: str) -> str:
    path = workdir / f"upstreams-{time.monotonic_ns()}.toml"
    path.write_text(f'[[upstream]]\nname = "first"\nurl = "{first_url}"\n\n'
                    f'[[upstream]]\nname = "second"\nurl = "{second_url}"\n')
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="one case of each kind (the test suite's run)")
    args = parser.parse_args()
    second = FakeUpstream(("shared",))
    first = FakeUpstream(("shared",))
    refused = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cases = [
        ("one upstream (JARVIS_UPSTREAM_URL)", None, None, {"JARVIS_UPSTREAM_URL": second.url}),
        ("two, the first answers", first.url, Scenario(tokens=3), {}),
        ("two, the first refuses the connection", refused, None, {}),
        ("two, the first answers 503", first.url, Scenario(status=503, error_body=ERROR), {}),
        ("two, the first answers 429", first.url, Scenario(status=429, error_body=ERROR), {}),
        ("two, the first silent (headers limit 1 s)", first.url, Scenario(headers_delay=60),
         {"JARVIS_UPSTREAM_HEADERS_SECONDS": "1"}),
    ]
    if args.smoke:
        kept = ("one upstream", "two, the first refuses", "two, the first answers 503")
        cases = [case for case in cases if case[0].startswith(kept)]
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        try:
            for name, first_url, scenario, env in cases:
                samples = []
                for _ in range(args.runs):
                    first.scenario = Scenario()
                    if first_url is not None:
                        env = {**env, "JARVIS_UPSTREAMS_FILE": upstreams_file(workdir, first_url, second.url)}
                    jarvis = Jarvis(workdir, env)
                    try:
                        models(jarvis.url)  # both lists known, as on a worker that has served before
                        if scenario is not None:
                            first.scenario = scenario
                        samples.append(first_token(jarvis.url))
                    finally:
                        jarvis.stop()
                rows.append((name, statistics.median(samples), max(samples)))

            dead = FakeUpstream(("gone",))
            dead.scenario = Scenario(models="silent")  # accepts, never answers /models
            list_rows = []
            list_cases = [
                ("one upstream (JARVIS_UPSTREAM_URL)", {"JARVIS_UPSTREAM_URL": second.url}),
                ("two, both up", {"JARVIS_UPSTREAMS_FILE": upstreams_file(workdir, first.url, second.url)}),
                ("two, the first dead (timeout 1 s)", {
                    "JARVIS_UPSTREAMS_FILE": upstreams_file(workdir, dead.url, second.url),
                    "JARVIS_UPSTREAM_MODELS_SECONDS": "1"}),
            ]
            for name, env in list_cases[::2] if args.smoke else list_cases:
                first.scenario = Scenario()
                jarvis = Jarvis(workdir, env)
                try:
                    cold, ids = models(jarvis.url)
                    warm = [models(jarvis.url)[0] for _ in range(max(5, args.runs * 3))]
                finally:
                    jarvis.stop()
                list_rows.append((name, cold, statistics.median(warm), max(warm), ",".join(ids)))
            dead.stop()
        finally:
            first.stop()
            second.stop()

    print(f"1. Request sent -> first token, a fresh worker per sample ({args.runs} samples)")
    print(f"{'':<46}{'median ms':>10}{'max ms':>9}{'vs one':>8}")
    baseline = rows[0][1]
    for name, median, worst in rows:
        print(f"{name:<46}{median * 1000:>10.1f}{worst * 1000:>9.1f}{median / baseline:>7.2f}x")
    costs = {label: median for name, median, _ in rows
             for word, label in (("refuses", "refused"), ("503", "503"), ("429", "429")) if word in name}
    print("failover cost (median, minus one upstream): " + ", ".join(
        f"{label} {(median - baseline) * 1000:.1f} ms" for label, median in costs.items()))
    print()
    print("2. GET /v1/models: the first call of a worker, then later calls")
    print(f"{'':<40}{'first ms':>10}{'later median':>14}{'later max':>11}  models")
    for name, cold, warm, worst, ids in list_rows:
        print(f"{name:<40}{cold * 1000:>10.1f}{warm * 1000:>14.1f}{worst * 1000:>11.1f}  {ids}")


if __name__ == "__main__":
    main()
