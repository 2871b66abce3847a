"""The conversation store in SQLite: WAL mode, under JARVIS_DATA_DIR.

Every call runs on one dedicated native thread, so a slow disk (a WAL checkpoint, an fsync) never
blocks the gevent hub; the hub waits cooperatively for the result. Writes that read first take the
lock up front (BEGIN IMMEDIATE), so two workers claiming the same conversation take turns instead of
failing mid-way; a lock held elsewhere is waited for up to JARVIS_STORE_BUSY_SECONDS.

The schema is versioned (`PRAGMA user_version`) and every open brings an older database up to date in
place (`MIGRATIONS`); a newer one is refused. gunicorn's master imports this module (to migrate and
mark interrupted answers before it forks): the standard library and gevent only.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time

from gevent import monkey
from gevent.event import AsyncResult
from gevent.threadpool import ThreadPool

from jarvis.stores import StoreError, StoreUnavailable
from jarvis.stores.common import MATCH_END, MATCH_START, file_secret
from jarvis.stores.sql import Db, Dialect, SQLStore, reap_dead_runs

_sleep, = monkey.get_original("time", ["sleep"])  # (on the store's own thread, not the hub)

# The schema, as the steps that build it: step N takes a database from version N to N + 1
# (`PRAGMA user_version`). A database made before versioning reads as version 0 and has the
# tables of step 0 already, which is why that step says IF NOT EXISTS. Never edit a step that
# has shipped; add one, here and in stores.postgres (the same versions mean the same tables).
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
    (  # 6 -> 7: which client started each running answer (JARVIS_MAX_RUNS_PER_CLIENT)
        "ALTER TABLE runs ADD COLUMN client TEXT",
        "CREATE INDEX runs_by_client ON runs(client)",
    ),
    (  # 7 -> 8: conversations are trees: a regenerate or an edit adds a version beside the old one. Until
        # now each message followed the one before it; the conversation's current branch ends at leaf_id
        "ALTER TABLE messages ADD COLUMN parent_id INTEGER",
        "UPDATE messages SET parent_id = (SELECT max(earlier.id) FROM messages AS earlier WHERE "
        "earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id)",
        "CREATE INDEX messages_by_parent ON messages(parent_id)",
        "ALTER TABLE conversations ADD COLUMN leaf_id INTEGER",
        "UPDATE conversations SET leaf_id = (SELECT max(id) FROM messages WHERE "
        "messages.conversation_id = conversations.id)",
    ),
    (  # 8 -> 9: accounts — people (names unique whatever their case; an Argon2id hash of the password),
        # their personal API keys (a SHA-256 of the key; the key itself is shown once), and whose each
        # sign-in session and conversation is (NULL: made without accounts)
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            admin INTEGER NOT NULL DEFAULT 0,
            tokens_per_day INTEGER,
            max_streams INTEGER,
            created_at REAL NOT NULL,
            last_seen_at REAL
        )""",
        "CREATE UNIQUE INDEX users_by_name ON users(lower(name))",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            label TEXT NOT NULL DEFAULT '',
            key_hash TEXT NOT NULL UNIQUE,
            created_at REAL NOT NULL,
            last_used_at REAL
        )""",
        "CREATE INDEX api_keys_by_user ON api_keys(user_id)",
        "ALTER TABLE sessions ADD COLUMN user_id INTEGER REFERENCES users(id) ON DELETE CASCADE",
        "ALTER TABLE conversations ADD COLUMN user_id INTEGER",
        "CREATE INDEX conversations_by_user ON conversations(user_id, updated_at)",
        # failed sign-ins of the last minutes, by name (lower case) and client address: a limit on guessing
        """CREATE TABLE sign_in_failures (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            address TEXT NOT NULL,
            at REAL NOT NULL
        )""",
        "CREATE INDEX sign_in_failures_by_address ON sign_in_failures(address, at)",
    ),
    (  # 9 -> 10: usage and limits — what each account used, by day (UTC), key ('': the page) and model
        # (user 0: everyone, without accounts); and the /v1 streams each account has open now (a page's
        # answers are its runs), counted against its max_streams while their owner lives
        """CREATE TABLE usage_days (
            user_id INTEGER NOT NULL,
            day TEXT NOT NULL,
            key_id TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            requests INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, day, key_id, model)
        )""",
        """CREATE TABLE api_streams (
            id TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            expires_at REAL NOT NULL
        )""",
        "CREATE INDEX api_streams_by_user ON api_streams(user_id)",
    ),
    (  # 10 -> 11: an answer's tool steps (jarvis.tool_loop), JSON: the calls, where they came, their results
        "ALTER TABLE messages ADD COLUMN tools TEXT",
    ),
    (  # 11 -> 12: pictures and files given with messages (jarvis.attachments): the conversation's, one row per
        # content hash; a user message lists its own (JSON: id, name, type, kind, size, note)
        """CREATE TABLE files (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            kind TEXT NOT NULL,
            size INTEGER NOT NULL,
            data BLOB NOT NULL,
            text TEXT,
            sent BLOB,
            sent_type TEXT,
            note TEXT,
            created_at REAL NOT NULL,
            UNIQUE (conversation_id, sha256)
        )""",
        "ALTER TABLE messages ADD COLUMN attachments TEXT",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class SQLiteDialect(Dialect):

    @contextlib.contextmanager
    def transaction(self, connection: sqlite3.Connection):
        """One write transaction (the connection autocommits otherwise); IMMEDIATE takes the lock up front."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def search_messages(self, db: Db, words: list[str], limit: int, user_id: int | None = None) -> list[dict]:
        expression = " ".join(f'"{word.replace(chr(34), chr(34) * 2)}"' for word in words) + "*"
        mine = (" AND conversations.user_id = ?", (user_id,)) if user_id is not None else ("", ())
        return db.all("SELECT messages.id AS message_id, messages.conversation_id, conversations.title, "
                      f"snippet(messages_search, 0, '{MATCH_START}', '{MATCH_END}', '…', 16) AS snippet "
                      "FROM messages_search JOIN messages ON messages.id = messages_search.rowid "
                      "JOIN conversations ON conversations.id = messages.conversation_id "
                      f"WHERE messages_search MATCH ?{mine[0]} ORDER BY rank LIMIT ?", (expression, *mine[1], limit))


DIALECT = SQLiteDialect()


def database_path(data_dir: str) -> str:
    return os.path.join(data_dir, "jarvis.sqlite3")


def recover_interrupted(data_dir: str) -> int:
    """At server start: answers left streaming by a process that is gone are marked interrupted."""
    path = database_path(data_dir)
    if not os.path.exists(path):
        return 0
    connection = _connect(path)
    try:
        db = Db(connection, DIALECT)
        with db.transaction():
            return reap_dead_runs(db, None, time.time())
    finally:
        connection.close()


def _connect(path: str, busy_seconds: float = 10.0) -> sqlite3.Connection:
    # busy_seconds: how long a write waits for a lock another process holds, then fails.
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_seconds)
    connection.row_factory = sqlite3.Row
    deadline = time.monotonic() + busy_seconds
    while True:
        # Workers that start together on a new database race to make it WAL and to migrate it: SQLite answers
        # one of them "database is locked" at once, without waiting its busy timeout (measured: 4 runs in 30
        # of four processes opening a fresh database together, one failed, and gunicorn stopped on the worker
        # that could not boot). It tries again until busy_seconds.
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            connection.execute("PRAGMA foreign_keys=ON")
            migrate(connection)
            return connection
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                connection.close()
                raise
            _sleep(0.02)


def migrate(connection: sqlite3.Connection) -> int:
    """Bring the database to SCHEMA_VERSION in place, in one transaction; return the version found.

    BEGIN IMMEDIATE makes workers that start together take turns: the first migrates, the
    others find the work done.
    """
    with DIALECT.transaction(connection):
        found = connection.execute("PRAGMA user_version").fetchone()[0]
        if found > SCHEMA_VERSION:
            raise StoreError(f"the database was written by a newer Jarvis (schema {found}; this one knows "
                             f"{SCHEMA_VERSION}): run that version, or restore a backup of the database")
        for step in MIGRATIONS[found:]:
            for statement in step:
                connection.execute(statement)
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return found


def _on_thread(function, args) -> tuple[bool, object]:
    """(True, result) or (False, the exception it raised): run on the store's thread."""
    try:
        return True, function(*args)
    except sqlite3.Error as error:  # a full disk, a lock held too long, a broken file: worth retrying
        return False, StoreUnavailable(str(error))
    except Exception as error:  # every one goes back to the caller, and is raised there
        return False, error


class SQLiteStore(SQLStore):
    dialect = DIALECT

    def __init__(self, data_dir: str, busy_seconds: float = 10.0):
        os.makedirs(data_dir, exist_ok=True)
        self.path = database_path(data_dir)
        self.pool = ThreadPool(1)
        try:
            self.connection = self._run(_connect, self.path, busy_seconds)
        except StoreUnavailable as error:
            self.pool.kill()
            raise StoreError(f"cannot open the database {self.path} ({error})") from None
        self.db = Db(self.connection, DIALECT)

    def _call(self, function, *args):
        return self._run(function, self.db, *args)

    def _later(self, function, *args) -> AsyncResult:
        return self._spawn(function, self.db, *args)

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

        self.pool.spawn(_on_thread, function, args).rawlink(settle)
        return result

    def close(self) -> None:
        """Close the database and stop the store's thread (tests build many stores)."""
        self._run(self.connection.close)
        self.pool.kill()

    def secret(self) -> str:
        """The cookie-signing secret: generated once and kept (mode 0600) beside the database."""
        return file_secret(os.path.dirname(self.path))

    def schema_version(self) -> int:
        return self._run(lambda: self.connection.execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        return self._run(lambda: self.connection.execute("PRAGMA journal_mode").fetchone()[0])
