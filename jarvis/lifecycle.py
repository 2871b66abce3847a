"""Worker shutdown: end open streams cleanly before gunicorn's graceful_timeout runs out.

gunicorn SIGKILLs a worker whose requests outlive graceful_timeout, and a
killed stream's `finally` never runs: the upstream keeps generating and the
client sees a body cut without [DONE]. So once the worker stops being alive
(SIGTERM, HUP, max_requests), open streams get a little time to finish on
their own, then end with a `server_shutdown` error event and [DONE].

Idle keep-alive connections are closed at once: gunicorn would otherwise keep
the stopping worker alive until each one's keepalive timer ran out.
"""

from __future__ import annotations

import logging
import weakref

import gevent
from flask import Flask, Response, request

from jarvis import streams, usage
from jarvis.endings import Outcome
from jarvis.sockets import shutdown_quietly

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2


def shutdown_delay(graceful_timeout: float) -> float:
    """How long open streams may run on after the worker stops: a few seconds short of the limit."""
    return max(0.0, graceful_timeout - min(3.0, graceful_timeout / 2))


def watch_worker(worker) -> gevent.Greenlet:
    """Start the greenlet that ends open streams when `worker` stops being alive."""
    return gevent.spawn(_watch, worker, shutdown_delay(float(worker.cfg.graceful_timeout)))


class ConnectionTracker:
    """Knows which client connections are between requests (Flask hooks: no per-chunk wrapper)."""

    def __init__(self):
        self.known: weakref.WeakSet = weakref.WeakSet()
        self.busy: weakref.WeakSet = weakref.WeakSet()

    def request_started(self) -> None:
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            self.known.add(sock)
            self.busy.add(sock)

    def request_finished(self, response: Response) -> Response:
        sock = request.environ.get("gunicorn.socket")
        if sock is not None:
            response.call_on_close(lambda: self.busy.discard(sock))  # once the body has been sent
        return response

    def close_idle(self) -> int:
        """Shut down connections with no request in flight; their readers see EOF and end."""
        idle = [sock for sock in list(self.known) if sock not in self.busy]
        for sock in idle:
            shutdown_quietly(sock)
        return len(idle)


tracker = ConnectionTracker()


def track_connections(app: Flask) -> None:
    """Register the hooks that let shutdown close idle keep-alive connections (before any other hook)."""
    app.before_request(tracker.request_started)
    app.after_request(tracker.request_finished)


def _watch(worker, delay: float) -> None:
    while worker.alive:
        gevent.sleep(_POLL_SECONDS)
    _close_idle()
    if streams.open_count():
        log.info("worker stopping: %d open streams may finish within %.1f s", streams.open_count(), delay)
        gevent.sleep(delay)
    ended = streams.interrupt_all(Outcome.SHUTDOWN)
    if ended:
        log.info("worker stopping: ended %d open streams with server_shutdown", ended)
    # Connections whose stream just ended are idle now; close them too.
    gevent.sleep(_POLL_SECONDS)
    _close_idle()
    usage.flush_all()  # the last second's usage counts


def _close_idle() -> None:
    tracker.close_idle()
