"""The conversation store in PostgreSQL, shared by every Jarvis node that points at it (JARVIS_DATABASE_URL).

The same transactions (stores.sql), statuses and schema versions as SQLite; the page API cannot tell
which one runs. What the nodes share goes through here: conversations, messages and their live
content, run leases, stop requests, sign-in sessions and the cookie-signing secret. A Stop or a delete
also sends a NOTIFY on the `jarvis` channel, which the owning node hears at once; its tick (every
0.1 s) reads the same flags in the store, so a lost notification costs at most that. Every save of an
answer is announced the same way, so a page following it from another node reads it at once rather
than at its next poll.

Under gevent, calls run on the hub and wait cooperatively: psycopg chooses its `wait_poll` when gevent
has patched `select` (psycopg.waiting), so a query waits like any socket read. That holds only when
psycopg is first imported after the patch, so nothing imports this module in gunicorn's master: the
master migrates through `python -m jarvis.stores.postgres migrate` in a child process, and workers open
the store after gevent's patch. `waiting_strategy()` says which wait psycopg chose; /healthz shows it.

While the server is away, a call fails at once on a broken connection, or after at most
JARVIS_STORE_TIMEOUT_SECONDS waiting for a new one (the pool's timeout, and each connection attempt's):
StoreUnavailable either way. The pool also gives up reconnecting on its own after that long — its
back-off doubles from 1 s, so after a 20 s outage its next attempt could be 16 s away — and the next
request asks for a connection afresh: the first request after the server is back gets one.

    python -m jarvis.stores.postgres migrate   # schema up to date and dead runs marked interrupted;
                                               # exits 1 with a message on a newer schema or an
                                               # unreachable server
"""

from __future__ import annotations

import logging
import sys
import time
from functools import lru_cache

import gevent
import gevent.event
import gevent.queue
import psycopg
import psycopg.waiting
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import ConnectionPool, PoolTimeout

from jarvis.stores import StoreError, StoreUnavailable
from jarvis.stores.common import MATCH_END, MATCH_START
from jarvis.stores.sql import Db, Dialect, SQLStore, reap_dead_runs
from jarvis.stores.sqlite import SCHEMA_VERSION

log = logging.getLogger(__name__)

CHANNEL = "jarvis"
_MIGRATION_LOCK = 0x6A617276  # "jarv": one node migrates, the others wait and find the work done

# Step N takes the schema from version N to N + 1, as stores.sqlite.MIGRATIONS does for SQLite: the same
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
    (  # 6 -> 7: which client started each running answer (JARVIS_MAX_RUNS_PER_CLIENT)
        "ALTER TABLE runs ADD COLUMN client TEXT",
        "CREATE INDEX runs_by_client ON runs(client)",
    ),
    (  # 7 -> 8: conversations are trees: a regenerate or an edit adds a version beside the old one. Until
        # now each message followed the one before it; the conversation's current branch ends at leaf_id
        "ALTER TABLE messages ADD COLUMN parent_id BIGINT",
        "UPDATE messages SET parent_id = (SELECT max(earlier.id) FROM messages AS earlier WHERE "
        "earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id)",
        "CREATE INDEX messages_by_parent ON messages(parent_id)",
        "ALTER TABLE conversations ADD COLUMN leaf_id BIGINT",
        "UPDATE conversations SET leaf_id = (SELECT max(id) FROM messages WHERE "
        "messages.conversation_id = conversations.id)",
    ),
    (  # 8 -> 9: accounts: people, their personal API keys (hashed), whose each session and conversation is
        """CREATE TABLE users (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            admin BOOLEAN NOT NULL DEFAULT false,
            tokens_per_day BIGINT,
            max_streams INTEGER,
            created_at DOUBLE PRECISION NOT NULL,
            last_seen_at DOUBLE PRECISION
        )""",
        "CREATE UNIQUE INDEX users_by_name ON users(lower(name))",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            label TEXT NOT NULL DEFAULT '',
            key_hash TEXT NOT NULL UNIQUE,
            created_at DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION
        )""",
        "CREATE INDEX api_keys_by_user ON api_keys(user_id)",
        "ALTER TABLE sessions ADD COLUMN user_id BIGINT REFERENCES users(id) ON DELETE CASCADE",
        "ALTER TABLE conversations ADD COLUMN user_id BIGINT",
        "CREATE INDEX conversations_by_user ON conversations(user_id, updated_at)",
        # failed sign-ins of the last minutes, by name (lower case) and client address: a limit on guessing
        """CREATE TABLE sign_in_failures (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name TEXT NOT NULL,
            address TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX sign_in_failures_by_address ON sign_in_failures(address, at)",
    ),
    (  # 9 -> 10: usage by account, day (UTC), key and model; the /v1 streams each account has open now
        """CREATE TABLE usage_days (
            user_id BIGINT NOT NULL,
            day TEXT NOT NULL,
            key_id TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL DEFAULT '',
            requests BIGINT NOT NULL DEFAULT 0,
            prompt_tokens BIGINT NOT NULL DEFAULT 0,
            completion_tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, day, key_id, model)
        )""",
        """CREATE TABLE api_streams (
            id TEXT PRIMARY KEY,
            user_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            owner TEXT NOT NULL,
            expires_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX api_streams_by_user ON api_streams(user_id)",
    ),
    (  # 10 -> 11: an answer's tool steps, JSON
        "ALTER TABLE messages ADD COLUMN tools TEXT",
    ),
    (  # 11 -> 12: pictures and files given with messages, one row per content hash in a conversation
        """CREATE TABLE files (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            sha256 TEXT NOT NULL,
            name TEXT NOT NULL,
            type TEXT NOT NULL,
            kind TEXT NOT NULL,
            size BIGINT NOT NULL,
            data BYTEA NOT NULL,
            text TEXT,
            sent BYTEA,
            sent_type TEXT,
            note TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            UNIQUE (conversation_id, sha256)
        )""",
        "ALTER TABLE messages ADD COLUMN attachments TEXT",
    ),
)
assert len(MIGRATIONS) == SCHEMA_VERSION, "a schema step was added to one store and not the other"


class PostgresDialect(Dialect):
    lock_row = " FOR UPDATE"  # two nodes claiming one conversation take turns
    like = "ILIKE ?"  # (a backslash escapes by default)

    def sql(self, text: str) -> str:
        return _placeholders(text)

    def transaction(self, connection: psycopg.Connection):
        return connection.transaction()

    def executemany(self, connection: psycopg.Connection, sql: str, rows: list[tuple]) -> None:
        with connection.cursor() as cursor:
            cursor.executemany(self.sql(sql), rows)

    def notify(self, db: Db, payload: str) -> None:
        db.execute("SELECT pg_notify(?, ?)", (CHANNEL, payload))

    def announcing_save(self, update: str) -> str:
        # In the same statement: NOTIFY 'saved <id>' for pages that follow the answer from other nodes.
        return f"WITH saved AS ({update}) SELECT pg_notify('{CHANNEL}', 'saved ' || id) FROM saved"

    def search_messages(self, db: Db, words: list[str], limit: int, user_id: int | None = None) -> list[dict]:
        """PostgreSQL's text search ('simple': lower-cased words, no stemming): the best `limit` first (the
        stored words ranked), then snippets for those only."""
        expression = " & ".join(words) + ":*"
        headline = f"StartSel={MATCH_START}, StopSel={MATCH_END}, MaxFragments=1, MaxWords=16, MinWords=4"
        return db.all(
            "SELECT best.id AS message_id, messages.conversation_id, conversations.title, "
            "ts_headline('simple', messages.content, to_tsquery('simple', ?), ?) AS snippet FROM "
            "(SELECT id, ts_rank(search, query) AS score FROM messages, to_tsquery('simple', ?) AS query "
            " WHERE search @@ query"
            + (" AND conversation_id IN (SELECT id FROM conversations WHERE user_id = ?)" if user_id is not None
               else "") + " ORDER BY score DESC LIMIT ?) AS best "
            "JOIN messages ON messages.id = best.id "
            "JOIN conversations ON conversations.id = messages.conversation_id ORDER BY best.score DESC",
            (expression, headline, expression, *(() if user_id is None else (user_id,)), limit))


@lru_cache(maxsize=512)
def _placeholders(text: str) -> str:
    return text.replace("?", "%s")


DIALECT = PostgresDialect()


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


class PostgresStore(SQLStore):
    dialect = DIALECT

    def __init__(self, url: str, timeout_seconds: float = 5.0, *, max_connections: int = 10):
        self.url = url
        self.timeout_seconds = timeout_seconds
        connect_timeout = max(1, round(timeout_seconds))  # libpq takes whole seconds
        self.pool = ConnectionPool(url, min_size=1, max_size=max_connections, open=False, name="jarvis",
                                   timeout=timeout_seconds, reconnect_timeout=timeout_seconds,
                                   kwargs={"autocommit": True, "row_factory": dict_row,
                                           "connect_timeout": connect_timeout})
        try:
            self.pool.open(wait=True, timeout=timeout_seconds)
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

    def _call(self, function, *args):
        try:
            with self.pool.connection() as connection:
                return function(Db(connection, DIALECT), *args)
        except PoolTimeout:
            raise StoreUnavailable(f"no connection to PostgreSQL within {self.timeout_seconds:g} s "
                                   "(JARVIS_STORE_TIMEOUT_SECONDS)") from None
        except psycopg.Error as error:
            raise StoreUnavailable(f"PostgreSQL: {_reason(error)}") from None

    def _later(self, function, *args) -> gevent.event.AsyncResult:
        return self.serial.spawn(self._call, function, *args)

    def close(self) -> None:
        self.serial.kill()
        if self.listener is not None:
            self.listener.kill()
        self.pool.close()

    # -- notifications from other nodes ------------------------------------------------------------

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
        failures = 0  # connections in a row that failed: one line for the first, then one a minute
        while True:
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as connection:
                    connection.execute(f"LISTEN {CHANNEL}")
                    if failures:
                        log.info("the store's notifications are back after %d failed attempts", failures)
                        failures = 0
                    for notice in connection.notifies():
                        kind, _, number = notice.payload.partition(" ")
                        if number.isdigit():
                            self._heard(kind, int(number))
            except psycopg.Error as error:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning("the store's notifications stopped (%s); listening again every second (the tick "
                                "covers the gap)", _reason(error))
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

    # -- the shared secret, status ---------------------------------------------------------------

    def secret(self) -> str:
        """The cookie-signing secret every node shares: made by whichever node asks first."""
        return self._call(_shared_secret)

    def status(self) -> dict:
        """For /healthz, from memory: which store, how psycopg waits (wait_poll: on gevent, cooperatively)
        and the pool's connections."""
        stats = self.pool.get_stats()
        return {"kind": "postgresql", "wait": waiting_strategy(), "connections": stats.get("pool_size", 0),
                "idle": stats.get("pool_available", 0)}

    def schema_version(self) -> int:
        return self._call(lambda db: db.one("SELECT version FROM jarvis_schema")["version"])


def _shared_secret(db: Db) -> str:
    import secrets

    db.execute("INSERT INTO shared_secrets (name, value) VALUES ('cookie', ?) ON CONFLICT DO NOTHING",
               (secrets.token_urlsafe(48),))
    return db.one("SELECT value FROM shared_secrets WHERE name = 'cookie'")["value"]


def _reason(error: Exception) -> str:
    """An error's first line, without the connection string (it may hold a password)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def recover(url: str) -> int:
    """Bring the schema up to date and mark answers whose run is dead interrupted (runs of live nodes
    stay); return how many."""
    with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=10) as connection:
        migrate(connection)
        db = Db(connection, DIALECT)
        with db.transaction():
            return reap_dead_runs(db, None, time.time())


def main(argv: list[str]) -> int:
    import os

    if argv[1:] != ["migrate"]:
        print("usage: python -m jarvis.stores.postgres migrate   (with JARVIS_DATABASE_URL set)", file=sys.stderr)
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
