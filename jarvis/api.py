"""The OpenAI-compatible API: chat completions, completions, embeddings, responses, and the model list.

Views parse and validate, then hand over to the relay (the same one for every endpoint: heartbeats,
cancel when the client leaves, timeouts, in-band errors). Jarvis checks only what it relies on;
everything else in the body reaches the upstream unchanged. A client can never choose where Jarvis
connects or with which key. /v1/responses is passed through as the upstream speaks it, never
translated.
"""

from __future__ import annotations

import json

from flask import Blueprint, g, jsonify, request

from jarvis import limits, state
from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from jarvis.inputs import check_messages, read_json_object
from jarvis.logs import trace_id_var
from jarvis.relay import Relay

bp = Blueprint("api", __name__, url_prefix="/v1")


@bp.post("/chat/completions")
def chat_completions():
    """Stream (or return) a chat completion."""
    return _relay(parse_request("chat/completions", "messages"))


@bp.post("/completions")
def completions():
    """Stream (or return) a text completion (the legacy API that editors and RAG tools still call)."""
    return _relay(parse_request("completions", "prompt"))


@bp.post("/responses")
def responses():
    """Stream (or return) a Responses-API answer, passed through as the upstream speaks it."""
    return _relay(parse_request("responses", "input"))


@bp.post("/embeddings")
def embeddings():
    """Embeddings, as plain JSON; the upstream request is cancelled if the client leaves meanwhile."""
    request_ = parse_request("embeddings", "input")
    if request_.stream:
        raise ApiError(400, "Embeddings are not streamed: leave 'stream' out", code="invalid_value", param="stream")
    return _relay(request_)


@bp.get("/models")
def models():
    """The models the upstreams offer, in OpenAI's list format."""
    return jsonify(state.backend().models())


def _relay(request_: ChatRequest):
    user = g.get("user")
    limits.check_daily_tokens(user)
    settings = state.settings()
    relay = Relay(state.backend(), request_, settings, request.environ, meter=state.meter())
    relay.release = limits.claim_stream(user, settings.stream_max_seconds + 60)  # given back as it closes
    relay.open()
    return relay.sse_response() if request_.stream else relay.result_response()


def parse_request(endpoint: str, required: str) -> ChatRequest:
    """Read the whole body and check the fields Jarvis relies on; raise ApiError otherwise."""
    raw, body = read_json_object()
    settings = state.settings()
    if required == "messages":
        check_messages(body.get("messages"), settings)
    else:
        _check_input(body, required, settings.max_message_chars)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", code="invalid_type", param="stream")
    return ChatRequest(body=body, raw=raw, stream=stream, trace_id=trace_id_var.get(), endpoint=endpoint,
                       account=limits.account_of_request())


def _check_input(body: dict, name: str, max_chars: int) -> None:
    value = body.get(name)
    if value is None or value == "" or value == []:
        raise ApiError(400, f"'{name}' is required", code="invalid_value", param=name)
    if not isinstance(value, (str, list)):
        raise ApiError(400, f"'{name}' must be a string or a list", code="invalid_type", param=name)
    characters = len(value) if isinstance(value, str) else len(json.dumps(value))
    if characters > max_chars:
        raise ApiError(400, f"'{name}' holds {characters} characters; at most {max_chars} (JARVIS_MAX_MESSAGE_CHARS)",
                       code="messages_too_long", param=name)
