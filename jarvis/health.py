"""GET /healthz: answers at once from memory; never touches the backend."""

from __future__ import annotations

import gc
import os

import gevent
from flask import Blueprint, jsonify, request

from jarvis import state
from jarvis.streams import open_count

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness and a little state, for load balancers and people."""
    backend = state.backend()
    body = {"status": "ok", "backend": backend.name, "open_streams": open_count(), "worker": os.getpid()}
    status = backend.status()
    if status is not None and "upstreams" in status:
        body.update(status)  # several upstreams: each one's state, as this worker last saw it
    elif status is not None:
        body["model"] = status
    store_status = state.store().status()  # PostgreSQL: from memory, no query; SQLite: None
    if store_status is not None:
        body["store"] = store_status
    if request.args.get("debug"):  # collects and walks the heap: milliseconds, for benchmarks and debugging
        gc.collect()
        # Spawned greenlets still alive; the threadpools' per-thread greenlets are not counted.
        body["greenlets"] = sum(1 for thing in gc.get_objects()
                                if isinstance(thing, gevent.Greenlet) and not thing.dead)
    return jsonify(body)
