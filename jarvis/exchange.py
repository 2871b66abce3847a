"""Conversations out of Jarvis and into it: export as JSON or Markdown, import from Jarvis or Open WebUI.

Jarvis's JSON export (documented in the README):

    {"format": "jarvis.conversations", "version": 1, "exported_at": 1764500000.0,
     "conversations": [{"title": "...", "created_at": ..., "updated_at": ...,
                        "settings": {"system_prompt": "...", "temperature": 0.7, "top_p": null, "max_tokens": null},
                        "leaf_id": 12,
                        "messages": [{"id": 11, "parent_id": null, "role": "user" | "assistant", "content": "...",
                                      "reasoning": "...", "status": "complete" | "stopped" | "error" | "interrupted",
                                      "error": null, "model": null, "stats": {...} | null, "created_at": ...,
                                      "tools": null | [{"at": 12, "reasoning_at": 0, "calls": [{"id": "call_1",
                                          "name": "get_current_time", "server": "time", "arguments": "{...}",
                                          "result": "..." | null, "is_error": false}]}]}]}]}

A conversation's `files` are the pictures and files its messages carry ({"id", "name", "data": base64}); a
user message lists its own in `attachments` ([{"id"}, ...], ids of that list). On import each is checked
again as if it had just been sent (jarvis.attachments) and gets a new id.

An answer's `tools` are its tool steps (jarvis.tool_loop): the calls the model made after the first `at`
characters (UTF-16 units) of its content, and what each returned.

A conversation is a tree: every version a regenerate or an edit made is a message, `parent_id` naming
the one it follows (null: a first message), parents before their children; `leaf_id` ends the branch
shown. Both are optional on import: without `parent_id` anywhere, the messages form one thread in order.

Import also takes Open WebUI's export ("Export chat" / "Export all chats": a list of chat records whose
`chat.history` holds the message tree, `chat.messages` the thread): the whole tree is imported, its
branch ending at `history.currentId` shown; or `chat.messages` in order when there is no tree.

Everything in a file is untrusted: every field is type- and size-checked, ids in the file are never
used (the store makes its own), and one bad field rejects the whole file naming where it is, before
anything is written; the store then writes every conversation in one transaction.
"""

from __future__ import annotations

import base64
import time

from jarvis.cooperative import Slicer
from jarvis.errors import ApiError
from jarvis.settings import Settings
from jarvis.stores import STATUSES

FORMAT = "jarvis.conversations"
VERSION = 1
MAX_CONVERSATIONS = 10_000
_ROLES = ("user", "assistant")
_ENDED = tuple(status for status in STATUSES if status != "streaming")


# -- export ------------------------------------------------------------------------------------------


def export_document(conversations: list[dict]) -> dict:
    return {"format": FORMAT, "version": VERSION, "exported_at": time.time(),
            "conversations": [_exported(conversation) for conversation in conversations]}


def _exported(conversation: dict) -> dict:
    return {"title": conversation["title"], "created_at": conversation["created_at"],
            "updated_at": conversation["updated_at"], "settings": conversation.get("settings"),
            "leaf_id": conversation.get("leaf_id"),
            "messages": [{"id": message["id"], "parent_id": message.get("parent_id"),
                          "role": message["role"], "content": message["content"],
                          "reasoning": message.get("reasoning") or "",
                          # an answer still being written is exported as far as it went
                          "status": "interrupted" if message["status"] == "streaming" else message["status"],
                          "error": message.get("error"), "model": message.get("model"),
                          "stats": message.get("stats"), "created_at": message["created_at"],
                          "tools": message.get("tools"),
                          **({"attachments": [{"id": attachment["id"]} for attachment in message["attachments"]]}
                             if message.get("attachments") else {})}
                         for message in conversation["messages"]],
            **({"files": [{"id": stored["id"], "name": stored["name"], "type": stored["type"],
                           "data": base64.b64encode(bytes(stored["data"])).decode()}
                          for stored in conversation["files"]]} if conversation.get("files") else {})}


def markdown(conversation: dict) -> str:
    """One conversation as Markdown: a heading, then each message under its role; thinking in a
    collapsed <details> block, a stopped or failed answer's note in italics."""
    lines = [f"# {_one_line(conversation['title'])}", ""]
    settings = conversation.get("settings") or {}
    if settings.get("system_prompt"):
        lines += ["> **System prompt:** " + _one_line(settings["system_prompt"]), ""]
    for message in conversation["messages"]:
        lines += [f"## {'You' if message['role'] == 'user' else 'Assistant'}", ""]
        if message.get("reasoning"):
            lines += ["<details><summary>Thinking</summary>", "", message["reasoning"], "", "</details>", ""]
        lines += [*_with_tools(message), ""]
        if message.get("status") not in (None, "complete"):
            note = f" — {_one_line(message['error'])}" if message.get("error") else ""
            lines += [f"*({message['status']}{note})*", ""]
    return "\n".join(lines)


def _with_tools(message: dict) -> list[str]:
    """The content, with each tool step's calls and results where they came, as fenced blocks."""
    from jarvis.tool_loop import utf16_slice

    lines, before, content = [], 0, message["content"]
    for step in message.get("tools") or []:
        lines.append(utf16_slice(content, before, step["at"]))
        for call in step["calls"]:
            result = call.get("result") if isinstance(call.get("result"), str) else "(no result)"
            lines += ["", f"**Tool `{_one_line(call['name'])}`** {'(error)' if call.get('is_error') else ''}",
                      "", "```json", call.get("arguments", ""), "```", "", "```text", result.replace("```", "` ` `"),
                      "```", ""]
        before = step["at"]
    lines.append(utf16_slice(content, before, None))
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- import ------------------------------------------------------------------------------------------


def parse_import(document, settings: Settings) -> list[dict]:
    """The conversations a file holds, checked and normalised: [{title, created_at, updated_at, settings,
    messages: [{role, content, reasoning, status, error, model, stats, created_at}]}]. ApiError (400,
    naming the place) on anything wrong; nothing is written here. Checked in slices (the hub runs
    between conversations), and the count before any conversation is."""
    if isinstance(document, dict) and document.get("format") == FORMAT:
        if document.get("version") != VERSION:
            raise _bad("version", f"is {document.get('version')!r}; this Jarvis reads version {VERSION}")
        items = _list(document.get("conversations"), "conversations")
        check, where = _jarvis_conversation, "conversations[{}]"
    elif isinstance(document, list) and document and all(isinstance(item, dict) and isinstance(item.get("chat"), dict)
                                                         for item in document):
        items, check, where = document, _open_webui_conversation, "[{}]"
    elif isinstance(document, dict) and isinstance(document.get("chat"), dict):
        items, check, where = [document], _open_webui_conversation, ""
    else:
        raise ApiError(400, "This file is neither a Jarvis export (format \"jarvis.conversations\") nor an Open "
                            "WebUI chat export", code="unknown_import_format")
    if not items:
        raise ApiError(400, "The file holds no conversation", code="invalid_import")
    if len(items) > MAX_CONVERSATIONS:
        raise ApiError(400, f"The file holds {len(items)} conversations; at most {MAX_CONVERSATIONS} at once",
                       code="invalid_import")
    slicer = Slicer()
    parsed = []
    for index, item in enumerate(items):
        parsed.append(check(item, where.format(index), settings))
        slicer.step()
    return parsed


def _jarvis_conversation(item, where: str, settings: Settings) -> dict:
    item = _object(item, where)
    messages = _list(item.get("messages"), f"{where}.messages")
    checked = _checked_messages([_jarvis_message(message, f"{where}.messages[{index}]", settings)
                                 for index, message in enumerate(messages)], where, settings)
    if any(isinstance(message, dict) and "parent_id" in message for message in messages):
        _link(checked, [message.get("id") for message in messages], [message.get("parent_id") for message in messages],
              item.get("leaf_id"), where)
    else:
        _thread(checked)
    files = _files(item.get("files"), f"{where}.files", settings)
    for index, (message, raw) in enumerate(zip(checked, messages, strict=True)):
        message["attachments"] = _attachment_ids(raw.get("attachments") if isinstance(raw, dict) else None, files,
                                                 f"{where}.messages[{index}].attachments", settings)
    return {"title": _title(item.get("title"), f"{where}.title"),
            "created_at": _time(item.get("created_at"), f"{where}.created_at"),
            "updated_at": _time(item.get("updated_at"), f"{where}.updated_at"),
            "settings": _conversation_settings(item.get("settings"), f"{where}.settings", settings),
            "messages": checked, "leaf": _leaf_of(checked), "files": files}


def _files(value, where: str, settings: Settings) -> dict[str, tuple[str, str, str]]:
    """A conversation's files by the id the file gave them: (kind, name, base64), decoded and checked later
    (jarvis.attachments.decoded, off the hub)."""
    if value is None:
        return {}
    files = {}
    for index, item in enumerate(_list(value, where)):
        place = f"{where}[{index}]"
        item = _object(item, place)
        file_id = _text(item.get("id"), f"{place}.id", 100)
        data = _text(item.get("data"), f"{place}.data", settings.max_attachment_bytes * 4 // 3 + 4)
        kind = "image" if str(item.get("type", "")).startswith("image/") else "file"
        files[file_id] = (kind, _text(item.get("name", "file"), f"{place}.name", 200), data)
    return files


def _attachment_ids(value, files: dict, where: str, settings: Settings) -> list[str]:
    if value is None:
        return []
    ids = [_text(_object(item, f"{where}[{index}]").get("id"), f"{where}[{index}].id", 100)
           for index, item in enumerate(_list(value, where))]
    if len(ids) > settings.max_attachments:
        raise _bad(where, f"lists more than {settings.max_attachments} files (JARVIS_MAX_ATTACHMENTS)")
    missing = [file_id for file_id in ids if file_id not in files]
    if missing:
        raise _bad(where, f"names a file the conversation's 'files' does not hold ({missing[0][:40]!r})")
    return ids


def _thread(messages: list[dict]) -> None:
    """Messages in one thread: each follows the one before it, the last ends it."""
    for index, message in enumerate(messages):
        message["parent"] = index - 1 if index else None
    if messages:
        messages[-1]["leaf"] = True


def _link(messages: list[dict], ids: list, parent_ids: list, leaf_id, where: str) -> None:
    """A file's tree: `parent` set to the index of each message's parent, which must come before it."""
    index_of: dict = {}
    for index, (message, own, parent) in enumerate(zip(messages, ids, parent_ids, strict=True)):
        if not isinstance(own, (int, str)) or isinstance(own, bool) or len(str(own)) > 100 or own in index_of:
            raise _bad(f"{where}.messages[{index}].id", "must be a number or a string, unique in its conversation")
        if parent is not None and parent not in index_of:
            raise _bad(f"{where}.messages[{index}].parent_id", "must be null or the id of a message before it")
        message["parent"] = None if parent is None else index_of[parent]
        index_of[own] = index
    if messages:
        leaf = index_of.get(leaf_id, len(messages) - 1) if isinstance(leaf_id, (int, str)) else len(messages) - 1
        messages[leaf]["leaf"] = True


def _leaf_of(messages: list[dict]) -> int | None:
    """The index of the message that ends the branch shown (the `leaf` flag is only a marker)."""
    leaf = next((index for index, message in enumerate(messages) if message.pop("leaf", False)), None)
    return leaf


def _jarvis_message(item, where: str, settings: Settings) -> dict:
    item = _object(item, where)
    role = item.get("role")
    if role not in _ROLES:
        raise _bad(f"{where}.role", f"must be one of {', '.join(_ROLES)} (got {str(role)[:40]!r})")
    status = item.get("status", "complete")
    if status not in _ENDED:
        raise _bad(f"{where}.status", f"must be one of {', '.join(_ENDED)}")
    stats = item.get("stats")
    if stats is not None and not (isinstance(stats, dict) and len(str(stats)) <= 4096):
        raise _bad(f"{where}.stats", "must be an object (of at most 4 KB) or null")
    tools = _tool_steps(item.get("tools"), f"{where}.tools", settings) if role == "assistant" else None
    return {"role": role, "content": _text(item.get("content"), f"{where}.content", settings.max_message_chars),
            "tools": tools,
            "reasoning": _text(item.get("reasoning", ""), f"{where}.reasoning", settings.max_answer_chars),
            "status": status, "error": _optional_text(item.get("error"), f"{where}.error", 2000),
            "model": _optional_text(item.get("model"), f"{where}.model", 200), "stats": stats,
            "created_at": _time(item.get("created_at"), f"{where}.created_at")}


def _open_webui_conversation(item: dict, where: str, settings: Settings) -> dict:
    chat = item["chat"]
    thread, parents, current = _open_webui_tree(chat, where)
    messages = []
    index_of: dict[int, int] = {}  # the tree's index -> the imported message's, system turns left out
    for index, message in enumerate(thread):
        place = f"{where}.chat.messages[{index}]"
        message = _object(message, place)
        role = message.get("role")
        parent = parents[index]
        if role == "system":  # Open WebUI keeps its system prompt in params; a stray system turn is dropped
            index_of[index] = index_of.get(parent, -1) if parent is not None else -1
            continue
        if role not in _ROLES:
            raise _bad(f"{place}.role", f"must be user or assistant (got {str(role)[:40]!r})")
        kept_parent = index_of.get(parent, -1) if parent is not None else -1
        index_of[index] = len(messages)
        messages.append({"role": role, "content": _text(message.get("content"), f"{place}.content",
                                                        settings.max_message_chars),
                         "reasoning": "", "status": "complete", "error": None,
                         "model": _optional_text(message.get("model"), f"{place}.model", 200), "stats": None,
                         "created_at": _time(message.get("timestamp"), f"{place}.timestamp"),
                         "parent": None if kept_parent < 0 else kept_parent})
    leaf = index_of.get(current, -1) if current is not None else len(messages) - 1
    params = chat.get("params") if isinstance(chat.get("params"), dict) else {}
    system = params.get("system") if isinstance(params.get("system"), str) else ""
    conversation_settings = _conversation_settings({"system_prompt": system} if system else None,
                                                   f"{where}.chat.params", settings)
    title = item.get("title") if isinstance(item.get("title"), str) else chat.get("title")
    return {"title": _title(title if title is not None else "Imported chat", f"{where}.title"),
            "created_at": _time(item.get("created_at"), f"{where}.created_at"),
            "updated_at": _time(item.get("updated_at"), f"{where}.updated_at"),
            "settings": conversation_settings, "messages": _checked_messages(messages, where, settings),
            "leaf": leaf if leaf >= 0 else (len(messages) - 1 if messages else None)}


def _open_webui_tree(chat: dict, where: str) -> tuple[list, list[int | None], int | None]:
    """Every message of history's tree, parents before children (siblings oldest first), each one's
    parent's index and the index of history.currentId; with no tree, chat.messages as one thread."""
    history = chat.get("history")
    if not (isinstance(history, dict) and isinstance(history.get("messages"), dict) and history.get("currentId")):
        thread = _list(chat.get("messages"), f"{where}.chat.messages")
        return thread, [index - 1 if index else None for index in range(len(thread))], len(thread) - 1
    tree = history["messages"]
    if len(tree) > 100_000:
        raise _bad(f"{where}.chat.history", "holds more than 100000 messages")
    nodes = {}
    for key, value in tree.items():
        nodes[key] = _object(value, f"{where}.chat.history.messages[{str(key)[:40]!r}]")
    children: dict = {}
    for key, node in nodes.items():
        parent = node.get("parentId")
        if parent is not None and parent not in nodes:
            raise _bad(f"{where}.chat.history.messages[{str(key)[:40]!r}].parentId", "names no message of the tree")
        children.setdefault(parent, []).append(key)
    order, parents, index_of = [], [], {}
    pending = sorted(children.get(None, []), key=lambda key: _timestamp(nodes[key]), reverse=True)
    parent_of = {key: None for key in pending}
    while pending:
        key = pending.pop()
        index_of[key] = len(order)
        order.append(nodes[key])
        parents.append(parent_of[key])
        for child in sorted(children.get(key, []), key=lambda child: _timestamp(nodes[child]), reverse=True):
            parent_of[child] = index_of[key]
            pending.append(child)
    if len(order) != len(nodes) or history["currentId"] not in index_of:
        raise _bad(f"{where}.chat.history", "is not a tree of messages reaching currentId")
    return order, parents, index_of[history["currentId"]]


def _timestamp(node: dict) -> float:
    value = node.get("timestamp")
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _checked_messages(messages: list[dict], where: str, settings: Settings) -> list[dict]:
    if len(messages) > settings.max_messages:
        raise _bad(f"{where}.messages", f"holds {len(messages)} messages; at most {settings.max_messages} "
                                        "(JARVIS_MAX_MESSAGES)")
    return messages


def _conversation_settings(value, where: str, settings: Settings) -> dict | None:
    if value is None:
        return None
    from jarvis.chat_settings import checked

    try:
        return checked(value, settings)
    except ApiError as error:
        raise _bad(where, error.message) from None


def _title(value, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(where, "must be a non-empty string")
    return " ".join(value.split())[:200]


def _text(value, where: str, limit: int) -> str:
    if not isinstance(value, str):
        raise _bad(where, "must be a string")
    if len(value) > limit:
        raise _bad(where, f"holds {len(value)} characters; at most {limit}")
    return value


def _tool_steps(value, where: str, settings: Settings) -> list | None:
    """An answer's tool steps, each field checked (at most JARVIS_MAX_TOOL_STEPS + 1 steps, 16 calls each)."""
    if value is None:
        return None
    steps = _list(value, where)
    if len(steps) > settings.max_tool_steps + 1:
        raise _bad(where, f"holds {len(steps)} steps; at most {settings.max_tool_steps + 1} (JARVIS_MAX_TOOL_STEPS)")
    checked = []
    for number, step in enumerate(steps):
        place = f"{where}[{number}]"
        step = _object(step, place)
        offsets = [step.get(name, 0) for name in ("at", "reasoning_at")]
        if not all(isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0 for offset in offsets):
            raise _bad(place, "must have whole numbers 'at' and 'reasoning_at', 0 or more")
        calls = _list(step.get("calls"), f"{place}.calls")
        if len(calls) > 16:
            raise _bad(f"{place}.calls", "holds more than 16 calls")
        checked.append({"at": offsets[0], "reasoning_at": offsets[1], "calls": [
            _tool_call(call, f"{place}.calls[{index}]", settings) for index, call in enumerate(calls)]})
    return checked or None


def _tool_call(call, where: str, settings: Settings) -> dict:
    call = _object(call, where)
    checked = {"id": _text(call.get("id"), f"{where}.id", 100), "name": _text(call.get("name"), f"{where}.name", 200),
               "server": _optional_text(call.get("server"), f"{where}.server", 200),
               "arguments": _text(call.get("arguments", ""), f"{where}.arguments", 65536),
               "result": _optional_text(call.get("result"), f"{where}.result", settings.tool_result_max_bytes + 200),
               "is_error": call.get("is_error", False)}
    if not isinstance(checked["is_error"], bool):
        raise _bad(f"{where}.is_error", "must be true or false")
    duration = call.get("duration_ms")
    if duration is not None:
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not 0 <= duration < 1e9:
            raise _bad(f"{where}.duration_ms", "must be a number of milliseconds or null")
        checked["duration_ms"] = duration
    return checked


def _optional_text(value, where: str, limit: int) -> str | None:
    return None if value is None else _text(value, where, limit)


def _time(value, where: str) -> float:
    """Seconds since 1970; milliseconds (Open WebUI writes both) are recognised; absent: now."""
    if value is None:
        return time.time()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise _bad(where, "must be a number of seconds since 1970")
    while value > 1e11:  # milliseconds, microseconds, nanoseconds
        value /= 1000
    return float(value)


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _bad(where, "must be an object")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise _bad(where, "must be a list")
    return value


def _bad(where: str, problem: str) -> ApiError:
    return ApiError(400, f"The file's {where} {problem}; nothing was imported", code="invalid_import",
                    param=where or None)
