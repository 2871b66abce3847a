"""The store under load, SQLite beside PostgreSQL in the same run: many answers streaming at once.

Each answer is a greenlet that saves its growing text every --interval seconds (what a run does while
nobody follows it from elsewhere), queued as Jarvis queues it (`update_message_later`), while one
greenlet renews the leases and reads the stop flags every 0.1 s (the runs' tick) and another measures
how late the gevent hub wakes it (the worst hub lag is what every other stream on the worker feels).
PostgreSQL is a throw-away cluster (tests/postgres.py, fsync off: commits cost no disk flush) unless
--database-url names one.

    python bench/store_load.py [--answers 300] [--seconds 10] [--interval 0.5]
"""

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jarvis import leases  # noqa: E402
from jarvis.stores.sqlite import SQLiteStore  # noqa: E402

OWNER = leases.this_process()


def run(store, answers: int, seconds: float, interval: float) -> dict:
    message_ids = []
    for number in range(answers):
        conversation = store.create_conversation(f"load {number}")
        message_id, _, _ = store.start_answer(conversation["id"], owner=OWNER, user_content="go")
        message_ids.append(message_id)
    latencies, lags, ticks = [], [], []
    issued = [0]
    stop_at = time.monotonic() + seconds

    def answer(message_id: int, offset: float):
        gevent.sleep(offset)  # answers started at different moments
        text = ""
        while time.monotonic() < stop_at:
            text += "token " * 25  # 50 tokens/s for 0.5 s
            asked = time.monotonic()
            issued[0] += 1
            result = store.update_message_later(message_id, text, "streaming")
            result.rawlink(lambda _result, asked=asked: latencies.append(time.monotonic() - asked))
            gevent.sleep(interval)

    def tick():
        while time.monotonic() < stop_at:
            started = time.monotonic()
            store.tick_runs(OWNER, renew=True)
            ticks.append(time.monotonic() - started)
            gevent.sleep(0.1)

    def hub_lag():
        while time.monotonic() < stop_at:
            asked = time.monotonic()
            gevent.sleep(0.01)
            lags.append(time.monotonic() - asked - 0.01)

    started = time.monotonic()
    jobs = [gevent.spawn(answer, message_id, interval * number / answers) for number, message_id in
            enumerate(message_ids)]
    jobs += [gevent.spawn(tick), gevent.spawn(hub_lag)]
    gevent.joinall(jobs)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(latencies) < issued[0]:  # the queued saves still running
        gevent.sleep(0.05)
    elapsed = time.monotonic() - started
    latencies.sort()
    return {"saves": len(latencies), "calls_per_second": (len(latencies) + len(ticks)) / elapsed,
            "save_p50": statistics.median(latencies), "save_p99": latencies[int(len(latencies) * 0.99) - 1],
            "tick_p99": sorted(ticks)[int(len(ticks) * 0.99) - 1], "hub_lag_max": max(lags)}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--answers", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        store = SQLiteStore(workdir)
        try:
            rows.append(("SQLite (WAL, its own thread)", run(store, args.answers, args.seconds, args.interval)))
        finally:
            store.close()
    cluster = None
    url = args.database_url
    if url is None:
        from tests.postgres import PostgresCluster

        cluster = PostgresCluster().start()
        url = cluster.new_database()
    try:
        from jarvis.stores.postgres import PostgresStore, waiting_strategy

        store = PostgresStore(url)
        try:
            name = f"PostgreSQL (pool, {waiting_strategy()})"
            rows.append((name, run(store, args.answers, args.seconds, args.interval)))
        finally:
            store.close()
    finally:
        if cluster is not None:
            cluster.stop()

    print(f"{args.answers} answers saving every {args.interval:g} s for {args.seconds:g} s, plus the runs' tick "
          "every 0.1 s")
    print(f"{'':<36}{'saves':>7}{'calls/s':>9}{'save p50 ms':>13}{'save p99 ms':>13}{'tick p99 ms':>13}"
          f"{'worst hub lag ms':>18}")
    for name, row in rows:
        print(f"{name:<36}{row['saves']:>7}{row['calls_per_second']:>9.0f}{row['save_p50'] * 1000:>13.1f}"
              f"{row['save_p99'] * 1000:>13.1f}{row['tick_p99'] * 1000:>13.1f}{row['hub_lag_max'] * 1000:>18.1f}")


if __name__ == "__main__":
    main()
