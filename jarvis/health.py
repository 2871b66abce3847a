"""GET /healthz: answers at once from memory; never touches the backend."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from jarvis.relay import open_stream_count

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness and a little state, for load balancers and people."""
    backend = current_app.extensions["jarvis.backend"]
    body = {"status": "ok", "backend": backend.name, "open_streams": open_stream_count()}
    if hasattr(backend, "status"):
        body["model"] = backend.status()
    return jsonify(body)
