"""The embedded model serving several people at once: Jarvis's slots beside one-at-a-time and beside
llama-cpp-python's own server, in one run.

Three servers over the same GGUF with the same thread count, one after the other (each alone on the
machine): Jarvis with JARVIS_LOCAL_SLOTS=4 (answers decoded together, jarvis/backends/batching.py),
Jarvis with JARVIS_LOCAL_SLOTS=1 (the same code, one answer at a time: the baseline), and
llama-cpp-python's server (`python -m llama_cpp.server`, which serialises requests). For 1, 2, 4 and 8
concurrent answers of `--tokens` tokens each (distinct prompts, temperature 0): aggregate tokens/s (all
answers' tokens over the wall time), and per answer the time to first token and its own tokens/s
(medians). Then the second turn of a conversation of about `--history` tokens on Jarvis (4 slots): time
to first token with its prefix kept in its slot, and again after four other conversations took every slot.
A health checker polls /healthz throughout; gevent's monitor reports any block of the hub over 20 ms.

    python bench/local_model.py [--tokens 128] [--concurrency 1,2,4,8] [--history 1500] [--no-llama-server]
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

from jarvis.settings import Settings, resolve_local_model  # noqa: E402
from tests.live import blocked_hub_reports  # noqa: E402
from tests.net import free_port, wait_for_http  # noqa: E402

TOPICS = ["rivers", "mountains", "cities", "birds", "trees", "stars", "ships", "songs"]


def prompt(n: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long list of facts about {TOPICS[n % len(TOPICS)]}, numbered."}]


def stream(base: str, messages: list[dict], tokens: int, model: str | None = None, trace_id: str = "") -> dict:
    """One streamed answer: its time to first token, token count, and tokens/s after the first."""
    body = {"messages": messages, "stream": True, "max_tokens": tokens, "temperature": 0}
    if model:
        body["model"] = model
    request = urllib.request.Request(f"{base}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"X-Request-Id": trace_id} if trace_id else {})})
    started = time.perf_counter()
    first, last, count = None, None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: {") and b'"content"' in line:
                last = time.perf_counter()
                first = first or last
                count += 1
    rate = (count - 1) / (last - first) if count > 1 and last > first else 0.0
    return {"ttft": first - started if first else float("nan"), "tokens": count, "rate": rate, "ended": last}


def concurrent(base: str, n: int, tokens: int, model: str | None = None) -> dict:
    results = [None] * n

    def one(i):
        results[i] = stream(base, prompt(i), tokens, model)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {"aggregate": sum(r["tokens"] for r in results) / wall,
            "ttft": statistics.median(r["ttft"] for r in results), "ttft_max": max(r["ttft"] for r in results),
            "rate": statistics.median(r["rate"] for r in results)}


class Server:
    def __init__(self, command: list[str], env: dict, port: int, base: str, log: Path, ready: str):
        self.port, self.base, self.log = port, base, log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        wait_for_http(f"http://127.0.0.1:{port}{ready}", timeout=120)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def jarvis(workdir: str, slots: int, threads: int) -> Server:
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("JARVIS_")}
    env.update({"JARVIS_DATA_DIR": tempfile.mkdtemp(dir=workdir), "JARVIS_LOCAL_SLOTS": str(slots),
                "JARVIS_LOCAL_THREADS": str(threads), "JARVIS_TITLES": "0", "GEVENT_MAX_BLOCKING_TIME": "0.02"})
    log = Path(workdir) / f"jarvis-{slots}.log"
    return Server([sys.executable, "-m", "gunicorn", "--config", "python:jarvis.server_config", "--bind",
                   f"127.0.0.1:{port}", "--error-logfile", str(log), "jarvis.wsgi:app"], env, port,
                  f"http://127.0.0.1:{port}/v1", log, "/healthz")


def llama_server(workdir: str, threads: int, context: int) -> Server:
    port = free_port()
    log = Path(workdir) / "llama-server.log"
    return Server([sys.executable, "-m", "tests.llama_server", "--model", resolve_local_model(None), "--host",
                   "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
                   "--n_threads_batch", str(threads), "--model_alias", "local",
                   # (by default a new request interrupts the one streaming: here they wait their turn)
                   "--interrupt_requests", "False"], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, port,
                  f"http://127.0.0.1:{port}/v1", log, "/v1/models")


def health_checker(port: int):
    latencies, done = [], threading.Event()

    def check():
        while not done.is_set():
            started = time.perf_counter()
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30).read()
            latencies.append(time.perf_counter() - started)
            done.wait(0.05)

    thread = threading.Thread(target=check)
    thread.start()
    return latencies, lambda: (done.set(), thread.join())


def where(report: str) -> str:
    """The last lines of a report's blocked stack: where the hub was."""
    return " | ".join(line.strip() for line in report.split("Info:", 1)[0].strip().splitlines()[-4:])


def second_turn(server, history: int) -> tuple[float, float, str]:
    """Time to first token of a conversation's second turn with its first kept in a slot, and again after
    four other conversations took every slot; and the server's log."""
    first, second = history_turns(max(1, history // 13))
    stream(server.base, first[:1], 8)  # turn one: read whole, kept in its slot
    kept = stream(server.base, second, 1, trace_id="turn-two-kept")["ttft"]
    for n in range(4):  # four other conversations at once (prompts not asked before): every slot's cache replaced
        threading.Thread(target=stream, args=(server.base, prompt(100 + n), 8)).start()
    wait_until(server.port, lambda model: model["slots_busy"] > 0)
    wait_until(server.port, lambda model: model["slots_busy"] == 0 and model["queued"] == 0)
    cold = stream(server.base, second, 1, trace_id="turn-two-again")["ttft"]
    deadline = time.monotonic() + 10  # a generation's end line comes once its thread has let go, after the stream
    ended = "[turn-two-again] local generation end"
    while ended not in (log := server.log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return kept, cold, log


def history_turns(words: int) -> tuple[list[dict], list[dict]]:
    notes = " ".join(f"Note {n}: the meeting moved to room {n % 7}." for n in range(words))
    first = [{"role": "user", "content": notes},
             {"role": "assistant", "content": "Noted: the meetings moved between seven rooms."}]
    return first, [*first, {"role": "user", "content": "Which room was note 3 about?"}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--history", type=int, default=1500, help="tokens of the conversation's first turn, about")
    parser.add_argument("--no-llama-server", action="store_true")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    settings = Settings.from_env({key: value for key, value in os.environ.items() if key != "JARVIS_UPSTREAM_URL"})
    threads = settings.local_threads_or_cores
    rows, health, blocked = {}, [], []
    with tempfile.TemporaryDirectory() as workdir:
        targets = [("Jarvis, 4 slots", lambda: jarvis(workdir, 4, threads)),
                   ("Jarvis, 1 slot (baseline)", lambda: jarvis(workdir, 1, threads))]
        if not args.no_llama_server:
            targets.append(("llama-cpp-python server", lambda: llama_server(workdir, threads, settings.local_context)))
        for name, start in targets:
            server = start()
            try:
                stream(server.base, prompt(99), 4)  # warm: the model's first use
                checking = name.startswith("Jarvis")
                latencies, stop_checking = health_checker(server.port) if checking else ([], lambda: None)
                rows[name] = {n: concurrent(server.base, n, args.tokens) for n in levels}
                stop_checking()
                health += latencies
                if name == "Jarvis, 4 slots":  # then a conversation's second turn, on the same server
                    kept, cold, log = second_turn(server, args.history)
            finally:
                server.stop()
            if checking:
                # Counted as the tests count them: not the worker's start, nor the monitor's or heartbeat's moments.
                blocked += blocked_hub_reports(server.log.read_text())
        evaluated = {trace: line.split("prompt_evaluated=")[1].split()[0] for line in log.splitlines()
                     for trace in ("turn-two-kept", "turn-two-again") if f"[{trace}] local generation end" in line}

    print(f"Embedded model ({Path(settings.local_model).name}), {threads} thread(s), answers of {args.tokens} "
          f"tokens at temperature 0, distinct prompts; medians per answer")
    print(f"{'':<28}{'answers':>8}{'aggregate tok/s':>17}{'TTFT ms':>10}{'TTFT max ms':>13}{'tok/s each':>12}")
    for name, by_level in rows.items():
        for n, row in by_level.items():
            print(f"{name:<28}{n:>8}{row['aggregate']:>17.1f}{row['ttft'] * 1000:>10.0f}{row['ttft_max'] * 1000:>13.0f}"
                  f"{row['rate']:>12.1f}")
    base = rows["Jarvis, 1 slot (baseline)"]
    print("aggregate tokens/s, 4 slots / 1 slot: " + ", ".join(
        f"{n} answers {rows['Jarvis, 4 slots'][n]['aggregate'] / base[n]['aggregate']:.2f}x" for n in levels))
    print(f"second turn of a conversation (~{args.history} tokens before it): first token after "
          f"{kept * 1000:.0f} ms with its prefix kept, {cold * 1000:.0f} ms read again "
          f"(prompt tokens read: {evaluated.get('turn-two-kept')} vs {evaluated.get('turn-two-again')})")
    health.sort()
    print(f"/healthz during Jarvis's runs: {len(health)} checks, median {statistics.median(health) * 1000:.1f} ms, "
          f"max {health[-1] * 1000:.1f} ms; gevent monitor reports of a hub blocked > 20 ms: {len(blocked)}")
    for report in blocked:
        print(f"  blocked at: {where(report)}")


def wait_until(port: int, condition, timeout: float = 300) -> None:
    """Poll /healthz until `condition(its model part)` holds, within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as response:
            if condition(json.load(response)["model"]):
                return
        time.sleep(0.02)
    raise RuntimeError("the model never got there")


if __name__ == "__main__":
    main()
