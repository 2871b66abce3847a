"""The page's JSON API: conversations, and the answers that run in them.

An answer is a server-side run (jarvis.runs): sending a message starts one and
streams it, in the same OpenAI chunk format as /v1/chat/completions; a page that
reloads, or loses its connection, re-attaches to it from any worker; Stop stops
it from any worker. The views here only check requests and hand over.
"""

from __future__ import annotations

import json
import logging
from typing import NamedTuple

from flask import Blueprint, jsonify, request

from jarvis import runs as runs_module
from jarvis import state
from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from jarvis.inputs import check_messages, read_json_object, text_field
from jarvis.logs import trace_id_var
from jarvis.store import ConversationBusy, NoSuchConversation

log = logging.getLogger(__name__)

bp = Blueprint("conversations", __name__, url_prefix="/api/conversations")

TITLE_LENGTH = 60


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
    """Delete a conversation; an answer still running in it stops (on another worker, within a tick)."""
    run = state.runs().for_conversation(conversation_id)
    if run is not None:
        run.stop("deleted")
    if not state.store().delete_conversation(conversation_id):
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return "", 204


@bp.post("/<conversation_id>/messages")
def send_message(conversation_id):
    """Add the user's message (or regenerate, or edit and resend), start the answer and stream it."""
    body = _json_body()
    plan = _plan(_conversation_or_404(conversation_id), body)
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    runs, trace_id = state.runs(), trace_id_var.get()
    try:
        message_id, history = state.store().start_answer(
            conversation_id, owner=runs.owner, user_content=plan.content, delete_from=plan.delete_from,
            history_before=plan.replaces_from, title=plan.title, model=model, trace_id=trace_id)
    except ConversationBusy:
        raise ApiError(409, "This conversation is already answering; stop it first", code="conversation_busy")
    except NoSuchConversation:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    # Usage lets the stats under the answer use the upstream's own token count; the page never
    # passes it on, and /v1 clients only get it when they ask.
    chat_body = {"messages": [{"role": m["role"], "content": m["content"]} for m in history
                              if m["role"] == "user" or m["content"]],
                 "stream": True, "stream_options": {"include_usage": True}, **({"model": model} if model else {})}
    chat = ChatRequest(body=chat_body, raw=json.dumps(chat_body).encode(), stream=True, trace_id=trace_id)
    try:
        response = runs.start(conversation_id, message_id, chat, request.environ)
    except ApiError:
        if plan.replaces_from is not None:  # a regenerate the upstream refused: the previous answer stays
            state.store().delete_messages_from(conversation_id, message_id)
        raise
    if plan.replaces_from is not None:  # the new answer has started: it replaces the previous one
        state.store().delete_messages_between(conversation_id, plan.replaces_from, message_id)
    response.headers["X-Message-Id"] = str(message_id)
    return response


@bp.get("/<conversation_id>/messages/<int:message_id>/stream")
def stream_message(conversation_id, message_id):
    """Re-attach to an answer: what the page lacks after ?after=N (content) and ?reasoning_after=M
    characters, then the rest as it comes, from whichever worker runs it."""
    after, reasoning_after = _offset("after"), _offset("reasoning_after")
    run = state.runs().by_message.get(message_id)
    if run is not None and run.conversation_id == conversation_id and not run.finished:
        return run.attach(request.environ, after, reasoning_after)
    message = state.store().follow(message_id, touch=False)
    if message is None or message["conversation_id"] != conversation_id or message["role"] != "assistant":
        raise ApiError(404, "No such answer in this conversation", code="message_not_found")
    return runs_module.follow(state.store(), state.settings(), message_id, request.environ, after, reasoning_after)


@bp.post("/<conversation_id>/stop")
def stop_answer(conversation_id):
    """Stop the conversation's answer, wherever it runs: 202 when one was running, 200 when none was."""
    run = state.runs().for_conversation(conversation_id)
    if run is not None and not run.finished:
        run.stop("stopped")
        return {"stopped": True}, 202
    _conversation_or_404(conversation_id)
    if state.store().request_stop(conversation_id):
        return {"stopped": True}, 202
    return {"stopped": False}, 200


def _offset(name: str) -> int:
    raw = request.args.get(name, "0")
    if not raw.isdigit():
        raise ApiError(400, f"'{name}' must be a whole number of characters, 0 or more", param=name,
                       code="invalid_value")
    return int(raw)


class _Plan(NamedTuple):
    content: str | None  # the user's new message, if any
    delete_from: int | None  # an edit: drop the messages from this id on
    replaces_from: int | None  # a regenerate: the answer from this id on, replaced once the new one starts
    title: str | None  # a first message names the conversation


def _plan(conversation: dict, body: dict) -> _Plan:
    """What a send asks for, checked against the conversation before anything changes."""
    messages = conversation["messages"]
    if body.get("regenerate") is True:
        last_user = max((m["id"] for m in messages if m["role"] == "user"), default=None)
        if last_user is None:
            raise ApiError(400, "There is no message to answer again", code="nothing_to_regenerate")
        kept = [m for m in messages if m["id"] <= last_user]
        plan = _Plan(None, None, last_user + 1, None)
    else:
        content = text_field(body, "content")
        edit = body.get("edit")
        if edit is not None and not any(m["id"] == edit and m["role"] == "user" for m in messages):
            raise ApiError(400, "'edit' must name one of this conversation's user messages", param="edit",
                           code="invalid_value")
        kept = [*[m for m in messages if edit is None or m["id"] < edit], {"role": "user", "content": content}]
        title = content.strip().splitlines()[0][:TITLE_LENGTH] \
            if not messages and conversation["title"] == "New chat" else None
        plan = _Plan(content, edit, None, title)
    check_messages([{"role": m["role"], "content": m["content"]} for m in kept], state.settings())
    return plan
