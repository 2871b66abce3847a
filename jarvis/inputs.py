"""What clients send: reading and checking request bodies, for every route.

A leaf module: views and hooks import it; it imports no blueprint. Every error is
an ApiError with OpenAI's error JSON (415, 400 or 413 before any body byte is
answered); messages say how to fix the request.
"""

from __future__ import annotations

import json

import gevent
from flask import request

from jarvis import state
from jarvis.cooperative import TooLong
from jarvis.errors import ApiError
from jarvis.settings import Settings
from jarvis.sockets import stop_reading
from jarvis.worker import awaiting_body, jittered

BODY_READ = "jarvis.body_read"  # set in the WSGI environ once a request's whole body has been read


def close_if_body_unread(response):
    """After an error answered before a declared body was read, close the connection: else gunicorn
    would read and throw away that body, however slowly it comes, before the next request."""
    declared = request.content_length or request.headers.get("Transfer-Encoding")
    if response.status_code >= 400 and declared and not request.environ.get(BODY_READ):
        stop_reading(request.environ)
        response.headers["Connection"] = "close"  # so the client opens a new one (jarvis.worker._Response)
    return response


def read_json_object(*, limit: int | None = None, any_json: bool = False, decode=json.loads) -> tuple[bytes, dict]:
    """The whole request body, raw and parsed, which must be a JSON object: at most `limit` bytes (else
    JARVIS_MAX_BODY_BYTES), arriving within JARVIS_BODY_SECONDS plus a second per
    JARVIS_BODY_MIN_BYTES_PER_SECOND bytes — a body sent a byte at a time holds a connection no longer.

    Every state-changing route reads its body here, before anyone watches the client socket.
    """
    if request.mimetype != "application/json":
        raise ApiError(415, "Send the request body as JSON with the header Content-Type: application/json",
                       code="unsupported_media_type")
    settings = state.settings()
    if limit is not None and (request.content_length or 0) > limit:
        raise ApiError(413, f"This request's body may be at most {limit} bytes", code="request_too_large")
    deadline = settings.body_seconds + (request.content_length or 0) / settings.body_min_bytes_per_second
    raw = None
    with awaiting_body(request.environ) as was_shed, gevent.Timeout(jittered(deadline), False):
        raw = request.stream.read(limit + 1) if limit is not None else request.get_data(cache=False)
    if was_shed():
        stop_reading(request.environ)
        raise ApiError(503, "The server is near its connection limit and closed this connection while its body "
                            "was still arriving; send it again", code="server_busy", headers={"Retry-After": "1"})
    if raw is None:
        stop_reading(request.environ)
        raise ApiError(408, f"The request body did not arrive within {deadline:.0f} s (JARVIS_BODY_SECONDS and "
                            "JARVIS_BODY_MIN_BYTES_PER_SECOND); send it again", code="request_timeout")
    if limit is not None and len(raw) > limit:
        raise ApiError(413, f"This request's body may be at most {limit} bytes", code="request_too_large")
    request.environ[BODY_READ] = True
    try:
        body = decode(raw)
    except TooLong:
        raise  # the caller's limit, not a malformed body
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict) and not any_json:
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return raw, body


def text_field(body: dict, name: str, *, required: bool = True) -> str | None:
    """A non-empty string field of a JSON body (None when optional and absent)."""
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"'{name}' must be a non-empty string", param=name, code="invalid_value")
    return value


def check_messages(messages, settings: Settings) -> None:
    """A chat request's messages: a non-empty list of objects with a string role, within the limits."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       code="invalid_messages", param="messages")
    if len(messages) > settings.max_messages:
        raise ApiError(400, f"Too many messages: {len(messages)}; at most {settings.max_messages} "
                            "(JARVIS_MAX_MESSAGES)", code="too_many_messages", param="messages")
    characters = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{index}] must be an object with a string 'role'",
                           code="invalid_messages", param=f"messages[{index}].role")
        content = message.get("content")
        characters += len(content) if isinstance(content, str) else len(json.dumps(content))
    if characters > settings.max_message_chars:
        raise ApiError(400, f"The messages hold {characters} characters; at most {settings.max_message_chars} "
                            "(JARVIS_MAX_MESSAGE_CHARS)", code="messages_too_long", param="messages")
