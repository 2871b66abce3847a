"""The OpenAI-compatible API: /v1/chat/completions and /v1/models.

Views parse and validate, then hand over to the relay. Jarvis checks only
what it relies on; everything else in the body reaches the backend unchanged.
A client can never choose where Jarvis connects or with which key.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from jarvis import state
from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from jarvis.inputs import check_messages, read_json_object
from jarvis.logs import trace_id_var
from jarvis.relay import Relay

bp = Blueprint("api", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions():
    """Stream (or return) a chat completion from the configured backend."""
    chat = parse_chat_request()
    relay = Relay(state.backend(), chat, state.settings(), request.environ)
    relay.open()
    return relay.sse_response() if chat.stream else relay.result_response()


@bp.get("/models")
def models():
    """The models the backend offers, in OpenAI's list format."""
    return jsonify(state.backend().models())


def parse_chat_request() -> ChatRequest:
    """Read the whole body and check the fields Jarvis relies on; raise ApiError otherwise."""
    raw, body = read_json_object()
    check_messages(body.get("messages"), state.settings())
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", code="invalid_type", param="stream")
    return ChatRequest(body=body, raw=raw, stream=stream, trace_id=trace_id_var.get())
