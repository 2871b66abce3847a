"""The Jarvis app plus one route that blocks the gevent hub on purpose, to prove the monitor reports it."""

import gevent.monkey
from flask import request

from jarvis import create_app

app = create_app()
_real_sleep = gevent.monkey.get_original("time", "sleep")


@app.post("/test/block-hub")
def block_hub():
    """Sleep without yielding to the hub, as CPU-bound or unpatched code would."""
    seconds = float(request.args.get("seconds", "0.5"))
    _real_sleep(seconds)
    return {"blocked_seconds": seconds}


@app.post("/test/stderr")
def write_to_stderr():
    """Write past logging, as libraries do: plain text on sys.stderr, and a greenlet that dies (gevent
    prints its traceback)."""
    import sys

    import gevent

    sys.stderr.write("a plain line on stderr\nand a second, unfinished")
    sys.stderr.write(" until now\n")
    gevent.spawn(lambda: 1 / 0).join()
    return {"written": True}
