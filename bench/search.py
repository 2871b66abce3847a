"""Search over 10,000 conversations: the store's full-text index beside a plain scan (LIKE), same data.

Each conversation has a title and six messages of ~60 words drawn from a fixed vocabulary, plus one
rare word planted in a few of them; queries are a rare word, a common word, two words, and a prefix.
SQLite (FTS5) always; PostgreSQL (text search on a GIN index) on a throw-away cluster unless --no-postgres.

    python bench/search.py [--conversations 10000] [--runs 20]
"""

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jarvis.stores.sqlite import SQLiteStore  # noqa: E402

VOCABULARY = ("time year people way day man thing woman life child world school state family student group "
              "country problem hand part place case week company system program question work government number "
              "night point home water room mother area money story fact month lot right study book eye job word "
              "business issue side kind head house service friend father power hour game line end member law car "
              "city community name president team minute idea kid body information back parent face others level "
              "office door health person art war history party result change morning reason research girl guy "
              "moment air teacher force education").split()
QUERIES = {"rare word": "quokka", "common word": "water", "two words": "water money", "prefix": "educ"}


def corpus(conversations: int, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    documents = []
    for number in range(conversations):
        messages = []
        for turn in range(6):
            words = rng.choices(VOCABULARY, k=60)
            if number % 997 == 0 and turn == 2:
                words[10] = "quokka"
            messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": " ".join(words),
                             "reasoning": "", "status": "complete", "error": None, "model": None, "stats": None,
                             "created_at": 1_700_000_000 + number})
        documents.append({"title": " ".join(rng.choices(VOCABULARY, k=4)), "created_at": 1_700_000_000 + number,
                          "updated_at": 1_700_000_000 + number, "settings": None, "messages": messages})
    return documents


def timed(function, runs: int) -> tuple[float, float, int]:
    times, found = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        found = len(function())
        times.append(time.perf_counter() - started)
    return statistics.median(times), max(times), found


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    documents = corpus(args.conversations)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        store = SQLiteStore(workdir)
        started = time.perf_counter()
        for index in range(0, len(documents), 500):
            store.import_conversations(documents[index:index + 500])
        loaded = time.perf_counter() - started
        for name, query in QUERIES.items():
            words = query.split()
            like = " AND ".join(["content LIKE ?"] * len(words))

            def scan(words=words, like=like):
                return store._run(lambda: store.connection.execute(
                    f"SELECT id FROM messages WHERE {like} LIMIT 50", [f"%{w}%" for w in words]).fetchall())

            rows.append(("SQLite", name, *timed(lambda query=query: store.search(query), args.runs),
                         *timed(scan, args.runs)[:2]))
        store.close()
    print(f"{args.conversations} conversations, {args.conversations * 6} messages (SQLite loaded in {loaded:.1f} s)")
    if not args.no_postgres:
        from tests.postgres import PostgresCluster

        cluster = PostgresCluster().start()
        try:
            from jarvis.stores.postgres import PostgresStore

            store = PostgresStore(cluster.new_database())
            for index in range(0, len(documents), 500):
                store.import_conversations(documents[index:index + 500])
            with store.pool.connection() as db:
                db.execute("ANALYZE")
            for name, query in QUERIES.items():
                words = query.split()
                like = " AND ".join(["content ILIKE %s"] * len(words))

                def scan(words=words, like=like):
                    with store.pool.connection() as db:
                        return db.execute(f"SELECT id FROM messages WHERE {like} LIMIT 50",
                                          [f"%{w}%" for w in words]).fetchall()

                rows.append(("PostgreSQL", name, *timed(lambda query=query: store.search(query), args.runs),
                             *timed(scan, args.runs)[:2]))
            store.close()
        finally:
            cluster.stop()
    print(f"{'store':<12}{'query':<14}{'search p50 ms':>15}{'max ms':>9}{'results':>9}{'LIKE scan p50 ms':>18}"
          f"{'max ms':>9}")
    for store_name, name, p50, worst, found, scan_p50, scan_worst in rows:
        print(f"{store_name:<12}{name:<14}{p50 * 1000:>15.2f}{worst * 1000:>9.2f}{found:>9}{scan_p50 * 1000:>18.2f}"
              f"{scan_worst * 1000:>9.2f}")


if __name__ == "__main__":
    main()
