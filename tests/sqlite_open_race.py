"""Worker processes opening one new SQLite database at the same moment, as gunicorn's workers do at a first
start: `python -m tests.sqlite_open_race TRIALS PROCESSES` prints how many trials had a process that could not
open it. Forked (cheap), each after a random 0-2 ms, which is when SQLite answered one of them "database is
locked" at once (its journal_mode=WAL racing another's), 4 trials in 60 of 6 processes before the retry."""

from __future__ import annotations

import multiprocessing
import random
import shutil
import sys
import tempfile
import time

from jarvis.stores.sqlite import SQLiteStore


def open_it(folder: str, barrier, results) -> None:
    barrier.wait()
    time.sleep(random.random() * 0.002)
    try:
        SQLiteStore(folder, 10.0).close()
        results.put(None)
    except Exception as error:  # what the worker would have died of
        results.put(repr(error)[:200])


def main() -> int:
    trials, processes = int(sys.argv[1]), int(sys.argv[2])
    context = multiprocessing.get_context("fork")
    failed = []
    for _ in range(trials):
        folder, barrier, results = tempfile.mkdtemp(), context.Barrier(processes), context.Queue()
        children = [context.Process(target=open_it, args=(folder, barrier, results)) for _ in range(processes)]
        for child in children:
            child.start()
        for child in children:
            child.join(30)
        errors = [error for error in (results.get(timeout=5) for _ in children) if error]
        shutil.rmtree(folder)
        if errors:
            failed.append(errors[0])
    print(f"{len(failed)} of {trials} trials failed", *failed[:3], sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
