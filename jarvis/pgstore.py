"""The conversation store in PostgreSQL, shared by every Jarvis node that points at it (JARVIS_DATABASE_URL).

The same interface, statuses and schema versions as `SQLiteStore` (jarvis.store); the page API
cannot tell which one runs. What the nodes share goes through here: conversations, messages and
their live content, run leases, stop requests, sign-in sessions and the cookie-signing secret. A
Stop or a delete also sends a NOTIFY on the `jarvis` channel, which the owning node hears at once;
its tick (every 0.1 s) reads the same flags in the store, so a lost notification costs at most that.
Every save of an answer is announced the same way, so a page following it from another node reads it
at once rather than at its next poll.

Under gevent, calls run on the hub and wait cooperatively: psycopg chooses its `wait_poll` when
gevent has patched `select` (psycopg.waiting), so a query waits like any socket read. That holds only
when psycopg is first imported after the patch, so nothing imports this module in gunicorn's master:
the master migrates through `python -m jarvis.pgstore migrate` in a child process, and workers open
the store after gevent's patch. `waiting_strategy()` says which wait psycopg chose; /healthz shows it.

    python -m jarvis.pgstore migrate    # schema up to date and dead runs marked interrupted; exits 1
                                        # with a message on a newer schema or an unreachable server
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time

import gevent
import gevent.event
import gevent.queue
import psycopg
import psycopg.waiting
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool

from jarvis import leases
from jarvis.store import (
    INTERRUPTED_NOTE,
    MATCH_END,
    MATCH_START,
    SCHEMA_VERSION,
    ConversationBusy,
    NoSuchConversation,
    StoreError,
    import_rows,
    like_escaped,
    search_results,
    search_words,
    storable,
)

log = logging.getLogger(__name__)

CHANNEL = "jarvis"
_MIGRATION_LOCK = 0x6A617276  # "jarv": one node migrates, the others wait and find the work done

# Step N takes the schema from version N to N + 1, as jarvis.store.MIGRATIONS does for SQLite: the same
# versions mean the same tables. Never edit a step that has shipped; add one to both lists.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1: conversations and messages
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            title TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE messages (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            content TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'complete',
            error TEXT,
            model TEXT,
            trace_id TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX messages_by_conversation ON messages(conversation_id, id)",
    ),
    (  # 1 -> 2: a thinking model's reasoning, and the numbers shown under an answer (JSON)
        "ALTER TABLE messages ADD COLUMN reasoning TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE messages ADD COLUMN stats TEXT",
    ),
    (  # 2 -> 3: answers in progress, at most one per conversation, whichever node runs it
        "ALTER TABLE messages ADD COLUMN reasoning_moved BOOLEAN NOT NULL DEFAULT false",
        """CREATE TABLE runs (
            message_id BIGINT PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
            conversation_id TEXT NOT NULL UNIQUE REFERENCES conversations(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            lease_expires_at DOUBLE PRECISION NOT NULL,
            stop_requested BOOLEAN NOT NULL DEFAULT false,
            watched_at DOUBLE PRECISION
        )""",
        "CREATE INDEX runs_by_owner ON runs(owner)",
    ),
    (  # 3 -> 4: the page's sign-in sessions, and the secret that signs their cookie, the same on every node
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            key_check TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE TABLE shared_secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    (  # 4 -> 5: a conversation's own system prompt and sampling parameters (JSON; NULL: the server's defaults)
        "ALTER TABLE conversations ADD COLUMN settings TEXT",
    ),
    (  # 5 -> 6: full-text search over messages that have ended: the words kept in a column (computed when an
       # answer ends, not at each save), so that ranking never re-parses every matching message
        "ALTER TABLE messages ADD COLUMN search tsvector GENERATED ALWAYS AS (CASE WHEN status <> 'streaming' "
        "THEN to_tsvector('simple', content) END) STORED",
        "CREATE INDEX messages_search ON messages USING gin (search)",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION, "a schema step was added to one store and not the other"


def waiting_strategy() -> str:
    """The function psycopg waits with: wait_poll (gevent's, cooperative) in a worker; wait_c would block."""
    return psycopg.waiting.wait.__name__


def migrate(connection: psycopg.Connection) -> int:
    """Bring the database to SCHEMA_VERSION in one transaction; return the version found."""
    with connection.transaction(), connection.cursor(row_factory=tuple_row) as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        cursor.execute("CREATE TABLE IF NOT EXISTS jarvis_schema (version INTEGER NOT NULL)")
        row = cursor.execute("SELECT version FROM jarvis_schema").fetchone()
        found = row[0] if row else 0
        if found > SCHEMA_VERSION:
            raise StoreError(f"the database was written by a newer Jarvis (schema {found}; this one knows "
                             f"{SCHEMA_VERSION}): run that version, or restore a backup of the database")
        for step in MIGRATIONS[found:]:
            for statement in step:
                connection.execute(statement)
        if row is None:
            connection.execute("INSERT INTO jarvis_schema (version) VALUES (%s)", (SCHEMA_VERSION,))
        else:
            connection.execute("UPDATE jarvis_schema SET version = %s", (SCHEMA_VERSION,))
    return found


def _reap_dead_runs(db: psycopg.Connection, conversation_id: str | None, now: float) -> int:
    """Mark answers whose run is dead (lease expired, or its owner gone on this host) interrupted."""
    where, args = ("WHERE conversation_id = %s", (conversation_id,)) if conversation_id else ("", ())
    dead = [row["message_id"] for row in db.execute(
        f"SELECT message_id, owner, lease_expires_at FROM runs {where}", args)
        if not leases.alive(row["owner"], row["lease_expires_at"], now)]
    if dead:
        db.execute("DELETE FROM runs WHERE message_id = ANY(%s)", (dead,))
    scope = "AND conversation_id = %s" if conversation_id else ""
    return db.execute(f"UPDATE messages SET status = 'interrupted', error = %s, updated_at = %s WHERE status = "
                      f"'streaming' {scope} AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.message_id = messages.id)",
                      (INTERRUPTED_NOTE, now, *args)).rowcount


class _Serial:
    """Writes queued without waiting, run one at a time in order (a page's saves must not overtake each
    other); each gives an AsyncResult, like the SQLite store's thread."""

    def __init__(self):
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.worker: gevent.Greenlet | None = None

    def spawn(self, function, *args) -> gevent.event.AsyncResult:
        result = gevent.event.AsyncResult()
        self.queue.put((function, args, result))
        if self.worker is None or self.worker.dead:
            self.worker = gevent.spawn(self._work)
        return result

    def _work(self) -> None:
        while not self.queue.empty():
            function, args, result = self.queue.get()
            try:
                result.set(function(*args))
            except Exception as error:
                result.set_exception(error)

    def kill(self) -> None:
        if self.worker is not None:
            self.worker.kill()


class PostgresStore:
    def __init__(self, url: str, busy_seconds: float = 10.0, *, max_connections: int = 10):
        self.url = url
        self.busy_seconds = busy_seconds
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False, name="jarvis",
                                   timeout=busy_seconds, kwargs={"autocommit": True, "row_factory": dict_row})
        try:
            self.pool.open(wait=True, timeout=busy_seconds)
        except Exception as error:
            self.pool.close()
            raise StoreError(f"cannot reach the PostgreSQL server of JARVIS_DATABASE_URL ({_reason(error)})") \
                from None
        with self.pool.connection() as connection:
            migrate(connection)
        self.serial = _Serial()
        self.listener: gevent.Greenlet | None = None
        self.heard_callbacks: list = []
        self.save_waiters: dict[int, set[gevent.event.Event]] = {}
        # Waiting for notifications blocks unless gevent has patched the process (gunicorn's gevent workers
        # have); elsewhere (a script, in-process tests) the tick and the followers' polls do the work alone.
        self.notifications = waiting_strategy() != "wait_c"

    def _db(self):
        return self.pool.connection()

    def close(self) -> None:
        self.serial.kill()
        if self.listener is not None:
            self.listener.kill()
        self.pool.close()

    # -- conversations ---------------------------------------------------------

    def list_conversations(self) -> list[dict]:
        with self._db() as db, db.transaction():
            _reap_dead_runs(db, None, time.time())
            rows = db.execute("SELECT id, title, created_at, updated_at, EXISTS (SELECT 1 FROM runs WHERE "
                              "runs.conversation_id = conversations.id) AS running FROM conversations "
                              "ORDER BY updated_at DESC").fetchall()
        return rows

    def create_conversation(self, title: str, settings: dict | None = None) -> dict:
        conversation = {"id": secrets.token_urlsafe(16), "title": storable(title), "created_at": time.time(),
                        "settings": None if settings is None else json.dumps(settings)}
        conversation["updated_at"] = conversation["created_at"]
        with self._db() as db:
            db.execute("INSERT INTO conversations (id, title, created_at, updated_at, settings) "
                       "VALUES (%(id)s, %(title)s, %(created_at)s, %(updated_at)s, %(settings)s)", conversation)
        return {**conversation, "settings": settings}

    def update_conversation_settings(self, conversation_id: str, settings: dict) -> bool:
        with self._db() as db:
            return db.execute("UPDATE conversations SET settings = %s WHERE id = %s",
                              (json.dumps(settings), conversation_id)).rowcount > 0

    def import_conversations(self, conversations: list[dict]) -> list[str]:
        ids = []
        with self._db() as db, db.transaction(), db.cursor() as cursor:
            for conversation in conversations:
                conversation_id, row, messages = import_rows(conversation)
                cursor.execute("INSERT INTO conversations (id, title, created_at, updated_at, settings) VALUES "
                               "(%s, %s, %s, %s, %s)", row)
                cursor.executemany(
                    "INSERT INTO messages (conversation_id, role, content, reasoning, status, error, model, stats, "
                    "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", messages)
                ids.append(conversation_id)
        return ids

    def search(self, query: str, limit: int = 50) -> list[dict]:
        """As SQLiteStore.search, with PostgreSQL's text search ('simple': lower-cased words, no stemming)."""
        words = search_words(query)
        if not words:
            return []
        expression = " & ".join(words) + ":*"
        headline = f"StartSel={MATCH_START}, StopSel={MATCH_END}, MaxFragments=1, MaxWords=16, MinWords=4"
        with self._db() as db:
            # The best `limit` first (the stored words ranked), then snippets for those only.
            rows = db.execute(
                "SELECT best.id AS message_id, messages.conversation_id, conversations.title, "
                "ts_headline('simple', messages.content, to_tsquery('simple', %s), %s) AS snippet FROM "
                "(SELECT id, ts_rank(search, query) AS score FROM messages, to_tsquery('simple', %s) AS query "
                " WHERE search @@ query ORDER BY score DESC LIMIT %s) AS best "
                "JOIN messages ON messages.id = best.id "
                "JOIN conversations ON conversations.id = messages.conversation_id ORDER BY best.score DESC",
                (expression, headline, expression, limit)).fetchall()
            titles = db.execute(
                "SELECT id AS conversation_id, title FROM conversations WHERE "
                + " AND ".join(["title ILIKE %s"] * len(words)) + " ORDER BY updated_at DESC LIMIT %s",
                (*[f"%{like_escaped(word)}%" for word in words], limit)).fetchall()
        return search_results(titles, rows, words, limit)

    def get_conversation(self, conversation_id: str) -> dict | None:
        with self._db() as db:
            with db.transaction():
                _reap_dead_runs(db, conversation_id, time.time())
            row = db.execute("SELECT id, title, created_at, updated_at, settings, EXISTS (SELECT 1 FROM runs WHERE "
                             "runs.conversation_id = conversations.id) AS running FROM conversations WHERE id = %s",
                             (conversation_id,)).fetchone()
            if row is None:
                return None
            messages = db.execute(
                "SELECT id, role, content, reasoning, reasoning_moved, status, error, model, trace_id, stats, "
                "created_at, updated_at FROM messages WHERE conversation_id = %s ORDER BY id",
                (conversation_id,)).fetchall()
        return {**row, "settings": json.loads(row["settings"]) if row["settings"] else None,
                "messages": [_message(message) for message in messages]}

    def rename_conversation(self, conversation_id: str, title: str) -> bool:
        with self._db() as db:
            return db.execute("UPDATE conversations SET title = %s, updated_at = %s WHERE id = %s",
                              (storable(title), time.time(), conversation_id)).rowcount > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        with self._db() as db, db.transaction():
            for run in db.execute("SELECT message_id FROM runs WHERE conversation_id = %s", (conversation_id,)):
                db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"deleted {run['message_id']}"))
            return db.execute("DELETE FROM conversations WHERE id = %s", (conversation_id,)).rowcount > 0

    # -- messages ----------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int:
        now = time.time()
        with self._db() as db, db.transaction():
            message_id = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, trace_id, created_at, "
                "updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
                (conversation_id, role, storable(content), status, model, trace_id, now, now)).fetchone()["id"]
            db.execute("UPDATE conversations SET updated_at = %s WHERE id = %s", (now, conversation_id))
        return message_id

    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False) -> bool:
        with self._db() as db:
            return _update_message(db, message_id, content, status, error, reasoning, stats, reasoning_moved)

    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False):
        """Queue the update without waiting; writes run in order. An AsyncResult of whether the message
        still existed."""
        return self.serial.spawn(self._update_message, message_id, content, status, error, reasoning, stats,
                                 reasoning_moved)

    def _update_message(self, *args) -> bool:
        with self._db() as db:
            return _update_message(db, *args)

    def delete_messages_from(self, conversation_id: str, message_id: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = %s AND id >= %s", (conversation_id, message_id))

    # -- runs ----------------------------------------------------------------------------------

    def start_answer(self, conversation_id: str, *, owner: str, user_content: str | None = None,
                     delete_from: int | None = None, history_before: int | None = None, title: str | None = None,
                     model: str | None = None, trace_id: str | None = None) -> tuple[int, list[dict]]:
        """As SQLiteStore.start_answer: one transaction, the conversation's row locked so that two nodes
        claiming it take turns; ConversationBusy when a live run exists on any node."""
        now = time.time()
        with self._db() as db, db.transaction():
            if db.execute("SELECT 1 FROM conversations WHERE id = %s FOR UPDATE", (conversation_id,)).fetchone() \
                    is None:
                raise NoSuchConversation(conversation_id)
            _reap_dead_runs(db, conversation_id, now)
            if db.execute("SELECT 1 FROM runs WHERE conversation_id = %s", (conversation_id,)).fetchone():
                raise ConversationBusy(conversation_id)
            if delete_from is not None:
                db.execute("DELETE FROM messages WHERE conversation_id = %s AND id >= %s",
                           (conversation_id, delete_from))
            if user_content is not None:
                db.execute("INSERT INTO messages (conversation_id, role, content, status, created_at, updated_at) "
                           "VALUES (%s, 'user', %s, 'complete', %s, %s)",
                           (conversation_id, storable(user_content), now, now))
            message_id = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, trace_id, created_at, "
                "updated_at) VALUES (%s, 'assistant', '', 'streaming', %s, %s, %s, %s) RETURNING id",
                (conversation_id, model, trace_id, now, now)).fetchone()["id"]
            db.execute("INSERT INTO runs (message_id, conversation_id, owner, lease_expires_at) "
                       "VALUES (%s, %s, %s, %s)", (message_id, conversation_id, owner, now + leases.LEASE_SECONDS))
            db.execute("UPDATE conversations SET title = coalesce(%s, title), updated_at = %s WHERE id = %s",
                       (title and storable(title), now, conversation_id))
            history = db.execute("SELECT id, role, content FROM messages WHERE conversation_id = %s AND id < %s "
                                 "ORDER BY id", (conversation_id, history_before or message_id)).fetchall()
        return message_id, history

    def delete_messages_between(self, conversation_id: str, first: int, before: int) -> None:
        with self._db() as db:
            db.execute("DELETE FROM messages WHERE conversation_id = %s AND id >= %s AND id < %s",
                       (conversation_id, first, before))

    def finish_answer_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                            reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False):
        return self.serial.spawn(self._finish_answer, message_id, content, status, error, reasoning, stats,
                                 reasoning_moved)

    def _finish_answer(self, message_id, content, status, error, reasoning, stats, reasoning_moved) -> bool:
        with self._db() as db, db.transaction():
            db.execute("DELETE FROM runs WHERE message_id = %s", (message_id,))
            return _update_message(db, message_id, content, status, error, reasoning, stats, reasoning_moved)

    def tick_runs(self, owner: str, *, renew: bool) -> dict[int, tuple[bool, float | None]]:
        with self._db() as db:
            if renew:
                db.execute("UPDATE runs SET lease_expires_at = %s WHERE owner = %s",
                           (time.time() + leases.LEASE_SECONDS, owner))
            rows = db.execute("SELECT message_id, stop_requested, watched_at FROM runs WHERE owner = %s",
                              (owner,)).fetchall()
        return {row["message_id"]: (row["stop_requested"], row["watched_at"]) for row in rows}

    def request_stop(self, conversation_id: str) -> bool:
        with self._db() as db, db.transaction():
            _reap_dead_runs(db, conversation_id, time.time())
            stopped = db.execute("UPDATE runs SET stop_requested = true WHERE conversation_id = %s "
                                 "RETURNING message_id", (conversation_id,)).fetchall()
            for run in stopped:
                db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"stop {run['message_id']}"))
        return bool(stopped)

    def follow(self, message_id: int, *, touch: bool) -> dict | None:
        now = time.time()
        with self._db() as db, db.transaction():
            row = db.execute("SELECT conversation_id FROM messages WHERE id = %s", (message_id,)).fetchone()
            if row is None:
                return None
            _reap_dead_runs(db, row["conversation_id"], now)
            if touch:
                db.execute("UPDATE runs SET watched_at = %s WHERE message_id = %s", (now, message_id))
            message = db.execute("SELECT id, conversation_id, role, content, reasoning, reasoning_moved, status, "
                                 "error, stats, trace_id FROM messages WHERE id = %s", (message_id,)).fetchone()
        return _message(message)

    def listen(self, heard) -> None:
        """Call heard(kind, message_id) for every Stop ('stop') and delete ('deleted') that any node sends,
        from a greenlet that reconnects after a lost connection (the tick covers the gap)."""
        if heard not in self.heard_callbacks:
            self.heard_callbacks.append(heard)
        self._start_listening()

    def subscribe(self, message_id: int) -> gevent.event.Event | None:
        """An Event set whenever any node saves this answer: a page following it wakes at once instead of
        at its next poll. `unsubscribe` when done. None where notifications are off: poll."""
        if not self.notifications:
            return None
        self._start_listening()
        event = gevent.event.Event()
        self.save_waiters.setdefault(message_id, set()).add(event)
        return event

    def unsubscribe(self, message_id: int, event: gevent.event.Event | None) -> None:
        waiters = self.save_waiters.get(message_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self.save_waiters[message_id]

    def _start_listening(self) -> None:
        if self.notifications and (self.listener is None or self.listener.dead):
            self.listener = gevent.spawn(self._listen)

    def _listen(self) -> None:
        while True:
            try:
                with psycopg.connect(self.url, autocommit=True) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    for notice in connection.notifies():
                        kind, _, number = notice.payload.partition(" ")
                        if number.isdigit():
                            self._heard(kind, int(number))
            except psycopg.Error as error:
                log.warning("the store's notifications stopped (%s); listening again in 1 s", _reason(error))
            gevent.sleep(1.0)

    def _heard(self, kind: str, message_id: int) -> None:
        if kind == "saved":
            for event in self.save_waiters.get(message_id, ()):
                event.set()
            return
        for heard in self.heard_callbacks:
            try:
                heard(kind, message_id)
            except Exception:
                log.exception("handling a notification failed")

    # -- sessions and the shared secret ---------------------------------------------------------------

    def create_session(self, key_check: str) -> str:
        session_id = secrets.token_urlsafe(32)
        with self._db() as db:
            db.execute("INSERT INTO sessions (id, key_check, created_at) VALUES (%s, %s, %s)",
                       (session_id, key_check, time.time()))
        return session_id

    def session_valid(self, session_id: str, key_check: str, max_age: float) -> bool:
        with self._db() as db:
            row = db.execute("SELECT key_check, created_at FROM sessions WHERE id = %s", (session_id,)).fetchone()
        return row is not None and secrets.compare_digest(row["key_check"], key_check) and \
            time.time() - row["created_at"] < max_age

    def delete_session(self, session_id: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM sessions WHERE id = %s", (session_id,))

    def secret(self) -> str:
        """The cookie-signing secret every node shares: made by whichever node asks first."""
        with self._db() as db:
            db.execute("INSERT INTO shared_secrets (name, value) VALUES ('cookie', %s) ON CONFLICT DO NOTHING",
                       (secrets.token_urlsafe(48),))
            return db.execute("SELECT value FROM shared_secrets WHERE name = 'cookie'").fetchone()["value"]

    def status(self) -> dict:
        """For /healthz, from memory: which store, how psycopg waits (wait_poll: on gevent, cooperatively)
        and the pool's connections."""
        stats = self.pool.get_stats()
        return {"kind": "postgresql", "wait": waiting_strategy(), "connections": stats.get("pool_size", 0),
                "idle": stats.get("pool_available", 0)}

    def schema_version(self) -> int:
        with self._db() as db:
            return db.execute("SELECT version FROM jarvis_schema").fetchone()["version"]


def _update_message(db, message_id, content, status, error, reasoning, stats, reasoning_moved) -> bool:
    """Save an answer and announce it (NOTIFY 'saved <id>', in the same statement) to pages that follow
    it from other nodes. A save while streaming never brings back an answer that already ended."""
    only_while_streaming = " AND status = 'streaming'" if status == "streaming" else ""
    return db.execute(
        "WITH saved AS (UPDATE messages SET content = %s, reasoning = %s, reasoning_moved = %s, status = %s, "
        f"error = %s, stats = %s, updated_at = %s WHERE id = %s{only_while_streaming} RETURNING id) "
        "SELECT pg_notify(%s, 'saved ' || id) FROM saved",
        (storable(content), storable(reasoning), bool(reasoning_moved), status, error and storable(error),
         None if stats is None else json.dumps(stats), time.time(), message_id, CHANNEL)).rowcount > 0


def _message(row: dict) -> dict:
    message = dict(row)
    message["stats"] = json.loads(message["stats"]) if message["stats"] else None
    message["reasoning_moved"] = bool(message["reasoning_moved"])
    return message


def _reason(error: Exception) -> str:
    """An error's first line, without the connection string (it may hold a password)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def recover(url: str) -> int:
    """Bring the schema up to date and mark answers whose run is dead interrupted (runs of live nodes
    stay); return how many."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10) as connection:
        migrate(connection)
        with connection.transaction():
            return _reap_dead_runs(connection, None, time.time())


def main(argv: list[str]) -> int:
    import os

    if argv[1:] != ["migrate"]:
        print("usage: python -m jarvis.pgstore migrate   (with JARVIS_DATABASE_URL set)", file=sys.stderr)
        return 2
    try:
        recovered = recover(os.environ["JARVIS_DATABASE_URL"])
    except (StoreError, psycopg.Error) as error:
        print(f"jarvis: the PostgreSQL store of JARVIS_DATABASE_URL cannot be used: {_reason(error)}",
              file=sys.stderr)
        return 1
    print(recovered)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
