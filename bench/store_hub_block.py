"""How long do conversation-store calls block the gevent hub? Through the store's thread vs directly on the hub.

A ticker greenlet asks to wake every 1 ms and records how late it wakes; the
worst lateness while the store works is how long the hub was blocked. Run:
    python bench/store_hub_block.py [--writes 2000]
"""

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from jarvis.stores.sqlite import SQLiteStore  # noqa: E402


def measure(work) -> tuple[float, float, float]:
    """Run `work` in a greenlet; return (seconds it took, p99 and max hub lateness in ms)."""
    lateness = []
    running = True

    def ticker():
        while running:
            before = time.perf_counter()
            gevent.sleep(0.001)
            lateness.append((time.perf_counter() - before - 0.001) * 1000)

    ticking = gevent.spawn(ticker)
    started = time.perf_counter()
    gevent.spawn(work).join()
    took = time.perf_counter() - started
    running = False
    ticking.join()
    lateness.sort()
    return took, lateness[int(len(lateness) * 0.99)], lateness[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store = SQLiteStore(directory)
        conversation = store.create_conversation("bench")
        message = store.add_message(conversation["id"], "assistant", "", "streaming")
        text = "word " * 400

        def through_thread():
            for index in range(args.writes):
                store.update_message(message, text[: index % 2000], "streaming")

        def on_hub():
            for index in range(args.writes):
                store._update_message(message, text[: index % 2000], "streaming", None)

        rows = [("store thread (Jarvis)", *measure(through_thread)), ("directly on the hub", *measure(on_hub))]
    print(f"{args.writes} message updates (WAL, synchronous=NORMAL)")
    print(f"{'path':<24}{'total s':>9}{'per call µs':>13}{'hub lag p99 ms':>16}{'hub lag max ms':>16}")
    for name, took, p99, worst in rows:
        print(f"{name:<24}{took:>9.2f}{took / args.writes * 1e6:>13.0f}{p99:>16.2f}{worst:>16.2f}")


if __name__ == "__main__":
    main()
