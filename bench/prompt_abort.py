"""What stopping the embedded model inside a prompt costs, and how fast it stops.

llama.cpp calls its abort callback after every node of every compute graph. Jarvis's
callback is C (libc's strlen over a flag byte, jarvis.backends.local.PromptAbort); the
obvious alternative is a Python ctypes callback, which takes the GIL on every call. This
reads the same long prompt with no callback, with each callback, and with each while a
second Python thread keeps the GIL busy (as the gevent hub does under load); then it
cancels the prompt at random moments and reports how long llama.cpp took to stop.

    python bench/prompt_abort.py [--words 400] [--runs 3] [--cancels 10] [--no-busy]

--no-busy leaves out the column read while another thread keeps the GIL busy: the Python callback waits
for the GIL at every node there, and the spinning thread burns a core all the while (3.5 of the 4.7 CPU-s
of the test suite's smoke run).
"""

import argparse
import ctypes
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jarvis.backends.local import PromptAbort, load_llama  # noqa: E402
from jarvis.settings import Settings  # noqa: E402


def read_prompt(llama, tokens) -> float:
    llama.reset()
    started = time.perf_counter()
    llama.eval(tokens)
    return time.perf_counter() - started


def timed(llama, tokens, runs: int, busy: bool) -> float:
    """Median seconds to read the prompt, optionally while another thread spins on the GIL."""
    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)]) if busy else None
    if spinner:
        spinner.start()
    try:
        return statistics.median(read_prompt(llama, tokens) for _ in range(runs))
    finally:
        stop.set()
        if spinner:
            spinner.join()


def cancel_latencies(llama, tokens, prompt_abort: PromptAbort, cancels: int, full: float) -> list[float]:
    rng = random.Random(1)
    latencies = []
    cancelled_at = []

    def cancel():
        cancelled_at.append(time.perf_counter())
        prompt_abort.trigger()

    for _ in range(cancels):
        prompt_abort.clear()
        timer = threading.Timer(rng.uniform(0.1, max(0.15, full * 0.8)), cancel)
        timer.start()
        try:
            read_prompt(llama, tokens)
        except RuntimeError:  # llama_decode returned 2: aborted
            latencies.append(time.perf_counter() - cancelled_at[-1])
        timer.join()
    prompt_abort.clear()
    return latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--words", type=int, default=400)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cancels", type=int, default=10)
    parser.add_argument("--no-busy", action="store_true", help="leave out the GIL-busy column")
    args = parser.parse_args()
    settings = Settings.from_env({key: value for key, value in os.environ.items() if key != "JARVIS_UPSTREAM_URL"})
    llama = load_llama(settings.local_model, settings.local_context, settings.local_threads_or_cores)
    words = " ".join(f"word{n % 97}" for n in range(args.words))
    tokens = llama.tokenize(words.encode())[: settings.local_context - 8]
    from llama_cpp import llama_cpp as bindings

    context = llama._ctx.ctx
    prompt_abort = PromptAbort(llama)  # installs Jarvis's callback
    calls = [0]

    @bindings.ggml_abort_callback
    def python_callback(_):
        calls[0] += 1
        return False

    callbacks = {"no callback": ctypes.cast(None, bindings.ggml_abort_callback),
                 "Jarvis: strlen over a flag (C)": prompt_abort.callback,
                 "a Python ctypes callback": python_callback}
    read_prompt(llama, tokens)  # warm-up
    rows = []
    for name, callback in callbacks.items():
        data = ctypes.cast(prompt_abort.flag, ctypes.c_void_p) if callback is prompt_abort.callback else None
        bindings.llama_set_abort_callback(context, callback, data)
        rows.append((name, timed(llama, tokens, args.runs, busy=False),
                     None if args.no_busy else timed(llama, tokens, args.runs, busy=True)))
    bindings.llama_set_abort_callback(context, prompt_abort.callback, ctypes.cast(prompt_abort.flag, ctypes.c_void_p))
    latencies = cancel_latencies(llama, tokens, prompt_abort, args.cancels, rows[1][1])

    reads = max(1, args.runs * (1 if args.no_busy else 2))  # the Python callback's reads: idle, and busy
    print(f"Reading a {len(tokens)}-token prompt ({settings.local_threads_or_cores} thread(s)); medians of "
          f"{args.runs}; the callback runs {calls[0] // reads} times per prompt")
    print(f"{'abort callback':<34}{'idle ms':>10}{'tok/s':>8}{'GIL busy ms':>14}{'tok/s':>8}")
    base = rows[0][1]
    for name, idle, busy in rows:
        if busy is None:
            print(f"{name:<34}{idle * 1000:>10.0f}{len(tokens) / idle:>8.0f}{'-':>14}{'-':>8}   ({idle / base:.2f}x)")
            continue
        print(f"{name:<34}{idle * 1000:>10.0f}{len(tokens) / idle:>8.0f}{busy * 1000:>14.0f}{len(tokens) / busy:>8.0f}"
              f"   ({idle / base:.2f}x, {busy / base:.2f}x of no callback idle)")
    if latencies:
        print(f"cancel -> llama_decode returned: {len(latencies)} cancels, p50 "
              f"{statistics.median(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms")
    else:
        print("cancel -> llama_decode returned: the prompt finished before every cancel (use more --words)")


if __name__ == "__main__":
    main()
