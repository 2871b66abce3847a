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

from flask import Blueprint, Response, jsonify, request

from jarvis import chat_settings, cooperative, exchange, state
from jarvis import runs as runs_module
from jarvis.backends import ChatRequest
from jarvis.endings import Outcome
from jarvis.errors import ApiError
from jarvis.inputs import check_messages, read_json_object, text_field
from jarvis.logs import trace_id_var
from jarvis.security import client_address
from jarvis.stores import ConversationBusy, NoSuchConversation, TooManyRuns

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
    """A new, empty conversation, with the server's default settings (or the ones sent)."""
    body = _json_body()
    title = text_field(body, "title", required=False) or "New chat"
    settings = chat_settings.checked(body["settings"], state.settings()) if "settings" in body else \
        chat_settings.defaults(state.settings())
    return jsonify(state.store().create_conversation(title[:200], settings)), 201


@bp.get("/search")
def search():
    """Conversations whose title or messages hold every word of ?q= (the last word as a prefix): each
    result names the conversation, the message (null: the title) and a snippet with the matches between
    U+E000 and U+E001."""
    query = request.args.get("q", "")
    if len(query) > 500:
        raise ApiError(400, "'q' may be at most 500 characters", param="q", code="invalid_value")
    return jsonify(data=state.store().search(query))


@bp.get("/export")
def export_all():
    """Every conversation, as one JSON file (the format is in jarvis/exchange.py and the README)."""
    store = state.store()
    conversations = [store.get_conversation(item["id"]) for item in store.list_conversations()]
    return _download(jsonify(exchange.export_document([c for c in conversations if c is not None])),
                     "jarvis-conversations.json")


@bp.post("/import")
def import_conversations():
    """Add the conversations of a Jarvis or Open WebUI export, all or none; 201 with their new ids."""
    settings = state.settings()
    request.max_content_length = settings.max_import_bytes
    # Parsed and checked in slices: the hub keeps serving everyone else meanwhile (jarvis.cooperative).
    most = exchange.MAX_CONVERSATIONS
    try:
        document = read_json_object(limit=settings.max_import_bytes, any_json=True,
                                    decode=lambda raw: cooperative.loads(raw, max_items=most))[1]
    except cooperative.TooLong:
        raise ApiError(400, f"The file holds more than {exchange.MAX_CONVERSATIONS} conversations; at most "
                            f"{exchange.MAX_CONVERSATIONS} at once", code="invalid_import") from None
    conversations = exchange.parse_import(document, settings)
    ids = state.store().import_conversations(conversations)
    log.info("imported %d conversations", len(ids))
    return jsonify(data=ids), 201


@bp.get("/<conversation_id>")
def read_conversation(conversation_id):
    """One conversation with its messages and their statuses, and the settings it uses."""
    conversation = _conversation_or_404(conversation_id)
    conversation["settings"] = chat_settings.effective(conversation.get("settings"), state.settings())
    return jsonify(conversation)


@bp.get("/<conversation_id>/export")
def export_one(conversation_id):
    """One conversation: ?format=json (the export format, one conversation) or markdown."""
    conversation = _conversation_or_404(conversation_id)
    conversation["settings"] = chat_settings.effective(conversation.get("settings"), state.settings())
    kind = request.args.get("format", "json")
    name = "".join(c if c.isalnum() else "-" for c in conversation["title"])[:60].strip("-") or "conversation"
    if kind == "markdown":
        return _download(Response(exchange.markdown(conversation), content_type="text/markdown; charset=utf-8"),
                         f"{name}.md")
    if kind != "json":
        raise ApiError(400, "'format' must be json or markdown", param="format", code="invalid_value")
    return _download(jsonify(exchange.export_document([conversation])), f"{name}.json")


@bp.put("/<conversation_id>")
def update_conversation(conversation_id):
    """Rename a conversation ({"title"}) and/or change its settings ({"settings"}: the next answer uses
    them)."""
    body = _json_body()
    if "title" not in body and "settings" not in body:
        raise ApiError(400, "Send 'title', 'settings' or both", code="invalid_value")
    store = state.store()
    changed = True
    if "settings" in body:
        changed = store.update_conversation_settings(conversation_id,
                                                     chat_settings.checked(body["settings"], state.settings()))
    if changed and "title" in body:
        changed = store.rename_conversation(conversation_id, text_field(body, "title")[:200])
    if not changed:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return read_conversation(conversation_id)


def _download(response: Response, filename: str) -> Response:
    response.headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


@bp.delete("/<conversation_id>")
def delete_conversation(conversation_id):
    """Delete a conversation; an answer still running in it stops (on another worker, within a tick)."""
    run = state.runs().for_conversation(conversation_id)
    if run is not None:
        run.stop(Outcome.DELETED)
    if not state.store().delete_conversation(conversation_id):
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return "", 204


@bp.post("/<conversation_id>/messages")
def send_message(conversation_id):
    """Add the user's message (or regenerate, or edit and resend), start the answer and stream it."""
    body = _json_body()
    conversation = _conversation_or_404(conversation_id)
    plan = _plan(conversation, body)
    system, parameters = chat_settings.request_fields(
        chat_settings.effective(conversation.get("settings"), state.settings()))
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    runs, trace_id, client = state.runs(), trace_id_var.get(), client_address(request.environ)
    runs.settle(conversation_id, client)
    try:
        message_id, history = state.store().start_answer(
            conversation_id, owner=runs.owner, user_content=plan.content, delete_from=plan.delete_from,
            history_before=plan.replaces_from, title=plan.title, model=model, trace_id=trace_id,
            client=client, max_runs=state.settings().max_runs_per_client)
    except ConversationBusy:
        raise ApiError(409, "This conversation is already answering; stop it first", code="conversation_busy")
    except TooManyRuns as error:
        limit = state.settings().max_runs_per_client
        raise ApiError(429, f"You already have {error.running} answers running, the most one client may have "
                            f"(JARVIS_MAX_RUNS_PER_CLIENT={limit}): stop one, or wait for one to end",
                       code="too_many_runs", headers={"Retry-After": "5"})
    except NoSuchConversation:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    # Usage lets the stats under the answer use the upstream's own token count; the page never
    # passes it on, and /v1 clients only get it when they ask.
    chat_body = {"messages": [*system, *[{"role": m["role"], "content": m["content"]} for m in history
                                         if m["role"] == "user" or m["content"]]],
                 "stream": True, "stream_options": {"include_usage": True}, **parameters,
                 **({"model": model} if model else {})}
    chat = ChatRequest(body=chat_body, raw=json.dumps(chat_body).encode(), stream=True, trace_id=trace_id)
    try:
        response = runs.start(conversation_id, message_id, chat, request.environ, client)
    except ApiError:
        if plan.replaces_from is not None:  # a regenerate the upstream refused: the previous answer stays
            state.store().delete_messages_from(conversation_id, message_id)
        raise
    if plan.replaces_from is not None:  # the new answer has started: it replaces the previous one
        state.store().delete_messages_between(conversation_id, plan.replaces_from, message_id)
    response.headers["X-Message-Id"] = str(message_id)
    if plan.content is not None and history and history[-1]["role"] == "user":
        response.headers["X-User-Message-Id"] = str(history[-1]["id"])  # the page keeps its views by id
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
        run.stop(Outcome.STOPPED)
        return {"stopped": True}, 202
    _conversation_or_404(conversation_id)
    if state.store().request_stop(conversation_id):
        return {"stopped": True}, 202
    return {"stopped": False}, 200


def _offset(name: str) -> int:
    raw = request.args.get(name, "0")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 15):  # ("²".isdigit(), and int() refuses it)
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
