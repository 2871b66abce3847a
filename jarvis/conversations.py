"""The page's JSON API: conversations, and a streaming endpoint that saves the answer as it streams.

The reply streams through the same relay, in the same OpenAI chunk format, as
/v1/chat/completions. The server keeps the answer itself: `ReplyRecorder`
saves it at least every FLUSH_SECONDS while it streams and records how it
ended, so a Stop, a reload or a vanished browser never loses it.
"""

from __future__ import annotations

import json
import logging
import time

import gevent
from flask import Blueprint, jsonify, request

from jarvis import state
from jarvis.answer import Answer
from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from jarvis.inputs import read_json_object, text_field
from jarvis.logs import trace_id_var
from jarvis.relay import Relay

log = logging.getLogger(__name__)

bp = Blueprint("conversations", __name__, url_prefix="/api/conversations")

FLUSH_SECONDS = 0.5
TITLE_LENGTH = 60
_STATUS_OF_OUTCOME = {"complete": "complete", "client_stop": "stopped"}

_live: dict[str, Relay] = {}  # conversation id -> its streaming reply, in this worker


def _conversation_or_404(conversation_id: str) -> dict:
    conversation = state.store().get_conversation(conversation_id)
    if conversation is None:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return conversation


def _json_body() -> dict:
    return read_json_object()[1]


@bp.get("")
def list_conversations():
    """All conversations, most recently active first."""
    return jsonify(data=state.store().list_conversations())


@bp.post("")
def create_conversation():
    """A new, empty conversation."""
    title = text_field(_json_body(), "title", required=False) or "New chat"
    return jsonify(state.store().create_conversation(title[:200])), 201


@bp.get("/<conversation_id>")
def read_conversation(conversation_id):
    """One conversation with its messages and their statuses."""
    return jsonify(_conversation_or_404(conversation_id))


@bp.put("/<conversation_id>")
def rename_conversation(conversation_id):
    """Rename a conversation."""
    title = text_field(_json_body(), "title")
    if not state.store().rename_conversation(conversation_id, title[:200]):
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return jsonify(_conversation_or_404(conversation_id))


@bp.delete("/<conversation_id>")
def delete_conversation(conversation_id):
    """Delete a conversation; a reply still streaming into it stops."""
    relay = _live.get(conversation_id)
    if relay is not None:
        relay.interrupt("deleted")
    if not state.store().delete_conversation(conversation_id):
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return "", 204


@bp.post("/<conversation_id>/messages")
def send_message(conversation_id):
    """Add the user's message (or regenerate, or edit and resend) and stream the assistant's reply."""
    body = _json_body()
    conversation = _conversation_or_404(conversation_id)
    if conversation_id in _live:
        raise ApiError(409, "This conversation is already answering; stop it first", code="conversation_busy")
    history = _prepare_history(conversation, body)
    store = state.store()
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    trace_id = trace_id_var.get()
    message_id = store.add_message(conversation_id, "assistant", "", "streaming", model, trace_id)
    # Usage lets the stats under the answer use the upstream's own token count; the page never
    # passes it on, and /v1 clients only get it when they ask.
    chat_body = {"messages": history, "stream": True, "stream_options": {"include_usage": True},
                 **({"model": model} if model else {})}
    chat = ChatRequest(body=chat_body, raw=json.dumps(chat_body).encode(), stream=True, trace_id=trace_id)
    relay = Relay(state.backend(), chat, state.settings(), request.environ,
                  observer=ReplyRecorder(store, conversation_id, message_id))
    _live[conversation_id] = relay
    relay.open()
    response = relay.sse_response()
    response.headers["X-Message-Id"] = str(message_id)
    return response


def _prepare_history(conversation: dict, body: dict) -> list[dict]:
    """Apply a regenerate or an edit to the stored conversation; return the messages to send."""
    store = state.store()
    messages = conversation["messages"]
    if body.get("regenerate") is True:
        last_user = max((m["id"] for m in messages if m["role"] == "user"), default=None)
        if last_user is None:
            raise ApiError(400, "There is no message to answer again", code="nothing_to_regenerate")
        store.delete_messages_from(conversation["id"], last_user + 1)
        messages = [m for m in messages if m["id"] <= last_user]
    else:
        content = text_field(body, "content")
        edit = body.get("edit")
        if edit is not None:
            if not any(m["id"] == edit and m["role"] == "user" for m in messages):
                raise ApiError(400, "'edit' must name one of this conversation's user messages", param="edit",
                               code="invalid_value")
            store.delete_messages_from(conversation["id"], edit)
            messages = [m for m in messages if m["id"] < edit]
        store.add_message(conversation["id"], "user", content)
        messages = [*messages, {"role": "user", "content": content, "status": "complete"}]
        if not conversation["messages"] and conversation["title"] == "New chat":
            store.rename_conversation(conversation["id"], content.strip().splitlines()[0][:TITLE_LENGTH])
    return [{"role": m["role"], "content": m["content"]} for m in messages
            if m["role"] == "user" or m["content"]]


class ReplyRecorder:
    """Saves a streaming reply: at least every FLUSH_SECONDS while it streams, and once at the end."""

    def __init__(self, store, conversation_id: str, message_id: int):
        self.store = store
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.answer = Answer()
        self.last_flush = time.monotonic()
        self.timer: gevent.Greenlet | None = None

    def events(self, batch: list[bytes]) -> list[bytes]:
        """Keep the text; pass the page only the chunk fields it knows (model output is untrusted)."""
        page_batch = []
        for payload in batch:
            try:
                chunk = json.loads(payload)
            except (ValueError, RecursionError):
                continue
            page_batch.append(json.dumps(self.answer.add(chunk)).encode())
        if self.timer is None:
            delay = max(0.0, self.last_flush + FLUSH_SECONDS - time.monotonic())
            self.timer = gevent.spawn_later(delay, self._flush)
        return page_batch

    def finish(self) -> list[bytes]:
        """Before [DONE]: the text held back while a tag could still arrive, and the answer's stats."""
        return [json.dumps(chunk).encode() for chunk in self.answer.finish()]

    def _flush(self) -> None:
        self.timer = None
        self.last_flush = time.monotonic()
        result = self.store.update_message_later(self.message_id, self.answer.content, "streaming",
                                                 reasoning=self.answer.reasoning)
        result.rawlink(self._check_still_there)

    def _check_still_there(self, result) -> None:
        relay = _live.get(self.conversation_id)
        if result.successful() and result.value is False and relay is not None:
            relay.interrupt("deleted")  # the conversation was deleted, perhaps by another worker

    def ended(self, outcome: str, error_message: str | None) -> None:
        if self.timer is not None:
            self.timer.kill(block=False)
            self.timer = None
        _live.pop(self.conversation_id, None)
        if outcome == "deleted":
            return
        status = _STATUS_OF_OUTCOME.get(outcome, "error")
        self.answer.end()  # text still held back (a stop or an error ended it mid-tag) is saved too
        self.store.update_message_later(self.message_id, self.answer.content, status,
                                        error_message if status == "error" else None,
                                        reasoning=self.answer.reasoning, stats=self.answer.stats())
