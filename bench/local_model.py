"""The embedded model through Jarvis against llama-cpp-python called directly, in the same run.

Direct: this process loads the same GGUF with the same thread count and streams
the prompt. Jarvis: gunicorn (one worker, no upstream) streams it over HTTP,
while a health checker polls /healthz to measure how long the hub is ever
kept from answering; gevent's monitor reports any block over 20 ms.

    python bench/local_model.py [--runs 5] [--tokens 200]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jarvis.backends.local import load_llama  # noqa: E402
from jarvis.settings import Settings  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402

PROMPT = [{"role": "user", "content": "Count from 1 to 300, separated by commas."}]


def direct(llama, tokens: int) -> tuple[float, float]:
    """(time to first token, tokens/s) for one streamed completion, in this process."""
    started = time.perf_counter()
    first, count = None, 0
    for chunk in llama.create_chat_completion(messages=PROMPT, stream=True, max_tokens=tokens, temperature=0,
                                              seed=1):
        if chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            count += 1
    return first - started, count / (time.perf_counter() - first)


def through_jarvis(port: int, tokens: int) -> tuple[float, float]:
    body = json.dumps({"messages": PROMPT, "stream": True, "max_tokens": tokens, "temperature": 0,
                       "seed": 1}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    first, count = None, 0
    with urllib.request.urlopen(request) as response:
        for line in response:
            if line.startswith(b"data: {") and b'"content"' in line:
                first = first or time.perf_counter()
                count += 1
    return first - started, count / (time.perf_counter() - first)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    settings = Settings.from_env({key: value for key, value in os.environ.items() if key != "JARVIS_UPSTREAM_URL"})
    # Both sides load the model once and answer once before measuring (llama-cpp-python then reuses
    # the prompt's cached prefix on both sides alike).
    llama = load_llama(settings.local_model, settings.local_context, settings.local_threads_or_cores)
    direct(llama, args.tokens)
    direct_runs = [direct(llama, args.tokens) for _ in range(args.runs)]
    del llama

    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        log = Path(workdir) / "jarvis.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("JARVIS_")}
        env.update({"JARVIS_DATA_DIR": workdir, "GEVENT_MAX_BLOCKING_TIME": "0.02"})
        server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                                   "--bind", f"127.0.0.1:{port}", "--error-logfile", str(log), "app:app"],
                                  cwd=ROOT, env=env)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz")
            latencies, done = [], threading.Event()

            def health_checker():
                while not done.is_set():
                    started = time.perf_counter()
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read()
                    latencies.append(time.perf_counter() - started)
                    done.wait(0.01)

            checker = threading.Thread(target=health_checker)
            checker.start()
            through_jarvis(port, args.tokens)
            jarvis_runs = [through_jarvis(port, args.tokens) for _ in range(args.runs)]
            done.set()
            checker.join()
        finally:
            server.terminate()
            server.wait(30)
        # A report is the blocked greenlet's line then its stack. Those from the worker's start-up
        # (imports in post_worker_init, before it accepts a connection) kept no request waiting.
        reports = log.read_text().split("appears to be blocked")[1:]
        at_start = sum("in init_process" in report.split("Info:")[0] for report in reports)
        blocked = len(reports) - at_start

    print(f"Embedded model ({Path(settings.local_model).name}), {settings.local_threads_or_cores} thread(s), "
          f"{args.runs} runs of {args.tokens} tokens; medians")
    print(f"{'':<28}{'first token ms':>16}{'tokens/s':>10}")
    for name, runs in (("llama-cpp-python directly", direct_runs), ("through Jarvis (HTTP, SSE)", jarvis_runs)):
        print(f"{name:<28}{statistics.median(r[0] for r in runs) * 1000:>16.1f}"
              f"{statistics.median(r[1] for r in runs):>10.1f}")
    ratio = statistics.median(r[1] for r in jarvis_runs) / statistics.median(r[1] for r in direct_runs)
    print(f"tokens/s ratio Jarvis/direct: {ratio:.2f}")
    latencies.sort()
    print(f"/healthz during generation: {len(latencies)} checks, median {statistics.median(latencies) * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; gevent monitor reports of a hub blocked > 20 ms: {blocked} "
          f"(and {at_start} while the worker started, before it accepted a connection)")


if __name__ == "__main__":
    main()
