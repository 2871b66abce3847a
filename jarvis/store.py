"""Conversations that survive Stop, reloads, closed tabs and crashed workers.

`ConversationStore` is the interface the page API uses; `SQLiteStore` is the
implementation: SQLite in WAL mode under JARVIS_DATA_DIR. Every call runs on
one dedicated native thread, so a slow disk (a WAL checkpoint, an fsync)
never blocks the gevent hub; the hub waits cooperatively for the result.

An assistant message moves through: streaming -> complete | stopped | error,
or -> interrupted when a new server start finds it still streaming. It keeps
its content, a thinking model's reasoning (never sent upstream again) and the
stats shown under it.

The schema is versioned (`PRAGMA user_version`) and every open brings an older
database up to date in place (`MIGRATIONS`); a newer one is refused.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from typing import Protocol

from gevent.threadpool import ThreadPool

STATUSES = ("streaming", "complete", "stopped", "error", "interrupted")

# The schema, as the steps that build it: step N takes a database from version N to N + 1
# (`PRAGMA user_version`). A database made before versioning reads as version 0 and has the
# tables of step 0 already, which is why that step says IF NOT EXISTS. Never edit a step that
# has shipped; add one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1: conversations and messages, as Jarvis first shipped them
        """CREATE TABLE IF NOT EXISTS conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete',
            error TEXT,
            model TEXT,
            trace_id TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages(conversation_id, id)",
    ),
    (  # 1 -> 2: a thinking model's reasoning, and the numbers shown under an answer (JSON)
        "ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE messages ADD COLUMN stats TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used by this version of Jarvis."""


class ConversationStore(Protocol):
    def list_conversations(self) -> list[dict]: ...
    def create_conversation(self, title: str) -> dict: ...
    def get_conversation(self, conversation_id: str) -> dict | None: ...
    def rename_conversation(self, conversation_id: str, title: str) -> bool: ...
    def delete_conversation(self, conversation_id: str) -> bool: ...
    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int: ...
    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None) -> bool: ...
    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None): ...
    def delete_messages_from(self, conversation_id: str, message_id: int) -> None: ...
    def close(self) -> None: ...


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, "jarvis.sqlite3")


def recover_interrupted(data_dir: str) -> int:
    """At server start: answers still `streaming` belong to a dead process; mark them interrupted."""
    path = database_path(data_dir)
    if not os.path.exists(path):
        return 0
    connection = _connect(path)
    try:
        with connection:
            cursor = connection.execute(
                "UPDATE messages SET status = 'interrupted', updated_at = ? WHERE status = 'streaming'",
                (time.time(),))
        return cursor.rowcount
    finally:
        connection.close()


def _connect(path: str) -> sqlite3.Connection:
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    connection.execute("PRAGMA foreign_keys=ON")
    migrate(connection)
    return connection


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION in place, in one transaction; return the version found.

    BEGIN IMMEDIATE makes workers that start together take turns: the first migrates, the
    others find the work done.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        found = connection.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreError(f"the database was written by a newer Jarvis (schema {found}; this one knows "
                             f"{SCHEMA_VERSION}): run that version, or restore a backup of the database")
        for step in MIGRATIONS[found:]:
            for statement in step:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    return found


class SQLiteStore:
    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = database_path(data_dir)
        self.pool = ThreadPool(1)
        self.connection = self.pool.apply(_connect, (self.path,))

    def _run(self, function, *args):
        return self.pool.apply(function, args)

    def close(self) -> None:
        """Close the database and stop the store's thread (tests build many stores)."""
        self._run(self.connection.close)
        self.pool.kill()

    # -- conversations ---------------------------------------------------------

    def list_conversations(self) -> list[dict]:
        return self._run(self._list_conversations)

    def _list_conversations(self) -> list[dict]:
        rows = self.connection.execute(
            "SELECT id, title, created_at, updated_at FROM conversations ORDER BY updated_at DESC").fetchall()
        return [dict(row) for row in rows]

    def create_conversation(self, title: str) -> dict:
        conversation = {"id": secrets.token_urlsafe(16), "title": title, "created_at": time.time()}
        conversation["updated_at"] = conversation["created_at"]
        self._run(self._execute, "INSERT INTO conversations (id, title, created_at, updated_at) "
                                 "VALUES (:id, :title, :created_at, :updated_at)", conversation)
        return conversation

    def get_conversation(self, conversation_id: str) -> dict | None:
        return self._run(self._get_conversation, conversation_id)

    def _get_conversation(self, conversation_id: str) -> dict | None:
        row = self.connection.execute("SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?",
                                      (conversation_id,)).fetchone()
        if row is None:
            return None
        messages = self.connection.execute(
            "SELECT id, role, content, reasoning, status, error, model, trace_id, stats, created_at, updated_at "
            "FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        return {**dict(row), "messages": [_message(message) for message in messages]}

    def rename_conversation(self, conversation_id: str, title: str) -> bool:
        return self._run(self._execute, "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                         (title, time.time(), conversation_id)) > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._run(self._execute, "DELETE FROM conversations WHERE id = ?", (conversation_id,)) > 0

    # -- messages ----------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int:
        return self._run(self._add_message, conversation_id, role, content, status, model, trace_id)

    def _add_message(self, conversation_id, role, content, status, model, trace_id) -> int:
        now = time.time()
        with self.connection:
            cursor = self.connection.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, trace_id, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, model, trace_id, now, now))
            self.connection.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return cursor.lastrowid

    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None) -> bool:
        return self._run(self._update_message, message_id, content, status, error, reasoning, stats)

    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None):
        """Queue the update without waiting; writes run in order on the store's thread.
        Returns an AsyncResult whose value says whether the message still existed."""
        return self.pool.spawn(self._update_message, message_id, content, status, error, reasoning, stats)

    def _update_message(self, message_id: int, content: str, status: str, error: str | None, reasoning: str = "",
                        stats: dict | None = None) -> bool:
        return self._execute(
            "UPDATE messages SET content = ?, reasoning = ?, status = ?, error = ?, stats = ?, updated_at = ? "
            "WHERE id = ?", (content, reasoning, status, error, None if stats is None else json.dumps(stats),
                             time.time(), message_id)) > 0

    def delete_messages_from(self, conversation_id: str, message_id: int) -> None:
        self._run(self._execute, "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                  (conversation_id, message_id))

    def _execute(self, sql: str, parameters) -> int:
        return self.connection.execute(sql, parameters).rowcount

    def schema_version(self) -> int:
        return self._run(lambda: self.connection.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        return self._run(lambda: self.connection.execute("PRAGMA journal_mode").fetchone()[0])


def _message(row: sqlite3.Row) -> dict:
    message = dict(row)
    message["stats"] = json.loads(message["stats"]) if message["stats"] else None
    return message
