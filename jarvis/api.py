"""The OpenAI-compatible API: /v1/chat/completions and /v1/models.

Views parse and validate, then hand over to the relay. Jarvis checks only
what it relies on; everything else in the body reaches the backend unchanged.
A client can never choose where Jarvis connects or with which key.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, jsonify, request

from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from jarvis.logs import trace_id_var
from jarvis.relay import Relay

bp = Blueprint("api", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions():
    """Stream (or return) a chat completion from the configured backend."""
    chat = parse_chat_request()
    relay = Relay(current_app.extensions["jarvis.backend"], chat, current_app.extensions["jarvis.settings"],
                  request.environ)
    relay.open()
    return relay.sse_response() if chat.stream else relay.result_response()


@bp.get("/models")
def models():
    """The models the backend offers, in OpenAI's list format."""
    return jsonify(current_app.extensions["jarvis.backend"].models())


def read_json_object() -> tuple[bytes, dict]:
    """The whole request body, raw and parsed, which must be a JSON object; ApiError (415/400/413) otherwise.

    Every state-changing route reads its body here, before anyone watches the client socket.
    """
    if request.mimetype != "application/json":
        raise ApiError(415, "Send the request body as JSON with the header Content-Type: application/json",
                       "invalid_request_error", "unsupported_media_type")
    raw = request.get_data(cache=False)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON", "invalid_request_error", "invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", "invalid_request_error", "invalid_json")
    return raw, body


def parse_chat_request() -> ChatRequest:
    """Read the whole body and check the fields Jarvis relies on; raise ApiError otherwise."""
    raw, body = read_json_object()
    _check_messages(body.get("messages"), current_app.extensions["jarvis.settings"])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "invalid_request_error", "invalid_type", "stream")
    return ChatRequest(body=body, raw=raw, stream=stream, trace_id=trace_id_var.get())


def _check_messages(messages, settings) -> None:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects",
                       "invalid_request_error", "invalid_messages", "messages")
    if len(messages) > settings.max_messages:
        raise ApiError(400, f"Too many messages: {len(messages)}; at most {settings.max_messages} "
                            "(JARVIS_MAX_MESSAGES)", "invalid_request_error", "too_many_messages", "messages")
    characters = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ApiError(400, f"messages[{index}] must be an object with a string 'role'",
                           "invalid_request_error", "invalid_messages", f"messages[{index}].role")
        content = message.get("content")
        characters += len(content) if isinstance(content, str) else len(json.dumps(content))
    if characters > settings.max_message_chars:
        raise ApiError(400, f"The messages hold {characters} characters; at most {settings.max_message_chars} "
                            "(JARVIS_MAX_MESSAGE_CHARS)", "invalid_request_error", "messages_too_long", "messages")
