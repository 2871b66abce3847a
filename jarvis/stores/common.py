"""What both stores need around their SQL: text both can hold, search words and results, rows of an
import, settings and messages as the API shows them, the cookie secret kept in a file."""

from __future__ import annotations

import json
import os
import re
import secrets

MATCH_START, MATCH_END = "\ue000", "\ue001"  # around each match in a search snippet (private-use characters)
_WORD = re.compile(r"\w+", re.UNICODE)


def storable(text: str) -> str:
    """Text both stores can hold: UTF-16 halves that arrived apart are paired again (an emoji split across
    two upstream events), a lone half becomes U+FFFD, and so does NUL (PostgreSQL's text refuses it).
    Model output must never make a write fail."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def search_words(query: str) -> list[str]:
    """The words a search looks for: letters and digits only, so no query syntax reaches the database."""
    return _WORD.findall(query.lower())[:16]


def like_escaped(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_results(titles, rows, words: list[str], limit: int) -> list[dict]:
    """One result per conversation: its best message match (rows come best first), else its title."""
    results: dict[str, dict] = {}
    for row in rows:
        results.setdefault(row["conversation_id"], {
            "conversation_id": row["conversation_id"], "title": row["title"], "message_id": row["message_id"],
            "snippet": row["snippet"]})
    for row in titles:
        results.setdefault(row["conversation_id"], {
            "conversation_id": row["conversation_id"], "title": row["title"], "message_id": None,
            "snippet": _marked(row["title"], words)})
    return list(results.values())[:limit]


def _marked(text: str, words: list[str]) -> str:
    """`text` with every occurrence of the words between MATCH_START and MATCH_END (for titles)."""
    pattern = re.compile("|".join(re.escape(word) for word in sorted(words, key=len, reverse=True)), re.IGNORECASE)
    return pattern.sub(lambda match: MATCH_START + match.group(0) + MATCH_END, text)


def import_rows(conversation: dict) -> tuple[str, tuple, list[tuple]]:
    """An imported conversation's new id, its row and its messages' rows, in the column order the store
    inserts: conversations (id, title, created_at, updated_at, settings) and messages (conversation_id,
    role, content, reasoning, status, error, model, stats, tools, created_at, updated_at). Its tree is in the
    messages' `parent` (an index in the list, before it) and the conversation's `leaf` (an index)."""
    conversation_id = secrets.token_urlsafe(16)
    row = (conversation_id, storable(conversation["title"]), conversation["created_at"],
           conversation["updated_at"], settings_json(conversation["settings"]))
    messages = [(conversation_id, message["role"], storable(message["content"]), storable(message["reasoning"]),
                 message["status"], message["error"] and storable(message["error"]), message["model"],
                 None if message["stats"] is None else json.dumps(message["stats"]), tools_json(message.get("tools")),
                 message["created_at"], message["created_at"]) for message in conversation["messages"]]
    return conversation_id, row, messages


def tools_json(tools: list | None) -> str | None:
    """An answer's tool steps as stored (none: NULL)."""
    return json.dumps(tools) if tools else None


def tools_of(stored: str | None) -> list | None:
    return json.loads(stored) if stored else None


def settings_json(settings: dict | None) -> str | None:
    return None if settings is None else json.dumps(settings)


def settings_of(stored: str | None) -> dict | None:
    return json.loads(stored) if stored else None


def branch_of(messages: list[dict], leaf_id: int | None) -> list[dict]:
    """A conversation's current branch: its messages (sorted by id) from the root down to `leaf_id` (the
    newest message when the leaf is unknown), each given `versions`: its own id and its siblings', oldest
    first (one id: no other version)."""
    by_id = {message["id"]: message for message in messages}
    children = children_of(messages)
    leaf = leaf_id if leaf_id in by_id else (messages[-1]["id"] if messages else None)
    branch: list[dict] = []
    while leaf is not None and leaf in by_id and len(branch) < len(messages):  # (a cycle cannot hang it)
        message = by_id[leaf]
        branch.append(message)
        leaf = message["parent_id"]
    branch.reverse()
    for message in branch:
        message["versions"] = children.get(message["parent_id"], [message["id"]])
    return branch


def children_of(messages: list[dict]) -> dict[int | None, list[int]]:
    """Each message's children's ids, oldest first (the roots under None)."""
    children: dict[int | None, list[int]] = {}
    for message in messages:
        children.setdefault(message["parent_id"], []).append(message["id"])
    return children


def newest_descendant(messages: list[dict], message_id: int) -> int:
    """Down from `message_id`, its newest child at each step: where the branch through it ends."""
    children = children_of(messages)
    seen = {message_id}
    while children.get(message_id):
        message_id = children[message_id][-1]
        if message_id in seen:
            break
        seen.add(message_id)
    return message_id


def message_of(row) -> dict:
    """A message row as the API shows it: stats parsed, flags as booleans."""
    message = dict(row)
    message["stats"] = json.loads(message["stats"]) if message["stats"] else None
    message["reasoning_moved"] = bool(message["reasoning_moved"])
    for name in ("tools", "attachments"):
        if name in message:
            message[name] = tools_of(message[name])
    return message


def file_secret(data_dir: str) -> str:
    """The cookie-signing secret, generated once and kept (mode 0600) in `data_dir`."""
    path = os.path.join(data_dir, "secret_key")
    try:
        with open(path) as file:
            return file.read().strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(48)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another worker won the race
        with open(path) as file:
            return file.read().strip()
    with os.fdopen(descriptor, "w") as file:
        file.write(secret)
    return secret
