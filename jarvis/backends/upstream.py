"""The upstream backend: an OpenAI-compatible server (Ollama, llama.cpp, vLLM, OpenAI) over HTTP.

Only the configured base URL is ever contacted, redirects are not followed,
and the key goes to that host alone. Bodies are read with `raw.read1`, which
returns whatever has arrived under chunked and close-delimited framing alike;
`iter_lines` would hold a close-delimited answer until the upstream hangs up.
Closing the response is how a generation is cancelled: the upstream sees its
socket close and stops generating.
"""

from __future__ import annotations

import http.client
import json
import logging

import gevent
import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from jarvis.backends import ChatRequest
from jarvis.errors import ApiError, StreamError, UpstreamErrorEvent, error_object
from jarvis.logs import trace_id_var, upstream_request_id
from jarvis.settings import Settings
from jarvis.sockets import shutdown_quietly
from jarvis.sse import DONE, MalformedStream, SSEDecoder, event_name
from jarvis.upstreams import UpstreamConfig

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_ERROR_BODY_LIMIT = 65536
_DRAIN_SECONDS = 1.0
_READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


class UpstreamBackend:
    """One OpenAI-compatible server: its own base URL, key and connection pool."""

    def __init__(self, settings: Settings, upstream: UpstreamConfig):
        self.name = upstream.name
        self.base_url = upstream.url
        self.model = settings.model
        self.models_timeout = (settings.upstream_connect_seconds, settings.stream_inactivity_seconds)
        self.models_seconds = settings.upstream_models_seconds
        self.body_limit = settings.upstream_body_max_bytes
        # No read timeout on completions: the relay enforces inactivity and duration by cancelling
        # the read, and a timeout here would cost a timer on every socket read of every chunk.
        self.chat_timeout = (settings.upstream_connect_seconds, None)
        self.session = _new_session(upstream.api_key)  # the key goes to this upstream's host only

    def models(self) -> dict:
        """The upstream's model list, unchanged; within JARVIS_UPSTREAM_MODELS_SECONDS and
        JARVIS_UPSTREAM_BODY_MAX_BYTES, however slowly or hugely the upstream answers."""
        request_id = upstream_request_id(trace_id_var.get())
        try:
            with gevent.Timeout(self.models_seconds):
                response = self._send("GET", "/models", None, request_id, self.models_timeout, stream=True)
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

    def open(self, request: ChatRequest) -> UpstreamGeneration:
        """POST the request to its endpoint; return once the upstream has answered with a success status."""
        body = request.raw
        if "model" not in request.body and self.model:
            body = json.dumps({**request.body, "model": self.model}).encode()
        response = self._send("POST", "/" + request.endpoint, body, request.upstream_request_id, self.chat_timeout,
                              stream=True)
        if request.stream:
            _check_content(response, "text/event-stream", "an event stream")
        else:
            _check_content(response, "application/json", "a JSON answer")
        return UpstreamGeneration(response, self.body_limit, whole_events=request.endpoint == "responses")

    def _send(self, method, path, body, request_id, timeout, stream) -> requests.Response:
        headers = {"X-Request-Id": request_id}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self.session.request(method, self.base_url + path, data=body, headers=headers,
                                            timeout=timeout, stream=stream, allow_redirects=False)
        except requests.exceptions.ConnectTimeout:
            raise ApiError(502, f"The upstream at {self.base_url} did not accept a connection in time",
                           type_="upstream_error", code="upstream_unreachable")
        except requests.exceptions.ReadTimeout:
            raise ApiError(504, "The upstream did not answer in time", type_="upstream_error", code="upstream_timeout")
        except requests.exceptions.ConnectionError as error:
            if _closed_before_answering(error):
                raise ApiError(502, f"The upstream at {self.base_url} accepted the request, then closed the "
                                    "connection before answering", type_="upstream_error", code="upstream_closed")
            raise ApiError(502, f"The upstream at {self.base_url} is unreachable ({type(error).__name__})",
                           type_="upstream_error", code="upstream_unreachable")
        except _READ_ERRORS as error:
            raise ApiError(502, f"The upstream at {self.base_url} is unreachable ({type(error).__name__})",
                           type_="upstream_error", code="upstream_unreachable")
        if response.status_code >= 300:
            raise _status_error(response)
        return response


def _closed_before_answering(error: Exception) -> bool:
    """Whether the connection was made and the upstream hung up without a status line."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, http.client.RemoteDisconnected):
            return True
        error = next((arg for arg in getattr(error, "args", ()) if isinstance(arg, BaseException)),
                     error.__cause__ or error.__context__)
    return False


def _check_content(response: requests.Response, expected: str, what: str) -> None:
    """A 2xx answer must be what was asked for, uncompressed: else 502 before any byte goes out."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    content_type = response.headers.get("Content-Type")
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


def read_capped(response: requests.Response, limit: int, what: str) -> bytes:
    """A whole upstream body, refused (502) past `limit` bytes (JARVIS_UPSTREAM_BODY_MAX_BYTES)."""
    try:
        body = response.raw.read(limit + 1)
    except _READ_ERRORS as error:
        raise ApiError(502, f"The upstream connection broke ({type(error).__name__})", type_="upstream_error",
                       code="upstream_disconnected")
    finally:
        response.close()
    if len(body) > limit:
        raise ApiError(502, f"The upstream's {what} answer is larger than {limit} bytes "
                            "(JARVIS_UPSTREAM_BODY_MAX_BYTES)", type_="upstream_error", code="upstream_too_large")
    return body


def _new_session(api_key: str | None) -> requests.Session:
    session = requests.Session()
    # No proxies or .netrc credentials from the environment: Jarvis talks to its upstream only.
    session.trust_env = False
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=2048, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "jarvis"})
    if api_key:
        session.headers["Authorization"] = f"Bearer {api_key}"
    return session


def _status_error(response: requests.Response) -> ApiError:
    """Keep the upstream's status and, when it is OpenAI-shaped, its error body."""
    status = response.status_code
    try:
        text = response.raw.read(_ERROR_BODY_LIMIT)
    except _READ_ERRORS:
        text = b""
    finally:
        response.close()
    if 300 <= status < 400:
        return ApiError(502, f"The upstream answered with a redirect ({status}); Jarvis does not follow "
                             "redirects: set JARVIS_UPSTREAM_URL to the final URL",
                        type_="upstream_error", code="upstream_redirect")
    try:
        body = json.loads(text)
    except ValueError:
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

    def __init__(self, response: requests.Response, body_limit: int, *, whole_events: bool = False):
        self.response = response
        self.body_limit = body_limit
        self.whole_events = whole_events  # the Responses API: whole named events, ending with a terminal one
        self.finished = False
        self.malformed = 0

    def batches(self):
        """The data payloads (or whole events) of each read, until the end; StreamError on any other end."""
        decoder = SSEDecoder(whole_events=self.whole_events)
        read1 = self.response.raw.read1
        while True:
            try:
                chunk = read1(_READ_SIZE)
            except _READ_ERRORS as error:
                raise StreamError("upstream_disconnected",
                                  f"The upstream connection broke mid-stream ({type(error).__name__})",
                                  "upstream_error")
            if len(chunk) == _READ_SIZE:
                gevent.sleep(0)  # the upstream sends faster than we read: let every other greenlet run
            try:
                payloads = decoder.feed(chunk) if chunk else decoder.finish()
            except MalformedStream as error:
                raise StreamError("upstream_malformed", str(error), "upstream_error")
            batch = self._checked_events(payloads) if self.whole_events else self._checked(payloads)
            if self.finished:
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
                if not self._checked_event(payload):
                    self.malformed += 1
                    continue
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
        """The whole body of a non-streaming answer (at most JARVIS_UPSTREAM_BODY_MAX_BYTES)."""
        body = read_capped(self.response, self.body_limit, "answer")
        if not body.isascii():
            body = _valid_utf8(body)
        self.finished = True
        return self.response.status_code, body

    def abort(self) -> None:
        """From any greenlet: tell the upstream at once that nobody is listening (FIN on its socket)."""
        sock = getattr(getattr(self.response.raw, "_connection", None), "sock", None)
        if sock is not None and not self.finished:
            shutdown_quietly(sock)

    def close(self) -> None:
        """After [DONE], drain to the end so the connection can be reused; otherwise close it."""
        if self.malformed:
            log.warning("skipped %d upstream events that were not JSON objects", self.malformed)
        if self.finished:
            try:
                with gevent.Timeout(_DRAIN_SECONDS):
                    self.response.raw.drain_conn()
            except (gevent.Timeout, *_READ_ERRORS):
                pass
        self.response.close()
