"""How long the gevent hub went without running a timer: a repeating libev timer on the hub, its gaps noted.
A hub blocked by something (a decoder, a client on the wrong thread) shows as one long gap."""

from __future__ import annotations

import time
from contextlib import contextmanager

import gevent


@contextmanager
def hub_gaps(every: float = 0.005):
    """`with hub_gaps() as gaps:` — the seconds between the timer's ticks while the block ran."""
    gaps: list[float] = []
    last = [time.monotonic()]

    def tick():
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now

    timer = gevent.get_hub().loop.timer(every, every)
    timer.start(tick)
    try:
        yield gaps
    finally:
        timer.stop()
        timer.close()
