"""What an operator asks when a user says "it hangs" or "it appears all at once".

    GET /debug/streams        every open stream on this node (all workers): JSON, or a table for a browser
    GET /debug/stream-check   ten small events, 200 ms apart, through the same relay and headers as an answer:
                              whoever reads them (the page's "Check streaming", `python -m jarvis.doctor`)
                              sees whether something in between holds them back

Both need the key when one is set (jarvis.security), and neither touches an upstream.
"""

from __future__ import annotations

import json
import time

import gevent
from flask import Blueprint, jsonify, make_response, render_template, request

from jarvis import state, streams
from jarvis.backends import ChatRequest
from jarvis.logs import trace_id_var
from jarvis.page import _CSP as PAGE_CSP
from jarvis.relay import Relay

bp = Blueprint("debug", __name__, url_prefix="/debug")

CHECK_EVENTS = 10
CHECK_INTERVAL = 0.2


@bp.get("/streams")
def open_streams():
    """Every open stream in every worker of this node, oldest first."""
    listed = sorted(streams.node_streams(streams.OPEN), key=lambda stream: -stream["age_s"])
    # A browser's Accept lists text/html first and */* below it: HTML for it; JSON for curl (*/* alone), an API
    # client, or none at all.
    chosen = request.args.get("format")
    if chosen is None:
        chosen = "html" if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html" \
            else "json"
    if chosen == "html":
        response = make_response(render_template("streams.html", streams=listed))
        response.headers["Content-Security-Policy"] = PAGE_CSP
        return response
    return jsonify(data=listed, count=len(listed))


@bp.get("/stream-check")
def stream_check():
    """The streaming doctor's events: `{"check": i, "of": 10, "sent_ms": ...}` every 200 ms, then [DONE]."""
    check = ChatRequest(body={"model": "stream-check"}, raw=b"", stream=True, trace_id=trace_id_var.get(),
                        endpoint="debug/stream-check")
    relay = Relay(_CheckBackend(), check, state.settings(), request.environ)
    relay.open()
    return relay.sse_response()


class _CheckBackend:
    name = "stream-check"

    def models(self) -> dict:
        return {"object": "list", "data": []}

    def status(self) -> None:
        return None

    def open(self, request: ChatRequest):
        return _CheckEvents()


class _CheckEvents:
    interruptible = False
    upstream = None
    finished = False

    def batches(self):
        started = time.monotonic()
        for index in range(CHECK_EVENTS):
            if index:
                gevent.sleep(max(0.0, started + index * CHECK_INTERVAL - time.monotonic()))
            sent_ms = round((time.monotonic() - started) * 1000, 1)
            yield [json.dumps({"object": "jarvis.stream_check", "check": index, "of": CHECK_EVENTS,
                               "sent_ms": sent_ms}).encode()]

    def result(self):
        raise NotImplementedError("the stream check is streamed only")

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def verdict(arrivals_ms: list[float]) -> tuple[bool, str]:
    """Whether events sent 200 ms apart arrived so (True) or bunched, and the sentence to show."""
    gaps = [round(later - earlier) for earlier, later in zip(arrivals_ms, arrivals_ms[1:], strict=False)]
    if len(arrivals_ms) < CHECK_EVENTS:
        return False, f"only {len(arrivals_ms)} of {CHECK_EVENTS} events arrived: the stream was cut"
    spread = sorted(gaps)[len(gaps) // 2] >= CHECK_INTERVAL * 1000 * 0.5
    shown = ", ".join(f"{gap}" for gap in gaps)
    if spread:
        return True, f"events arrived as sent (gaps {shown} ms; sent every {CHECK_INTERVAL * 1000:.0f} ms)"
    return False, (f"events arrived bunched (gaps {shown} ms; sent every {CHECK_INTERVAL * 1000:.0f} ms): something "
                   "between Jarvis and this client buffers the stream (gzip on text/event-stream? nginx "
                   "proxy_buffering? a corporate proxy or CDN?)")
