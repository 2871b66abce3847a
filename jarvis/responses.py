"""The streaming response: SSE bytes handed to gunicorn as they are made, with the headers that keep
every proxy and client from buffering them."""

from __future__ import annotations

from flask import Response


class _SSEResponse(Response):
    """A Response whose body goes to the server as the generator itself: no werkzeug wrappers
    (ClosingIterator, iter_encoded) in front of every chunk. The generator yields bytes only."""

    def get_app_iter(self, environ: dict):
        if environ["REQUEST_METHOD"] == "HEAD":
            return super().get_app_iter(environ)
        return _Body(self)


class _Body:
    """Iterates as the generator; close() is the response's (the generator's close, then every
    call_on_close callback), which the server calls when it is done, started or not."""

    __slots__ = ("response",)

    def __init__(self, response: Response):
        self.response = response

    def __iter__(self):
        return iter(self.response.response)

    def close(self) -> None:
        self.response.close()


def sse_response(events) -> Response:
    """A streaming response for SSE bytes: the headers that keep every proxy and client from buffering."""
    response = _SSEResponse(events, status=200, content_type="text/event-stream; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.implicit_sequence_conversion = False  # middleware calling get_data() must fail loudly
    return response
