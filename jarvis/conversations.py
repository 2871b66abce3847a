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

from flask import Blueprint, Response, g, jsonify, request

from jarvis import accounts, attachments, chat_settings, cooperative, exchange, limits, state
from jarvis import runs as runs_module
from jarvis.backends import ChatRequest
from jarvis.endings import Outcome
from jarvis.errors import ApiError
from jarvis.inputs import check_messages, read_json_object, text_field
from jarvis.logs import trace_id_var
from jarvis.security import client_address
from jarvis.stores import ConversationBusy, NoSuchConversation, TooManyRuns, TooManyStreams
from jarvis.tool_loop import history_messages

log = logging.getLogger(__name__)

bp = Blueprint("conversations", __name__, url_prefix="/api/conversations")

TITLE_LENGTH = 60


@bp.before_request
def _owner_only() -> None:
    """With accounts, a conversation of someone else is one that does not exist — checked here, once, for
    every route that names one (jarvis.accounts)."""
    conversation_id = (request.view_args or {}).get("conversation_id")
    if conversation_id is not None:
        accounts.check_owner(conversation_id)


def _conversation_or_404(conversation_id: str) -> dict:
    conversation = state.store().get_conversation(conversation_id)
    if conversation is None:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    return conversation


def _json_body() -> dict:
    return read_json_object()[1]


@bp.get("")
def list_conversations():
    """All conversations, most recently active first (`running`: an answer is being written)."""
    state.runs().settle()  # every answer that just ended here, so that none is listed as running
    return jsonify(data=state.store().list_conversations(accounts.user_id()))


@bp.post("")
def create_conversation():
    """A new, empty conversation, with the server's default settings (or the ones sent)."""
    body = _json_body()
    title = text_field(body, "title", required=False) or "New chat"
    settings = chat_settings.checked(body["settings"], state.settings()) if "settings" in body else \
        chat_settings.defaults(state.settings())
    return jsonify(state.store().create_conversation(title[:200], settings, accounts.user_id())), 201


@bp.get("/search")
def search():
    """Conversations whose title or messages hold every word of ?q= (the last word as a prefix): each
    result names the conversation, the message (null: the title) and a snippet with the matches between
    U+E000 and U+E001."""
    query = request.args.get("q", "")
    if len(query) > 500:
        raise ApiError(400, "'q' may be at most 500 characters", param="q", code="invalid_value")
    return jsonify(data=state.store().search(query, user_id=accounts.user_id()))


@bp.get("/export")
def export_all():
    """Every conversation, as one JSON file (the format is in jarvis/exchange.py and the README)."""
    store = state.store()
    conversations = [store.get_conversation(item["id"], every_version=True)
                     for item in store.list_conversations(accounts.user_id())]
    for conversation in conversations:
        if conversation is not None:
            conversation["files"] = store.conversation_files(conversation["id"])
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
    for conversation in conversations:  # each file checked again as if it had just been sent, off the hub
        files = conversation.pop("files", {})
        by_id = dict(zip(files, attachments.decoded(list(files.values()), settings), strict=True)) if files else {}
        for message in conversation["messages"]:
            message["attachments"] = [by_id[file_id] for file_id in message.get("attachments") or ()]
    ids = state.store().import_conversations(conversations, accounts.user_id())
    log.info("imported %d conversations", len(ids))
    return jsonify(data=ids), 201


@bp.get("/<conversation_id>")
def read_conversation(conversation_id):
    """One conversation with its current branch's messages (each with `parent_id` and `versions`, the ids
    of it and its siblings), their statuses, and the settings it uses; ?all=1: every message of its tree."""
    every_version = request.args.get("all") in ("1", "true")
    state.runs().settle(conversation_id)  # an answer that just ended here is read as it ended
    conversation = state.store().get_conversation(conversation_id, every_version=every_version)
    if conversation is None:
        raise ApiError(404, "No such conversation", code="conversation_not_found")
    conversation["settings"] = chat_settings.effective(conversation.get("settings"), state.settings())
    return jsonify(conversation)


@bp.get("/<conversation_id>/context")
def context(conversation_id):
    """How full the model's context is on the current branch: {"used": tokens, "estimated": whether counted from
    characters (no answer said its usage yet), "window": the model's context or null when unknown}."""
    conversation = _conversation_or_404(conversation_id)
    model = request.args.get("model") or None
    window = getattr(state.backend(), "context_window", None)
    try:
        tokens = window(model) if window is not None else None
    except Exception:
        log.warning("could not read the model's context window", exc_info=True)
        tokens = None
    messages = conversation["messages"]
    last = next((m for m in reversed(messages) if m["role"] == "assistant" and m.get("stats")), None)
    stats = last["stats"] if last else {}
    if stats.get("prompt_tokens"):
        later = messages[messages.index(last) + 1:]
        used = stats["prompt_tokens"] + (stats.get("completion_tokens") or 0) + \
            sum(len(m["content"]) for m in later) // 4
        estimated = False
    else:
        used, estimated = sum(len(m["content"]) + len(m.get("reasoning") or "") for m in messages) // 4, True
    return jsonify(used=used, estimated=estimated, window=tokens)


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
    tree = state.store().get_conversation(conversation_id, every_version=True) or conversation  # every version
    tree["settings"] = conversation["settings"]
    tree["files"] = state.store().conversation_files(conversation_id)
    return _download(jsonify(exchange.export_document([tree])), f"{name}.json")


@bp.put("/<conversation_id>")
def update_conversation(conversation_id):
    """Rename a conversation ({"title"}), change its settings ({"settings"}: the next answer uses them)
    and/or switch its current branch ({"leaf": a message id}: the branch through that message, down to
    its newest descendant)."""
    body = _json_body()
    if "title" not in body and "settings" not in body and "leaf" not in body:
        raise ApiError(400, "Send 'title', 'settings', 'leaf' or several", code="invalid_value")
    store = state.store()
    changed = True
    if "leaf" in body:
        leaf = body["leaf"]
        if not isinstance(leaf, int) or isinstance(leaf, bool):
            raise ApiError(400, "'leaf' must be a message id", param="leaf", code="invalid_type")
        _conversation_or_404(conversation_id)
        if store.set_leaf(conversation_id, leaf) is None:
            raise ApiError(404, "No such message in this conversation", param="leaf", code="message_not_found")
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
    """Add the user's message, answer again ({"regenerate": true}: a new version of the last answer), edit
    and resend ({"content", "edit": a user message id}: a new version of that message, answered on its own
    branch) or continue an answer cut short ({"continue": its id}); start the answer and stream it.
    Nothing is deleted: a regenerate or an edit the backend refuses leaves the tree as it was."""
    settings = state.settings()
    # Pictures and files ride in the body (base64): it may grow by JARVIS_MAX_ATTACHMENT_BYTES each.
    limit = settings.max_body_bytes + settings.max_attachments * (settings.max_attachment_bytes * 4 // 3 + 1024)
    request.max_content_length = limit
    body = read_json_object(limit=limit, decode=cooperative.loads)[1]
    conversation = _conversation_or_404(conversation_id)
    if "continue" in body:
        return _continue(conversation_id, conversation, body)
    plan = _plan(conversation, body)
    files = attachments.decoded(plan.files, settings) if plan.files else None
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    runs, trace_id, client = state.runs(), trace_id_var.get(), client_address(request.environ)
    runs.settle(conversation_id, client)
    limits.check_daily_tokens(g.get("user"))
    with _claim_errors():
        message_id, history, previous_leaf = state.store().start_answer(
            conversation_id, owner=runs.owner, parent_id=plan.parent_id, user_content=plan.content, title=plan.title,
            model=model, trace_id=trace_id, client=client, max_runs=state.settings().max_runs_per_client,
            user_limit=limits.stream_limit(g.get("user")), attachments=files)
    chat = _chat_request(conversation, history, model, trace_id)
    try:
        response = runs.start(conversation_id, message_id, chat, request.environ, client, title=plan.title,
                              user_id=accounts.user_id())
    except ApiError as error:
        if plan.versioned:  # a regenerate or an edit the backend refused: the tree stays as it was
            user_message = history[-1]["id"] if plan.content is not None else None
            state.store().abandon_answer(conversation_id, message_id, user_message, previous_leaf)
        else:  # kept, ended (refused, or stopped before it began): the page names what it shows by these
            error.headers["X-Message-Id"] = str(message_id)
            if plan.content is not None:
                error.headers["X-User-Message-Id"] = str(history[-1]["id"])
        raise
    response.headers["X-Message-Id"] = str(message_id)
    if plan.content is not None:
        response.headers["X-User-Message-Id"] = str(history[-1]["id"])  # the page keeps its views by id
    return response


def _continue(conversation_id: str, conversation: dict, body: dict) -> Response:
    """Continue an answer cut short: the same message, the model asked to complete its text."""
    message_id = body["continue"]
    if not isinstance(message_id, int) or isinstance(message_id, bool):
        raise ApiError(400, "'continue' must be the id of an answer", param="continue", code="invalid_type")
    # What of it the page shows ({"after", "reasoning_after"}, characters; by default all of it): a page
    # that stopped reading at Stop may lack the last tokens the server saved, and gets them first.
    shown = tuple(_count_field(body, name) for name in ("after", "reasoning_after"))
    model = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else None
    runs, trace_id, client = state.runs(), trace_id_var.get(), client_address(request.environ)
    runs.settle(conversation_id, client)
    fields = runs.continuation.fields(model, trace_id)  # 400 when its server cannot continue
    limits.check_daily_tokens(g.get("user"))
    with _claim_errors():
        branch = state.store().continue_answer(conversation_id, message_id, owner=runs.owner, trace_id=trace_id,
                                               client=client, max_runs=state.settings().max_runs_per_client,
                                               user_limit=limits.stream_limit(g.get("user")))
    if branch is None:
        raise ApiError(400, "Only an answer cut short can be continued — stopped, interrupted, failed after some "
                            "text, or ended at max_tokens — and only while nothing follows it; an answer that called "
                            "tools is answered again instead",
                       param="continue", code="not_continuable")
    answer = branch[-1]
    chat = _chat_request(conversation, branch, model, trace_id, fields, offer_tools=False)
    response = runs.start(conversation_id, message_id, chat, request.environ, client,
                          continued=(answer["content"], answer["reasoning"]), shown=shown,
                          ended=(answer["status"], answer["error"], answer.get("stats")), user_id=accounts.user_id())
    response.headers["X-Message-Id"] = str(message_id)
    return response


def _count_field(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(400, f"'{name}' must be a whole number of characters, 0 or more", param=name,
                       code="invalid_value")
    return value


def _chat_request(conversation: dict, history: list[dict], model: str | None, trace_id: str,
                  fields: dict | None = None, *, offer_tools: bool = True) -> ChatRequest:
    """The upstream request for an answer to `history` (root first) with the conversation's settings. When
    `history` ends with an answer, the model is asked to continue its text, with the `fields` its server
    needs for that (jarvis.continuation)."""
    # Usage lets the stats under the answer use the upstream's own token count; the page never
    # passes it on, and /v1 clients only get it when they ask.
    conversation_settings = chat_settings.effective(conversation.get("settings"), state.settings())
    system, parameters = chat_settings.request_fields(conversation_settings)
    files = state.store().files_for([attachment["id"] for message in history
                                     for attachment in message.get("attachments") or ()])
    chat_body = {"messages": [*system, *[sent for message in history for sent in (
        [attachments.user_message(message, files)] if message.get("attachments") else history_messages(message))]],
                 "stream": True, "stream_options": {"include_usage": True}, **parameters,
                 **({"model": model} if model else {}), **(fields or {})}
    return ChatRequest(body=chat_body, raw=json.dumps(chat_body).encode(), stream=True, trace_id=trace_id,
                       account=limits.account_of_request(),
                       # (a continued answer goes on with its text: its tools are not offered again)
                       tools=(conversation_settings.get("tools") or {}) if offer_tools else None)


class _claim_errors:
    """The store's refusals to start an answer, as the API's errors."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, ConversationBusy):
            raise ApiError(409, "This conversation is already answering; stop it first",
                           code="conversation_busy") from None
        if isinstance(error, TooManyRuns):
            limit = state.settings().max_runs_per_client
            raise ApiError(429, f"You already have {error.running} answers running, the most one client may have "
                                f"(JARVIS_MAX_RUNS_PER_CLIENT={limit}): stop one, or wait for one to end",
                           code="too_many_runs", headers={"Retry-After": "5"}) from None
        if isinstance(error, TooManyStreams):
            raise limits.too_many_streams(error) from None
        if isinstance(error, NoSuchConversation):
            raise ApiError(404, "No such conversation", code="conversation_not_found") from None
        return False


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
    content: str | None  # the user's new message, if any (its text)
    parent_id: int | None  # what the new message goes under (with no new message: what the answer goes under)
    versioned: bool  # a regenerate or an edit: a new version beside an old one, undone if refused
    title: str | None  # a first message names the conversation
    files: list = []  # its pictures and files as sent: (kind, name, bytes), checked but not decoded yet


def _plan(conversation: dict, body: dict) -> _Plan:
    """What a send asks for, checked against the conversation's current branch before anything changes."""
    messages = conversation["messages"]
    if body.get("regenerate") is True:
        last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
        if last_user is None:
            raise ApiError(400, "There is no message to answer again", code="nothing_to_regenerate")
        kept = messages[:messages.index(last_user) + 1]
        plan = _Plan(None, last_user["id"], True, None)
    else:
        content, files = attachments.parse_content(body.get("content"), state.settings())
        if not content.strip() and not files:
            raise ApiError(400, "'content' must be a non-empty string", param="content", code="invalid_value")
        edit = body.get("edit")
        if edit is not None:
            edited = next((m for m in messages if m["id"] == edit and m["role"] == "user"), None)
            if edited is None:
                raise ApiError(400, "'edit' must name one of this conversation's user messages", param="edit",
                               code="invalid_value")
            kept = messages[:messages.index(edited)]
            parent_id = edited["parent_id"]
        else:
            kept = messages
            parent_id = messages[-1]["id"] if messages else None
        kept = [*kept, {"role": "user", "content": content}]
        first_line = (content.strip().splitlines() or [files[0][1] if files else ""])[0]
        title = first_line[:TITLE_LENGTH] if not messages and conversation["title"] == "New chat" else None
        plan = _Plan(content, parent_id, edit is not None, title, files)
    check_messages([{"role": m["role"], "content": m["content"]} for m in kept], state.settings())
    return plan
