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
