"""The upstream backend: an OpenAI-compatible server (Ollama, llama.cpp, vLLM, OpenAI) over HTTP.

Only the configured base URL is ever contacted, redirects are not followed,
and the key goes to that host alone. The transport is `jarvis.http1`: gevent
sockets and the llhttp parser, so a relayed chunk costs one `recv` and one C
parse. Closing the response is how a generation is cancelled: the upstream
sees its socket close and stops generating.
"""

from __future__ import annotations

import json
import logging
import time

import gevent

from jarvis import http1
from jarvis.backends import INTERRUPTED, ChatRequest, Interrupted
from jarvis.errors import ApiError, StreamError, UpstreamErrorEvent, error_object
from jarvis.logs import trace_id_var, upstream_request_id
from jarvis.settings import Settings
from jarvis.sse import DONE, MalformedStream, SSEDecoder, event_name
from jarvis.upstreams import UpstreamConfig

log = logging.getLogger(__name__)

_ERROR_BODY_LIMIT = 65536
CONTEXT_SECONDS = 300.0  # how long an upstream's context window is remembered
_DRAIN_SECONDS = 1.0


class UpstreamBackend:
    """One OpenAI-compatible server: its own base URL, key and connection pool."""

    def __init__(self, settings: Settings, upstream: UpstreamConfig):
        self.name = upstream.name
        self.base_url = upstream.url
        self.model = settings.model
        self.models_seconds = settings.upstream_models_seconds
        self.body_limit = settings.upstream_body_max_bytes
        self.body_seconds = settings.stream_inactivity_seconds
        # No read timeout on completions: the relay enforces inactivity and duration by cancelling
        # the read, and a timeout here would cost a timer on every socket read of every chunk.
        headers = {"User-Agent": "jarvis", "Accept": "*/*", "Accept-Encoding": "identity"}
        if upstream.api_key:
            headers["Authorization"] = f"Bearer {upstream.api_key}"  # to this upstream's host only
        self.client = http1.Client(upstream.url, settings.upstream_connect_seconds, headers,
                                   ca_file=settings.upstream_ca_file)
        self.ca_file = settings.upstream_ca_file
        self.window: tuple[int | None, float] | None = None  # the context window it told, and when

    def models(self) -> dict:
        """The upstream's model list, unchanged; within JARVIS_UPSTREAM_MODELS_SECONDS and
        JARVIS_UPSTREAM_BODY_MAX_BYTES, however slowly or hugely the upstream answers."""
        request_id = upstream_request_id(trace_id_var.get())
        try:
            with gevent.Timeout(self.models_seconds):
                response = self._send("GET", "/models", None, request_id)
                _check_content(response, "application/json", "a JSON model list")
                body = read_capped(response, self.body_limit, "/models")
        except gevent.Timeout:
            raise ApiError(504, f"The upstream's /models answer took longer than {self.models_seconds:g} s "
                                "(JARVIS_UPSTREAM_MODELS_SECONDS)", type_="upstream_error", code="upstream_timeout")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ApiError(502, "The upstream's /models answer is not JSON", type_="upstream_error",
                           code="upstream_malformed")

    def status(self) -> None:
        return None  # /healthz never touches the upstream

    def context_window(self, model: str | None) -> int | None:
        """llama.cpp's context (`/props`: default_generation_settings.n_ctx, beside its /v1), asked once and
        remembered for CONTEXT_SECONDS; None from any server that does not say (within 2 s)."""
        now = time.monotonic()
        if self.window is not None and now - self.window[1] < CONTEXT_SECONDS:
            return self.window[0]
        tokens = None
        origin = self.base_url.rstrip("/").removesuffix("/v1")
        client = http1.Client(origin, 2.0, {"Accept": "application/json"}, ca_file=self.ca_file)
        try:
            with gevent.Timeout(2.0):
                response = client.request("GET", "/props", None, {})
                body = read_capped(response, 1024 * 1024, "/props") if response.status == 200 else b""
                response.close()
            settings = json.loads(body).get("default_generation_settings") if body else None
            value = settings.get("n_ctx") if isinstance(settings, dict) else None
            tokens = value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
        except (gevent.Timeout, http1.UpstreamHTTPError, ApiError, ValueError, AttributeError, OSError):
            tokens = None
        finally:
            client.close()  # (its kept-alive connection: asked once every CONTEXT_SECONDS at most)
        self.window = (tokens, now)
        return tokens

    def open(self, request: ChatRequest) -> UpstreamGeneration:
        """POST the request to its endpoint; return once the upstream has answered with a success status."""
        body = request.raw
        if "model" not in request.body and self.model:
            body = json.dumps({**request.body, "model": self.model}).encode()
        response = self._send("POST", "/" + request.endpoint, body, request.upstream_request_id)
        if request.stream:
            _check_content(response, "text/event-stream", "an event stream")
        else:
            _check_content(response, "application/json", "a JSON answer")
        return UpstreamGeneration(response, self.body_limit, whole_events=request.endpoint == "responses",
                                  body_seconds=self.body_seconds)

    def _send(self, method, path, body, request_id) -> http1.Response:
        headers = {"X-Request-Id": request_id}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self.client.request(method, path, body, headers)
        except http1.UpstreamHTTPError as error:
            raise _transport_error(error, self.base_url)
        if response.status >= 300:
            raise _status_error(response)
        return response


def _transport_error(error: http1.UpstreamHTTPError, base_url: str) -> ApiError:
    if error.kind == "connect_timeout":
        return ApiError(502, f"The upstream at {base_url} did not accept a connection in time",
                        type_="upstream_error", code="upstream_unreachable")
    if error.kind == "closed":
        return ApiError(502, f"The upstream at {base_url} accepted the request, then closed the "
                             "connection before answering", type_="upstream_error", code="upstream_closed")
    if error.kind == "malformed":
        return ApiError(502, f"The upstream at {base_url} answered with broken HTTP: {error}",
                        type_="upstream_error", code="upstream_malformed")
    return ApiError(502, f"The upstream at {base_url} is unreachable: {error}",
                    type_="upstream_error", code="upstream_unreachable")


def _check_content(response: http1.Response, expected: str, what: str) -> None:
    """A 2xx answer must be what was asked for, uncompressed: else 502 before any byte goes out."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    content_type = response.headers.get("content-type")
    problem = None
    if encoding not in ("", "identity"):
        problem = f"is compressed ({encoding}) although Jarvis asked for it uncompressed"
    elif content_type is not None and not content_type.strip().lower().startswith(expected):
        problem = f"is {content_type.split(';')[0].strip()[:60]!r}, not {what}"
    if problem:
        response.close()
        raise ApiError(502, f"The upstream's answer {problem}: is JARVIS_UPSTREAM_URL an OpenAI-compatible API "
                            "(including /v1), with nothing in between that rewrites it?", type_="upstream_error",
                       code="upstream_malformed")


def read_capped(response: http1.Response, limit: int, what: str) -> bytes:
    """A whole upstream body, refused (502) past `limit` bytes (JARVIS_UPSTREAM_BODY_MAX_BYTES)."""
    try:
        body = response.read(limit)
    except http1.UpstreamHTTPError as error:
        raise ApiError(502, f"The upstream connection broke ({error})", type_="upstream_error",
                       code="upstream_disconnected")
    finally:
        response.close()
    if len(body) > limit:
        raise ApiError(502, f"The upstream's {what} answer is larger than {limit} bytes "
                            "(JARVIS_UPSTREAM_BODY_MAX_BYTES)", type_="upstream_error", code="upstream_too_large")
    return body


def _status_error(response: http1.Response) -> ApiError:
    """Keep the upstream's status and, when it is OpenAI-shaped, its error body."""
    status = response.status
    try:
        text = response.read(_ERROR_BODY_LIMIT)[:_ERROR_BODY_LIMIT]
    except http1.UpstreamHTTPError:
        text = b""
    finally:
        response.close()
    if 300 <= status < 400:
        return ApiError(502, f"The upstream answered with a redirect ({status}); Jarvis does not follow "
                             "redirects: set JARVIS_UPSTREAM_URL to the final URL",
                        type_="upstream_error", code="upstream_redirect")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return ApiError(status, "upstream error", body=body)
    detail = body["error"] if isinstance(body, dict) and isinstance(body.get("error"), str) else \
        text.decode("utf-8", "replace").strip()[:500]
    message = f"The upstream answered {status}: {detail}" if detail else f"The upstream answered {status}"
    type_ = "invalid_request_error" if status < 500 else "upstream_error"
    return ApiError(status, message, type_=type_, code="upstream_status")


# The events that end a Responses-API stream.
_TERMINAL_EVENTS = {b"response.completed", b"response.failed", b"response.incomplete", b"error"}

# An event with more brackets than this is parsed once, to be sure no client chokes on its nesting.
_NESTING_CHECK = 1000


def _valid_utf8(data: bytes) -> bytes:
    """The bytes as they are when they are UTF-8; else with each bad byte replaced (U+FFFD)."""
    try:
        data.decode("utf-8")
        return data
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace").encode("utf-8")


class UpstreamGeneration:
    """One open upstream response."""

    def __init__(self, response: http1.Response, body_limit: int, *, whole_events: bool = False,
                 body_seconds: float = 120.0):
        self.response = response
        self.body_limit = body_limit
        self.body_seconds = body_seconds  # a non-streamed body, from its head to its last byte
        self.whole_events = whole_events  # the Responses API: whole named events, ending with a terminal one
        self.finished = False
        self.malformed = 0
        self.error: UpstreamErrorEvent | None = None  # an error event, raised after the events before it

    interruptible = True  # its only waits are read1()'s and the sleep below
    upstream = None  # one upstream: its name is the backend's

    def batches(self):
        """The data payloads (or whole events) of each read, until the end; StreamError on any other end."""
        decoder = SSEDecoder(whole_events=self.whole_events)
        response = self.response
        read1 = response.read1
        while True:
            try:
                chunk = read1()
            except Interrupted:  # between two reads: nothing was consumed
                yield INTERRUPTED
                continue
            except http1.UpstreamHTTPError as error:
                code = "upstream_malformed" if error.kind == "malformed" else "upstream_disconnected"
                raise StreamError(code, f"The upstream connection broke mid-stream ({error})", "upstream_error")
            if response.full_read:
                try:
                    gevent.sleep(0)  # the upstream sends faster than we read: let every other greenlet run
                except Interrupted:
                    pass  # data is flowing: no heartbeat is due, and a stop has shut the connection down
            try:
                payloads = decoder.feed(chunk) if chunk else decoder.finish()
            except MalformedStream as error:
                raise StreamError("upstream_malformed", str(error), "upstream_error")
            batch = self._checked_events(payloads) if self.whole_events else self._checked(payloads)
            if self.error is not None:  # the events before it in this read go out first
                if batch:
                    yield batch
                raise self.error
            if self.finished:
                if batch:
                    yield batch
                return
            if not chunk:
                if batch:
                    yield batch
                end = "its final event (response.completed)" if self.whole_events else "[DONE]"
                raise StreamError("upstream_incomplete", f"The upstream ended the stream without {end}; "
                                  "the answer may be cut short", "upstream_error")
            if batch:
                yield batch

    def _checked(self, payloads: list[bytes]) -> list[bytes]:
        """Keep JSON object payloads up to [DONE]; raise on an upstream error event.

        This is the per-chunk hot path, so a payload is fully parsed only when it could be an
        error: inside a JSON string a quote is always escaped, so the bytes `"error"` appear
        only where "error" is a key or a whole value.
        """
        batch = []
        for payload in payloads:
            if payload == DONE:
                self.finished = True
                break
            if not (payload[:1] == b"{" and payload.rstrip()[-1:] == b"}"):
                self.malformed += 1
                continue
            if not payload.isascii():
                payload = _valid_utf8(payload)
            if b'"error"' in payload or payload.count(b"[") + payload.count(b"{") > _NESTING_CHECK:
                try:
                    if not self._checked_event(payload):
                        self.malformed += 1
                        continue
                except UpstreamErrorEvent as error:
                    self.error = error
                    break
            batch.append(payload)
        return batch

    def _checked_events(self, blocks: list[bytes]) -> list[bytes]:
        """Whole Responses-API events, relayed as they are (their errors included) up to the terminal one."""
        batch = []
        for block in blocks:
            if not block.isascii():
                block = _valid_utf8(block)
            batch.append(block)
            if event_name(block) in _TERMINAL_EVENTS or block.endswith(b"data: [DONE]"):
                self.finished = True
                break
        return batch

    def _checked_event(self, payload: bytes) -> bool:
        """Raise the upstream's error event; False for an event no client could parse (nested too deep)."""
        try:
            event = json.loads(payload)
        except RecursionError:
            return False
        except ValueError:
            return True
        if not isinstance(event, dict):
            return True
        if "error" in event:
            error = event["error"]
            raise UpstreamErrorEvent(error if isinstance(error, dict) else
                                     error_object(str(error), "upstream_error", "upstream_error"))
        if event.get("object") == "error":  # vLLM's flat form
            raise UpstreamErrorEvent(error_object(str(event.get("message") or "upstream error"),
                                                  str(event.get("type") or "upstream_error"), "upstream_error"))
        return True

    def result(self) -> tuple[int, bytes]:
        """The whole body of a non-streaming answer (at most JARVIS_UPSTREAM_BODY_MAX_BYTES), within
        JARVIS_STREAM_INACTIVITY_SECONDS of its head: every real server sends a whole answer at once, so a
        body that drips in a byte at a time is not progress (else it would end only at the stream's maximum)."""
        too_slow = ApiError(504, f"The upstream's answer did not arrive whole within {self.body_seconds:g} s of its "
                                 "head (JARVIS_STREAM_INACTIVITY_SECONDS)", type_="upstream_error",
                            code="upstream_timeout")
        with gevent.Timeout(self.body_seconds, too_slow):
            body = read_capped(self.response, self.body_limit, "answer")
        if not body.isascii():
            body = _valid_utf8(body)
        self.finished = True
        return self.response.status, body

    def abort(self) -> None:
        """From any greenlet: tell the upstream at once that nobody is listening (FIN on its socket)."""
        if not self.finished:
            self.response.abort()

    def close(self) -> None:
        """After [DONE], drain to the end so the connection can be reused; otherwise close it."""
        if self.malformed:
            log.warning("skipped %d upstream events that were not JSON objects", self.malformed)
        if self.finished and not self.response.closed:
            try:
                with gevent.Timeout(_DRAIN_SECONDS):
                    while self.response.read1():  # the last chunk's terminator, usually
                        pass
            except (gevent.Timeout, http1.UpstreamHTTPError):
                pass
        self.response.close()
