"""Prometheus metrics, summed across gunicorn workers (prometheus-client's multiprocess mode).

gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh directory before any
worker starts and marks dead workers' files; without it (tests, a plain Flask
run) the metrics are this process's own. GET /metrics serves them.
"""

from __future__ import annotations

import os

from flask import Blueprint, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

bp = Blueprint("metrics", __name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

ACTIVE_STREAMS = Gauge("jarvis_active_streams", "Streams open right now", multiprocess_mode="livesum")
STREAMS = Counter("jarvis_streams", "Streams ended, by outcome, endpoint and upstream",
                  ["outcome", "endpoint", "upstream"])
TIME_TO_FIRST_TOKEN = Histogram("jarvis_time_to_first_token_seconds", "Request start to first backend event",
                                buckets=_LATENCY_BUCKETS)
STREAM_DURATION = Histogram("jarvis_stream_duration_seconds", "Request start to stream end",
                            buckets=_DURATION_BUCKETS)
CANCEL_LATENCY = Histogram("jarvis_cancel_latency_seconds", "Client gone to backend generation cancelled",
                           buckets=_LATENCY_BUCKETS)
UPSTREAM_ERRORS = Counter("jarvis_upstream_errors", "Backend failures, by kind (one of Jarvis's own error codes; "
                          "an upstream's own code is `upstream_error`, and goes in the log) and upstream",
                          ["kind", "upstream"])
UPSTREAM_UP = Gauge("jarvis_upstream_up", "1 when the upstream's last request got an answer, 0 when it could not "
                    "be reached or failed before answering (from real requests, not its model list)", ["upstream"],
                    multiprocess_mode="livemostrecent")
# What says an upstream is down: it could not be reached, or broke before or while answering.
DOWN_KINDS = frozenset({"upstream_unreachable", "upstream_closed", "upstream_timeout", "upstream_disconnected",
                        "upstream_malformed", "upstream_incomplete"})
HTTP_REQUESTS = Counter("jarvis_http_requests", "Requests answered, by route (its template: never an id) and "
                        "status", ["route", "status"])

# The kinds an upstream error is counted under: Jarvis's own codes for what went wrong with a backend. Any other
# code (an upstream's error event or error body chooses its own) is counted as `upstream_error`: a label value
# never comes from a request or an upstream, so the series stay bounded.
ERROR_KINDS = frozenset({
    "upstream_unreachable", "upstream_closed", "upstream_malformed", "upstream_redirect", "upstream_status",
    "upstream_timeout", "upstream_disconnected", "upstream_incomplete", "upstream_too_large", "upstream_error",
    "internal_error", "stream_inactivity", "stream_max_duration", "context_length_exceeded", "model_error",
    "too_many_tool_steps", "cannot_continue", "answer_too_long", "answer_not_saved", "model_not_found", "unknown"})


def error_kind(code: str | None) -> str:
    """The label an error code is counted under (see ERROR_KINDS)."""
    code = code or "unknown"
    return code if code in ERROR_KINDS else "upstream_error"


def count_request(rule: str | None, status: int) -> None:
    """One request answered: its route's template (`unmatched` when no route took it) and its status."""
    HTTP_REQUESTS.labels(rule or "unmatched", str(status) if 100 <= status < 600 else "other").inc()
TOKENS = Counter("jarvis_tokens", "Tokens used, by direction: prompt (read) or completion (written); the "
                 "upstream's count when it sends one, else events with text", ["direction"])
MODEL_QUEUE_DEPTH = Gauge("jarvis_model_queue_depth", "Requests waiting for the embedded model",
                          multiprocess_mode="livesum")
MODEL_SLOTS_BUSY = Gauge("jarvis_model_slots_busy", "Slots of the embedded model holding an answer (each "
                         "slot is one sequence of its batch)", multiprocess_mode="livesum")
MODEL_QUEUE_WAIT = Histogram("jarvis_model_queue_wait_seconds", "Time a request waited for the embedded model",
                             buckets=_DURATION_BUCKETS)


@bp.get("/metrics")
def metrics():
    """Prometheus text format."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
