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

import contextlib
import json
import os
import re
import secrets
import sqlite3
import time
from typing import Protocol

from gevent.event import AsyncResult
from gevent.threadpool import ThreadPool

from jarvis import leases

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
    (  # 2 -> 3: answers in progress; at most one per conversation, whichever worker runs it; and whether
       # an answer's first content turned out to be reasoning (a lone </think>), for pages that re-attach
        "ALTER TABLE messages ADD COLUMN reasoning_moved INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE runs (
            message_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
            conversation_id TEXT NOT NULL UNIQUE REFERENCES conversations(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            lease_expires_at REAL NOT NULL,
            stop_requested INTEGER NOT NULL DEFAULT 0,
            watched_at REAL
        )""",
    ),
    (  # 3 -> 4: the page's sign-in sessions, so that signing out revokes one everywhere
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            key_check TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
    ),
    (  # 4 -> 5: a conversation's own system prompt and sampling parameters (JSON; NULL: the server's defaults)
        "ALTER TABLE conversations ADD COLUMN settings TEXT",
    ),
    (  # 5 -> 6: full-text search over messages that have ended (a streaming answer is indexed when it ends,
       # not at each save), kept in step by triggers
        """CREATE VIRTUAL TABLE messages_search USING fts5(content, content='messages', content_rowid='id',
            tokenize='unicode61 remove_diacritics 2')""",
        """CREATE TRIGGER messages_search_insert AFTER INSERT ON messages WHEN new.status != 'streaming' BEGIN
            INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_search_unindex AFTER UPDATE ON messages WHEN old.status != 'streaming' BEGIN
            INSERT INTO messages_search (messages_search, rowid, content) VALUES ('delete', old.id, old.content);
        END""",
        """CREATE TRIGGER messages_search_index AFTER UPDATE ON messages WHEN new.status != 'streaming' BEGIN
            INSERT INTO messages_search (rowid, content) VALUES (new.id, new.content);
        END""",
        """CREATE TRIGGER messages_search_delete AFTER DELETE ON messages WHEN old.status != 'streaming' BEGIN
            INSERT INTO messages_search (messages_search, rowid, content) VALUES ('delete', old.id, old.content);
        END""",
        "INSERT INTO messages_search (rowid, content) SELECT id, content FROM messages WHERE status != 'streaming'",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(RuntimeError):
    """The database cannot be used by this version of Jarvis."""


class NoSuchConversation(LookupError):
    """The conversation does not exist (any more)."""


class ConversationBusy(RuntimeError):
    """The conversation already has an answer running, on this worker or another."""


INTERRUPTED_NOTE = "The server that was writing this answer stopped before it finished"


class ConversationStore(Protocol):
    def list_conversations(self) -> list[dict]: ...
    def create_conversation(self, title: str, settings: dict | None = None) -> dict: ...
    def update_conversation_settings(self, conversation_id: str, settings: dict) -> bool: ...
    def import_conversations(self, conversations: list[dict]) -> list[str]: ...
    def search(self, query: str, limit: int = 50) -> list[dict]: ...
    def get_conversation(self, conversation_id: str) -> dict | None: ...
    def rename_conversation(self, conversation_id: str, title: str) -> bool: ...
    def delete_conversation(self, conversation_id: str) -> bool: ...
    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int: ...
    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False) -> bool: ...
    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False): ...
    def delete_messages_from(self, conversation_id: str, message_id: int) -> None: ...
    def start_answer(self, conversation_id: str, *, owner: str, user_content: str | None = None,
                     delete_from: int | None = None, history_before: int | None = None, title: str | None = None,
                     model: str | None = None, trace_id: str | None = None) -> tuple[int, list[dict]]: ...
    def delete_messages_between(self, conversation_id: str, first: int, before: int) -> None: ...
    def finish_answer_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                            reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False): ...
    def tick_runs(self, owner: str, *, renew: bool) -> dict[int, tuple[bool, float | None]]: ...
    def request_stop(self, conversation_id: str) -> bool: ...
    def follow(self, message_id: int, *, touch: bool) -> dict | None: ...
    def listen(self, heard) -> None: ...
    def subscribe(self, message_id: int): ...
    def unsubscribe(self, message_id: int, event) -> None: ...
    def create_session(self, key_check: str) -> str: ...
    def session_valid(self, session_id: str, key_check: str, max_age: float) -> bool: ...
    def delete_session(self, session_id: str) -> None: ...
    def secret(self) -> str: ...
    def close(self) -> None: ...


def open_store(settings) -> ConversationStore:
    """PostgreSQL when JARVIS_DATABASE_URL is set (imported only then, after gevent's patch), else SQLite."""
    if settings.database_url:
        from jarvis.pgstore import PostgresStore

        return PostgresStore(settings.database_url, settings.store_busy_seconds)
    return SQLiteStore(settings.data_dir, settings.store_busy_seconds)


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, "jarvis.sqlite3")


def recover_interrupted(data_dir: str) -> int:
    """At server start: answers left streaming by a process that is gone are marked interrupted."""
    path = database_path(data_dir)
    if not os.path.exists(path):
        return 0
    connection = _connect(path)
    try:
        with _transaction(connection):
            return _reap_dead_runs(connection, None, time.time())
    finally:
        connection.close()


@contextlib.contextmanager
def _transaction(connection: sqlite3.Connection):
    """One write transaction (the connection autocommits otherwise); IMMEDIATE takes the lock up front,
    so two workers claiming the same conversation take turns instead of failing mid-way."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def _reap_dead_runs(db: sqlite3.Connection, conversation_id: str | None, now: float) -> int:
    """Mark answers whose run is dead (owner gone, lease expired, or no run at all) interrupted."""
    where, args = ("WHERE conversation_id = ?", (conversation_id,)) if conversation_id else ("", ())
    dead = [row[0] for row in db.execute(f"SELECT message_id, owner, lease_expires_at FROM runs {where}", args)
            if not leases.alive(row[1], row[2], now)]
    for message_id in dead:
        db.execute("DELETE FROM runs WHERE message_id = ?", (message_id,))
    scope = "AND conversation_id = ?" if conversation_id else ""
    return db.execute(f"UPDATE messages SET status = 'interrupted', error = ?, updated_at = ? WHERE status = "
                      f"'streaming' {scope} AND id NOT IN (SELECT message_id FROM runs)",
                      (INTERRUPTED_NOTE, now, *args)).rowcount


def _connect(path: str, busy_seconds: float = 10.0) -> sqlite3.Connection:
    # busy_seconds: how long a write waits for a lock another process holds, then fails.
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_seconds)
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


def _outcome(function, args) -> tuple[bool, object]:
    """(True, result) or (False, the exception it raised): run on the store's thread."""
    try:
        return True, function(*args)
    except Exception as error:  # every one goes back to the caller, and is raised there
        return False, error


class SQLiteStore:
    def __init__(self, data_dir: str, busy_seconds: float = 10.0):
        os.makedirs(data_dir, exist_ok=True)
        self.path = database_path(data_dir)
        self.pool = ThreadPool(1)
        self.connection = self._run(_connect, self.path, busy_seconds)

    def _run(self, function, *args):
        """`function(*args)` on the store's thread; its result, or its exception raised here."""
        return self._spawn(function, *args).get()

    def _spawn(self, function, *args) -> AsyncResult:
        """`function(*args)` on the store's thread, its outcome in the AsyncResult. An exception is caught
        on the thread and handed over: gevent's pool would also print every one as a traceback on stderr
        (its hub's handle_error), and a locked database is an expected, one-line event."""
        result = AsyncResult()

        def settle(done):
            succeeded, value = done.value if done.successful() else (False, done.exception)
            if succeeded:
                result.set(value)
            else:
                result.set_exception(value)

        self.pool.spawn(_outcome, function, args).rawlink(settle)
        return result

    def close(self) -> None:
        """Close the database and stop the store's thread (tests build many stores)."""
        self._run(self.connection.close)
        self.pool.kill()

    # -- conversations ---------------------------------------------------------

    def list_conversations(self) -> list[dict]:
        return self._run(self._list_conversations)

    def _list_conversations(self) -> list[dict]:
        with _transaction(self.connection) as db:
            _reap_dead_runs(db, None, time.time())
            rows = db.execute("SELECT id, title, created_at, updated_at, EXISTS (SELECT 1 FROM runs WHERE "
                              "runs.conversation_id = conversations.id) AS running FROM conversations "
                              "ORDER BY updated_at DESC").fetchall()
        return [{**dict(row), "running": bool(row["running"])} for row in rows]

    def create_conversation(self, title: str, settings: dict | None = None) -> dict:
        conversation = {"id": secrets.token_urlsafe(16), "title": storable(title), "created_at": time.time(),
                        "settings": _settings_json(settings)}
        conversation["updated_at"] = conversation["created_at"]
        self._run(self._execute, "INSERT INTO conversations (id, title, created_at, updated_at, settings) "
                                 "VALUES (:id, :title, :created_at, :updated_at, :settings)", conversation)
        return {**conversation, "settings": settings}

    def update_conversation_settings(self, conversation_id: str, settings: dict) -> bool:
        return self._run(self._execute, "UPDATE conversations SET settings = ? WHERE id = ?",
                         (_settings_json(settings), conversation_id)) > 0

    def import_conversations(self, conversations: list[dict]) -> list[str]:
        """Add checked conversations (jarvis.exchange) with new ids, all in one transaction; their ids."""
        return self._run(self._import_conversations, conversations)

    def _import_conversations(self, conversations: list[dict]) -> list[str]:
        ids = []
        with _transaction(self.connection) as db:
            for conversation in conversations:
                conversation_id, row, messages = import_rows(conversation)
                db.execute("INSERT INTO conversations (id, title, created_at, updated_at, settings) VALUES "
                           "(?, ?, ?, ?, ?)", row)
                db.executemany(
                    "INSERT INTO messages (conversation_id, role, content, reasoning, status, error, model, stats, "
                    "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", messages)
                ids.append(conversation_id)
        return ids

    def search(self, query: str, limit: int = 50) -> list[dict]:
        """Conversations whose title or ended messages hold every word of `query` (the last one as a
        prefix), best first: {conversation_id, title, message_id (None: the title), snippet} with the
        matches between MATCH_START and MATCH_END."""
        words = search_words(query)
        if not words:
            return []
        return self._run(self._search, words, limit)

    def _search(self, words: list[str], limit: int) -> list[dict]:
        expression = " ".join(f'"{word.replace(chr(34), chr(34) * 2)}"' for word in words) + "*"
        rows = self.connection.execute(
            "SELECT messages.id AS message_id, messages.conversation_id, conversations.title, "
            f"snippet(messages_search, 0, '{MATCH_START}', '{MATCH_END}', '…', 16) AS snippet "
            "FROM messages_search JOIN messages ON messages.id = messages_search.rowid "
            "JOIN conversations ON conversations.id = messages.conversation_id "
            "WHERE messages_search MATCH ? ORDER BY rank LIMIT ?", (expression, limit)).fetchall()
        titles = self.connection.execute(
            "SELECT id AS conversation_id, title FROM conversations WHERE "
            + " AND ".join(["title LIKE ? ESCAPE '\\'"] * len(words)) + " ORDER BY updated_at DESC LIMIT ?",
            (*[f"%{like_escaped(word)}%" for word in words], limit)).fetchall()
        return search_results(titles, rows, words, limit)

    def get_conversation(self, conversation_id: str) -> dict | None:
        return self._run(self._get_conversation, conversation_id)

    def _get_conversation(self, conversation_id: str) -> dict | None:
        with _transaction(self.connection) as db:
            _reap_dead_runs(db, conversation_id, time.time())
        row = self.connection.execute("SELECT id, title, created_at, updated_at, settings, EXISTS (SELECT 1 FROM "
                                      "runs WHERE runs.conversation_id = conversations.id) AS running FROM "
                                      "conversations WHERE id = ?", (conversation_id,)).fetchone()
        if row is None:
            return None
        messages = self.connection.execute(
            "SELECT id, role, content, reasoning, reasoning_moved, status, error, model, trace_id, stats, created_at, "
            "updated_at FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)).fetchall()
        return {**dict(row), "running": bool(row["running"]), "settings": _settings_of(row["settings"]),
                "messages": [_message(message) for message in messages]}

    def rename_conversation(self, conversation_id: str, title: str) -> bool:
        return self._run(self._execute, "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                         (storable(title), time.time(), conversation_id)) > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._run(self._execute, "DELETE FROM conversations WHERE id = ?", (conversation_id,)) > 0

    # -- messages ----------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int:
        return self._run(self._add_message, conversation_id, role, storable(content), status, model, trace_id)

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
                       reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False) -> bool:
        return self._run(self._update_message, message_id, content, status, error, reasoning, stats,
                         reasoning_moved)

    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False):
        """Queue the update without waiting; writes run in order on the store's thread.
        Returns an AsyncResult whose value says whether the message still existed."""
        return self._spawn(self._update_message, message_id, content, status, error, reasoning, stats,
                               reasoning_moved)

    def _update_message(self, message_id: int, content: str, status: str, error: str | None, reasoning: str = "",
                        stats: dict | None = None, reasoning_moved: bool = False) -> bool:
        # A save while streaming never brings back an answer that already ended (or was found dead).
        only_while_streaming = " AND status = 'streaming'" if status == "streaming" else ""
        return self._execute(
            "UPDATE messages SET content = ?, reasoning = ?, reasoning_moved = ?, status = ?, error = ?, stats = ?, "
            f"updated_at = ? WHERE id = ?{only_while_streaming}",
            (storable(content), storable(reasoning), int(reasoning_moved), status, error and storable(error),
             None if stats is None else json.dumps(stats), time.time(), message_id)) > 0

    def delete_messages_from(self, conversation_id: str, message_id: int) -> None:
        self._run(self._execute, "DELETE FROM messages WHERE conversation_id = ? AND id >= ?",
                  (conversation_id, message_id))

    # -- runs: answers in progress, at most one per conversation, whichever worker runs it ----------

    def start_answer(self, conversation_id: str, *, owner: str, user_content: str | None = None,
                     delete_from: int | None = None, history_before: int | None = None, title: str | None = None,
                     model: str | None = None, trace_id: str | None = None) -> tuple[int, list[dict]]:
        """Claim the conversation for a new answer, in one transaction: drop the messages from
        `delete_from` on (an edit), add the user's message, the answer (streaming) and its run. Returns
        the answer's id and the history before it (only messages before `history_before`, when given: a
        regenerate leaves the answer it replaces in place until the new one has started). Raises
        NoSuchConversation or ConversationBusy (a live run exists, on any worker), changing nothing."""
        return self._run(self._start_answer, conversation_id, owner, user_content and storable(user_content),
                         delete_from, history_before, title and storable(title), model, trace_id)

    def _start_answer(self, conversation_id, owner, user_content, delete_from, history_before, title, model,
                      trace_id):
        now = time.time()
        with _transaction(self.connection) as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                raise NoSuchConversation(conversation_id)
            _reap_dead_runs(db, conversation_id, now)
            if db.execute("SELECT 1 FROM runs WHERE conversation_id = ?", (conversation_id,)).fetchone():
                raise ConversationBusy(conversation_id)
            if delete_from is not None:
                db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, delete_from))
            if user_content is not None:
                db.execute("INSERT INTO messages (conversation_id, role, content, status, created_at, updated_at) "
                           "VALUES (?, 'user', ?, 'complete', ?, ?)", (conversation_id, user_content, now, now))
            message_id = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, trace_id, created_at, "
                "updated_at) VALUES (?, 'assistant', '', 'streaming', ?, ?, ?, ?)",
                (conversation_id, model, trace_id, now, now)).lastrowid
            db.execute("INSERT INTO runs (message_id, conversation_id, owner, lease_expires_at) VALUES (?, ?, ?, ?)",
                       (message_id, conversation_id, owner, now + leases.LEASE_SECONDS))
            db.execute("UPDATE conversations SET title = coalesce(?, title), updated_at = ? WHERE id = ?",
                       (title, now, conversation_id))
            history = db.execute("SELECT id, role, content FROM messages WHERE conversation_id = ? AND id < ? "
                                 "ORDER BY id", (conversation_id, history_before or message_id)).fetchall()
        return message_id, [dict(row) for row in history]

    def delete_messages_between(self, conversation_id: str, first: int, before: int) -> None:
        """Drop the messages from `first` up to (not including) `before`: what a regenerate replaced."""
        self._run(self._execute, "DELETE FROM messages WHERE conversation_id = ? AND id >= ? AND id < ?",
                  (conversation_id, first, before))

    def finish_answer_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                            reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False):
        """The answer's last save and the end of its run, in one write, queued (an AsyncResult of whether
        the answer still existed)."""
        return self._spawn(self._finish_answer, message_id, content, status, error, reasoning, stats,
                               reasoning_moved)

    def _finish_answer(self, message_id, content, status, error, reasoning, stats, reasoning_moved) -> bool:
        with _transaction(self.connection):
            self.connection.execute("DELETE FROM runs WHERE message_id = ?", (message_id,))
            return self._update_message(message_id, content, status, error, reasoning, stats, reasoning_moved)

    def tick_runs(self, owner: str, *, renew: bool) -> dict[int, tuple[bool, float | None]]:
        """For the runs `owner` holds: renew their leases (when `renew`) and report, per answer id,
        (stop requested, last watched from elsewhere). An answer missing from it lost its run
        (its conversation was deleted, or it was found dead)."""
        return self._run(self._tick_runs, owner, renew)

    def _tick_runs(self, owner, renew):
        if renew:
            self.connection.execute("UPDATE runs SET lease_expires_at = ? WHERE owner = ?",
                                    (time.time() + leases.LEASE_SECONDS, owner))
        rows = self.connection.execute("SELECT message_id, stop_requested, watched_at FROM runs WHERE owner = ?",
                                       (owner,)).fetchall()
        return {row[0]: (bool(row[1]), row[2]) for row in rows}

    def request_stop(self, conversation_id: str) -> bool:
        """Ask whichever worker runs the conversation's answer to stop it; False when none runs."""
        return self._run(self._request_stop, conversation_id)

    def _request_stop(self, conversation_id):
        with _transaction(self.connection) as db:
            _reap_dead_runs(db, conversation_id, time.time())
            return db.execute("UPDATE runs SET stop_requested = 1 WHERE conversation_id = ?",
                              (conversation_id,)).rowcount > 0

    def follow(self, message_id: int, *, touch: bool) -> dict | None:
        """An answer as saved, for a page following it from another worker: its text, status and whether
        its run lives (a dead one is marked interrupted here). `touch` tells the owner someone watches."""
        return self._run(self._follow, message_id, touch)

    def _follow(self, message_id, touch):
        now = time.time()
        with _transaction(self.connection) as db:
            row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                return None
            _reap_dead_runs(db, row[0], now)
            if touch:
                db.execute("UPDATE runs SET watched_at = ? WHERE message_id = ?", (now, message_id))
            message = db.execute("SELECT id, conversation_id, role, content, reasoning, reasoning_moved, status, "
                                 "error, stats, trace_id FROM messages WHERE id = ?", (message_id,)).fetchone()
        return _message(message)

    # -- the page's sign-in sessions -------------------------------------------------------------

    def create_session(self, key_check: str) -> str:
        """A new session for a page that presented the key; its id is the cookie's only content."""
        session_id = secrets.token_urlsafe(32)
        self._run(self._execute, "INSERT INTO sessions (id, key_check, created_at) VALUES (?, ?, ?)",
                  (session_id, key_check, time.time()))
        return session_id

    def session_valid(self, session_id: str, key_check: str, max_age: float) -> bool:
        """Whether the session exists, is younger than `max_age` seconds, and was made with today's key."""
        row = self._run(lambda: self.connection.execute(
            "SELECT key_check, created_at FROM sessions WHERE id = ?", (session_id,)).fetchone())
        return row is not None and secrets.compare_digest(row[0], key_check) and time.time() - row[1] < max_age

    def delete_session(self, session_id: str) -> None:
        self._run(self._execute, "DELETE FROM sessions WHERE id = ?", (session_id,))

    def listen(self, heard) -> None:
        """Nothing to hear: one machine's workers see each other's Stops through the tick."""

    def subscribe(self, message_id: int) -> None:
        """No announcements of saves: a page following from another worker polls."""

    def unsubscribe(self, message_id: int, event) -> None:
        pass

    def secret(self) -> str:
        """The cookie-signing secret: generated once and kept (mode 0600) beside the database."""
        return _file_secret(os.path.dirname(self.path))

    def _execute(self, sql: str, parameters) -> int:
        return self.connection.execute(sql, parameters).rowcount

    def schema_version(self) -> int:
        return self._run(lambda: self.connection.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        return self._run(lambda: self.connection.execute("PRAGMA journal_mode").fetchone()[0])


def storable(text: str) -> str:
    """Text both stores can hold: UTF-16 halves that arrived apart are paired again (an emoji split across
    two upstream events), a lone half becomes U+FFFD, and so does NUL (PostgreSQL's text refuses it).
    Model output must never make a write fail."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if text.isascii():
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


MATCH_START, MATCH_END = "\ue000", "\ue001"  # around each match in a search snippet (private-use characters)
_WORD = re.compile(r"\w+", re.UNICODE)


def search_words(query: str) -> list[str]:
    """The words a search looks for: letters and digits only, so no query syntax reaches the database."""
    return _WORD.findall(query.lower())[:16]


def like_escaped(word: str) -> str:
    return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def search_results(titles, rows, words: list[str], limit: int) -> list[dict]:
    results = [{"conversation_id": row["conversation_id"], "title": row["title"], "message_id": None,
                "snippet": _marked(row["title"], words)} for row in titles]
    results += [{"conversation_id": row["conversation_id"], "title": row["title"], "message_id": row["message_id"],
                 "snippet": row["snippet"]} for row in rows]
    return results[:limit]


def _marked(text: str, words: list[str]) -> str:
    """`text` with every occurrence of the words between MATCH_START and MATCH_END (for titles)."""
    pattern = re.compile("|".join(re.escape(word) for word in sorted(words, key=len, reverse=True)), re.IGNORECASE)
    return pattern.sub(lambda match: MATCH_START + match.group(0) + MATCH_END, text)


def import_rows(conversation: dict) -> tuple[str, tuple, list[tuple]]:
    """An imported conversation's new id, its row and its messages' rows, in the column order both stores insert:
    conversations (id, title, created_at, updated_at, settings) and messages (conversation_id, role,
    content, reasoning, status, error, model, stats, created_at, updated_at)."""
    conversation_id = secrets.token_urlsafe(16)
    row = (conversation_id, storable(conversation["title"]), conversation["created_at"],
           conversation["updated_at"], _settings_json(conversation["settings"]))
    messages = [(conversation_id, message["role"], storable(message["content"]), storable(message["reasoning"]),
                 message["status"], message["error"] and storable(message["error"]), message["model"],
                 None if message["stats"] is None else json.dumps(message["stats"]), message["created_at"],
                 message["created_at"]) for message in conversation["messages"]]
    return conversation_id, row, messages


def _settings_json(settings: dict | None) -> str | None:
    return None if settings is None else json.dumps(settings)


def _settings_of(stored: str | None) -> dict | None:
    return json.loads(stored) if stored else None


def _file_secret(data_dir: str) -> str:
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


def _message(row: sqlite3.Row) -> dict:
    message = dict(row)
    message["stats"] = json.loads(message["stats"]) if message["stats"] else None
    message["reasoning_moved"] = bool(message["reasoning_moved"])
    return message
