"""Every transaction of the conversation store, written once for SQLite and PostgreSQL.

The SQL here is what both databases accept: `?` placeholders (PostgreSQL's dialect turns them into
`%s`), `RETURNING id`, `NOT EXISTS`, `true`. What differs is a `Dialect`: how a write transaction
starts (SQLite takes its lock up front, BEGIN IMMEDIATE), locking the row a claim reads (PostgreSQL:
FOR UPDATE), case-insensitive LIKE, full-text search, and notifications to other nodes (PostgreSQL's
NOTIFY; SQLite's workers share one machine and read the same flags on their tick).

A store (stores.sqlite, stores.postgres) says where its SQL runs — `_call(function, *args)` runs
`function(db, *args)` and returns its result; `_later` queues it, in order, and returns an AsyncResult —
and turns its database's errors into StoreUnavailable there.
"""

from __future__ import annotations

import json
import secrets
import time

from jarvis import leases
from jarvis.stores import (
    INTERRUPTED_NOTE,
    ConversationBusy,
    NoSuchConversation,
    TooManyRuns,
    TooManyStreams,
    UserExists,
)
from jarvis.stores.common import (
    branch_of,
    import_rows,
    like_escaped,
    message_of,
    newest_descendant,
    search_results,
    search_words,
    settings_json,
    settings_of,
    storable,
    tools_json,
    tools_of,
)

_MESSAGE_COLUMNS = ("id, parent_id, role, content, reasoning, reasoning_moved, status, error, model, trace_id, "
                    "stats, tools, attachments, created_at, updated_at")
CONTINUABLE = ("stopped", "interrupted", "error")  # and complete when it ended at max_tokens ("length")


class Dialect:
    """What SQLite and PostgreSQL do differently, in the store's terms."""

    lock_row = ""  # appended to the SELECT that claims a conversation
    like = "LIKE ? ESCAPE '\\'"  # a case-insensitive match of an escaped pattern

    def sql(self, text: str) -> str:
        return text

    def transaction(self, connection):
        raise NotImplementedError

    def executemany(self, connection, sql: str, rows: list[tuple]) -> None:
        connection.executemany(self.sql(sql), rows)

    def notify(self, db: Db, payload: str) -> None:
        """Tell every node (a Stop, a delete): nothing to do where the tick is enough."""

    def announcing_save(self, update: str) -> str:
        """The UPDATE of an answer (ending in RETURNING id), so that it also announces the save."""
        return update

    def search_messages(self, db: Db, words: list[str], limit: int, user_id: int | None = None) -> list[dict]:
        """The best `limit` ended messages holding every word (the last as a prefix), of `user_id`'s
        conversations (None: anyone's): message_id, conversation_id, title and a snippet with the matches
        between MATCH_START and MATCH_END."""
        raise NotImplementedError


class Db:
    """A connection, spoken to in the shared SQL."""

    __slots__ = ("connection", "dialect")

    def __init__(self, connection, dialect: Dialect):
        self.connection = connection
        self.dialect = dialect

    def execute(self, sql: str, args=()):
        return self.connection.execute(self.dialect.sql(sql), args)

    def one(self, sql: str, args=()) -> dict | None:
        """The row a key names, if any (read whole: a statement never stays open behind it)."""
        rows = self.execute(sql, args).fetchall()
        return dict(rows[0]) if rows else None

    def all(self, sql: str, args=()) -> list[dict]:
        return [dict(row) for row in self.execute(sql, args).fetchall()]

    def count(self, sql: str, args=()) -> int:
        """Rows changed."""
        return self.execute(sql, args).rowcount

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        self.dialect.executemany(self.connection, sql, rows)

    def transaction(self):
        return self.dialect.transaction(self.connection)


def reap_dead_runs(db: Db, conversation_id: str | None, now: float) -> int:
    """Mark answers whose run is dead (owner gone, lease expired, or no run at all) interrupted."""
    where, args = ("WHERE conversation_id = ?", (conversation_id,)) if conversation_id else ("", ())
    dead = [row["message_id"] for row in db.all(f"SELECT message_id, owner, lease_expires_at FROM runs {where}", args)
            if not leases.alive(row["owner"], row["lease_expires_at"], now)]
    for message_id in dead:
        db.execute("DELETE FROM runs WHERE message_id = ?", (message_id,))
    scope = "AND conversation_id = ?" if conversation_id else ""
    return db.count(f"UPDATE messages SET status = 'interrupted', error = ?, updated_at = ? WHERE status = "
                    f"'streaming' {scope} AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.message_id = messages.id)",
                    (INTERRUPTED_NOTE, now, *args))


def _save(db: Db, message_id: int, content: str, status: str, error: str | None, reasoning: str = "",
          stats: dict | None = None, reasoning_moved: bool = False, tools: list | None = None) -> bool:
    """Save an answer (announced to pages following it from other nodes); whether it still existed. A
    save while streaming never brings back an answer that ended; one marked interrupted while its writer
    could not reach the database (its lease expired meanwhile) is streaming again."""
    only_while_streaming = " AND status IN ('streaming', 'interrupted')" if status == "streaming" else ""
    update = db.dialect.announcing_save(
        "UPDATE messages SET content = ?, reasoning = ?, reasoning_moved = ?, status = ?, error = ?, stats = ?, "
        f"tools = ?, updated_at = ? WHERE id = ?{only_while_streaming} RETURNING id")
    return bool(db.all(update, (storable(content), storable(reasoning), bool(reasoning_moved), status,
                                error and storable(error), None if stats is None else json.dumps(stats),
                                tools_json(tools), time.time(), message_id)))


class SQLStore:
    """The store's interface over a dialect; subclasses give `dialect`, `_call`, `_later`, `secret`,
    `schema_version` and `close`."""

    dialect: Dialect

    def _call(self, function, *args):
        raise NotImplementedError

    def _later(self, function, *args):
        raise NotImplementedError

    def status(self) -> dict | None:
        return None

    # -- conversations ---------------------------------------------------------

    def list_conversations(self, user_id: int | None = None) -> list[dict]:
        """Every conversation something was sent in (an empty one is not listed), most recently active first;
        with accounts, `user_id`'s only (None: everyone's, as without accounts)."""
        return self._call(_list_conversations, user_id)

    def create_conversation(self, title: str, settings: dict | None = None, user_id: int | None = None) -> dict:
        now = time.time()
        conversation = {"id": secrets.token_urlsafe(16), "title": storable(title), "created_at": now,
                        "updated_at": now, "settings": settings_json(settings)}
        self._call(_count, "INSERT INTO conversations (id, title, created_at, updated_at, settings, user_id) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (*conversation.values(), user_id))
        return {**conversation, "settings": settings}

    def conversation_owner(self, conversation_id: str) -> tuple[bool, int | None]:
        """Whether the conversation exists, and whose it is (None: made without accounts)."""
        row = self._call(_one, "SELECT user_id FROM conversations WHERE id = ?", (conversation_id,))
        return (False, None) if row is None else (True, row["user_id"])

    def update_conversation_settings(self, conversation_id: str, settings: dict) -> bool:
        return self._call(_count, "UPDATE conversations SET settings = ? WHERE id = ?",
                          (settings_json(settings), conversation_id)) > 0

    def import_conversations(self, conversations: list[dict], user_id: int | None = None) -> list[str]:
        """Add checked conversations (jarvis.exchange) with new ids, `user_id`'s, all in one transaction;
        their ids."""
        return self._call(_import_conversations, conversations, user_id)

    def search(self, query: str, limit: int = 50, user_id: int | None = None) -> list[dict]:
        """Conversations whose title or ended messages hold every word of `query` (the last one as a
        prefix), best first: {conversation_id, title, message_id (None: the title), snippet} with the
        matches between MATCH_START and MATCH_END."""
        words = search_words(query)
        if not words:
            return []
        return self._call(_search, words, limit, user_id)

    def get_conversation(self, conversation_id: str, *, every_version: bool = False) -> dict | None:
        """The conversation with its current branch's messages (each with `parent_id` and `versions`), or
        with every message of its tree when `every_version`; None when there is no such conversation."""
        return self._call(_get_conversation, conversation_id, every_version)

    def rename_conversation(self, conversation_id: str, title: str) -> bool:
        return self._call(_count, "UPDATE conversations SET title = ?, updated_at = ? WHERE id = ?",
                          (storable(title), time.time(), conversation_id)) > 0

    def retitle(self, conversation_id: str, was: str, title: str) -> bool:
        """A generated title, unless the conversation was renamed meanwhile (its title is no longer `was`)."""
        return self._call(_count, "UPDATE conversations SET title = ? WHERE id = ? AND title = ?",
                          (storable(title), conversation_id, was)) > 0

    def delete_conversation(self, conversation_id: str) -> bool:
        return self._call(_delete_conversation, conversation_id)

    # -- messages ----------------------------------------------------------------

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int:
        return self._call(_add_message, conversation_id, role, storable(content), status, model, trace_id)

    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False,
                       tools: list | None = None) -> bool:
        return self._call(_save, message_id, content, status, error, reasoning, stats, reasoning_moved, tools)

    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False,
                             tools: list | None = None):
        """Queue the update without waiting; writes run in order. An AsyncResult of whether the message
        still existed."""
        return self._later(_save, message_id, content, status, error, reasoning, stats, reasoning_moved, tools)

    def set_leaf(self, conversation_id: str, message_id: int) -> int | None:
        """Make the branch through `message_id` current (down to its newest descendant); the new leaf, or
        None when the conversation has no such message."""
        return self._call(_set_leaf, conversation_id, message_id)

    def abandon_answer(self, conversation_id: str, message_id: int, user_message_id: int | None,
                       leaf_id: int | None) -> None:
        """Undo a regenerate or an edit the backend refused: drop the answer (and the edit's new user
        message) and make `leaf_id` the current branch's end again, as it was before."""
        self._call(_abandon_answer, conversation_id, message_id, user_message_id, leaf_id)

    # -- runs: answers in progress, at most one per conversation, whichever worker or node runs it ----------

    def start_answer(self, conversation_id: str, *, owner: str, parent_id: int | None | str = "leaf",
                     user_content: str | None = None, title: str | None = None, model: str | None = None,
                     trace_id: str | None = None, client: str | None = None,
                     max_runs: int | None = None, user_limit: tuple[int, int] | None = None,
                     attachments: list | None = None) -> tuple[int, list[dict], int | None]:
        """Claim the conversation for a new answer, in one transaction: add the user's message under
        `parent_id` (a send: the current branch's last message, "leaf"; an edit: the edited message's
        parent) and the answer (streaming) under it — or, with no user message (a regenerate), the answer
        under `parent_id`, beside the earlier ones — and its run; the new answer ends the current branch.
        Nothing is ever deleted. Returns the answer's id, the branch it answers (root first) and the leaf
        before it. Raises NoSuchConversation, ConversationBusy (a live run exists, on any worker or node)
        or TooManyRuns (`client` already runs `max_runs` answers, anywhere) or TooManyStreams (`user_limit`:
        (account id, max_streams), and the account has that many streams open), changing nothing.
        `attachments` (jarvis.attachments.Attachment) go with the user's message: each kept once per content
        hash in the conversation."""
        return self._call(_start_answer, conversation_id, owner, parent_id, user_content and storable(user_content),
                          title and storable(title), model, trace_id, client, max_runs, user_limit, attachments)

    def file(self, file_id: str) -> dict | None:
        """A kept picture or file, with its conversation's id; None when there is none by that id."""
        return self._call(_one, "SELECT * FROM files WHERE id = ?", (file_id,))

    def conversation_files(self, conversation_id: str) -> list[dict]:
        """A conversation's pictures and files, oldest first (its export)."""
        return self._call(_all, "SELECT * FROM files WHERE conversation_id = ? ORDER BY created_at, id",
                          (conversation_id,))

    def files_for(self, file_ids: list[str]) -> dict[str, dict]:
        """Kept pictures and files by id, for a request's history."""
        if not file_ids:
            return {}
        rows = self._call(_all, f"SELECT * FROM files WHERE id IN ({', '.join('?' * len(file_ids))})",
                          tuple(file_ids))
        return {row["id"]: row for row in rows}

    def continue_answer(self, conversation_id: str, message_id: int, *, owner: str, trace_id: str | None = None,
                        client: str | None = None, max_runs: int | None = None,
                        user_limit: tuple[int, int] | None = None) -> list[dict] | None:
        """Claim the conversation to continue an answer cut short (stopped, interrupted, an error after some
        text, or complete at max_tokens): the same message streams again, its branch made current. Returns
        the branch down to and including that answer (with the status and error it had ended with), or
        None when it cannot be continued. Raises as start_answer does."""
        return self._call(_continue_answer, conversation_id, message_id, owner, trace_id, client, max_runs,
                          user_limit)

    def finish_answer_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                            reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False,
                            tools: list | None = None):
        """The answer's last save and the end of its run, in one transaction, queued (an AsyncResult of
        whether the answer still existed)."""
        return self._later(_finish_answer, message_id, content, status, error, reasoning, stats, reasoning_moved,
                           tools)

    def tick_runs(self, owner: str, *, renew: bool, held=()) -> dict[int, tuple[bool, float | None]]:
        """For the runs `owner` holds: renew their leases (when `renew`) and report, per answer id,
        (stop requested, last watched from elsewhere). An answer of `held` (the ones `owner` is writing)
        whose run another process removed while `owner` could not renew its lease (the database was
        away) is claimed again, unless a newer answer holds its conversation. An answer missing from the
        report lost its run for good: its conversation was deleted, or another answer took it."""
        return self._call(_tick_runs, owner, renew, tuple(held))

    def request_stop(self, conversation_id: str) -> bool:
        """Ask whichever worker or node runs the conversation's answer to stop it; False when none runs."""
        return self._call(_request_stop, conversation_id)

    def follow(self, message_id: int, *, touch: bool) -> dict | None:
        """An answer as saved, for a page following it from another worker: its text, status and whether
        its run lives (a dead one is marked interrupted here). `touch` tells the owner someone watches."""
        return self._call(_follow, message_id, touch)

    def listen(self, heard) -> None:
        """Nothing to hear: one machine's workers see each other's Stops through the tick."""

    def subscribe(self, message_id: int):
        """No announcements of saves: a page following from another worker polls."""
        return None

    def unsubscribe(self, message_id: int, event) -> None:
        pass

    # -- the page's sign-in sessions -------------------------------------------------------------

    def create_session(self, key_check: str, user_id: int | None = None) -> str:
        """A new session for a page that presented the key, or signed in as `user_id`; its id is the
        cookie's only content."""
        session_id = secrets.token_urlsafe(32)
        self._call(_count, "INSERT INTO sessions (id, key_check, created_at, user_id) VALUES (?, ?, ?, ?)",
                   (session_id, key_check, time.time(), user_id))
        return session_id

    def session_user(self, session_id: str, max_age: float) -> dict | None:
        """The account a session younger than `max_age` seconds was signed in as (its last sight noted at
        most once a minute); None: no such session, too old, or its account removed."""
        return self._call(_session_user, session_id, max_age)

    def session_valid(self, session_id: str, key_check: str, max_age: float) -> bool:
        """Whether the session exists, is younger than `max_age` seconds, and was made with today's key."""
        row = self._call(_one, "SELECT key_check, created_at FROM sessions WHERE id = ?", (session_id,))
        return row is not None and secrets.compare_digest(row["key_check"], key_check) and \
            time.time() - row["created_at"] < max_age

    def delete_session(self, session_id: str) -> None:
        self._call(_count, "DELETE FROM sessions WHERE id = ?", (session_id,))

    # -- accounts (jarvis.passwords makes what is kept of a password or a key) --------------------------

    def add_user(self, name: str, password_hash: str, *, admin: bool = False) -> dict:
        """A new account; UserExists when the name (in any case) is taken. The first admin is given the
        conversations made before accounts existed (their owner is NULL)."""
        return self._call(_add_user, name, password_hash, admin)

    def user(self, name: str) -> dict | None:
        """The account of that name, in any case: {id, name, password_hash, admin, limits, times}."""
        return _user_row(self._call(_one, f"SELECT {_USER_COLUMNS} FROM users WHERE lower(name) = lower(?)", (name,)))

    def users(self) -> list[dict]:
        rows = self._call(_all, f"SELECT {_USER_COLUMNS} FROM users ORDER BY lower(name)", ())
        return [_user_row(row) for row in rows]

    def count_users(self) -> int:
        return self._call(_one, "SELECT count(*) AS n FROM users", ())["n"]

    def accounts_exist(self) -> bool:
        """Whether any account exists, or any conversation belongs to one (its account since removed)."""
        return bool(self._call(_one, "SELECT (EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM conversations "
                                     "WHERE user_id IS NOT NULL)) AS found", ())["found"])

    def remove_user(self, name: str) -> bool:
        """Remove an account: its sessions, keys, open streams and usage go with it, in the same transaction."""
        return self._call(_remove_user, name)

    def set_password(self, name: str, password_hash: str) -> bool:
        """A new password; every session signed in with the old one ends."""
        return self._call(_set_password, name, password_hash)

    def set_limits(self, name: str, tokens_per_day: int | None, max_streams: int | None) -> bool:
        return self._call(_count, "UPDATE users SET tokens_per_day = ?, max_streams = ? WHERE lower(name) = lower(?)",
                          (tokens_per_day, max_streams, name)) > 0

    def add_key(self, name: str, key_id: str, key_hash: str, label: str = "") -> bool:
        """A personal API key for the account (False: no such account)."""
        return self._call(_count, "INSERT INTO api_keys (id, user_id, label, key_hash, created_at) SELECT ?, id, ?, "
                                  "?, ? FROM users WHERE lower(name) = lower(?)",
                          (key_id, label, key_hash, time.time(), name)) > 0

    def keys(self, name: str) -> list[dict] | None:
        """The account's keys, oldest first ({id, label, created_at, last_used_at}); None: no such account."""
        return self._call(_keys, name)

    def revoke_key(self, key_id: str, user_id: int | None = None) -> bool:
        """Revoke a key (only if it is `user_id`'s, when given); False: no such key (of theirs)."""
        if user_id is None:
            return self._call(_count, "DELETE FROM api_keys WHERE id = ?", (key_id,)) > 0
        return self._call(_count, "DELETE FROM api_keys WHERE id = ? AND user_id = ?", (key_id, user_id)) > 0

    def sign_in_failures(self, name: str, address: str, since: float) -> tuple[list[float], list[float]]:
        """When sign-ins failed since `since`: for this name from this address, and from this address."""
        return self._call(_sign_in_failures, name.lower()[:64], address, since)

    def sign_in_failed(self, name: str, address: str, forget_before: float) -> None:
        """Note a failed sign-in (and forget those older than `forget_before`, everyone's)."""
        self._call(_sign_in_failed, name.lower()[:64], address, forget_before)

    def sign_in_succeeded(self, name: str, address: str) -> None:
        self._call(_count, "DELETE FROM sign_in_failures WHERE name = ? AND address = ?", (name.lower()[:64], address))

    # -- usage and limits -------------------------------------------------------------------------------

    def claim_stream(self, user_id: int, owner: str, limit: int, expires_at: float) -> str:
        """Note a /v1 stream the account opens (its id, to release it), unless the account already has
        `limit` streams open — /v1 streams and page answers, on any worker or node, while their owner
        lives (a stream's row dies with its process, or at `expires_at` on another machine): then
        TooManyStreams, noting nothing."""
        return self._call(_claim_stream, user_id, owner, limit, expires_at)

    def release_stream(self, stream_id: str) -> None:
        self._call(_count, "DELETE FROM api_streams WHERE id = ?", (stream_id,))

    def add_usage(self, rows: list[tuple]) -> None:
        """Add to the usage counts: rows of (user_id, day, key_id, model, requests, prompt, completion)."""
        self._call(_add_usage, rows)

    def tokens_used(self, user_id: int, day: str) -> int:
        """The account's prompt and completion tokens on `day` (YYYY-MM-DD, UTC), every key and model."""
        return self._call(_one, "SELECT CAST(coalesce(sum(prompt_tokens + completion_tokens), 0) AS BIGINT) AS n "
                                "FROM usage_days WHERE user_id = ? AND day = ?", (user_id, day))["n"]

    def usage(self, user_id: int | None, since: str) -> list[dict]:
        """Usage rows from `since` (a day) on, oldest first: one account's (0: everyone's without accounts),
        or every account's with its name (None)."""
        if user_id is None:
            return self._call(_all, "SELECT users.name, usage_days.* FROM usage_days JOIN users ON users.id = "
                                    "usage_days.user_id WHERE day >= ? ORDER BY day, lower(users.name), key_id, "
                                    "model", (since,))
        return self._call(_all, "SELECT * FROM usage_days WHERE user_id = ? AND day >= ? ORDER BY day, key_id, "
                                "model", (user_id, since))

    def user_for_key(self, key_hash: str) -> dict | None:
        """The account a key belongs to, with the key's id as `key_id` (its last use noted at most once a
        minute); None: no such key (never made, revoked, or its account removed)."""
        return self._call(_user_for_key, key_hash)


# Each transaction: run where the store runs its SQL, with `db` its connection.

_USER_COLUMNS = "id, name, password_hash, admin, tokens_per_day, max_streams, created_at, last_seen_at"


def _user_row(row: dict | None) -> dict | None:
    if row is not None:
        row["admin"] = bool(row["admin"])
    return row


def _add_user(db: Db, name: str, password_hash: str, admin: bool) -> dict:
    with db.transaction():
        if db.one("SELECT 1 AS found FROM users WHERE lower(name) = lower(?)", (name,)):
            raise UserExists(name)
        first_admin = admin and not db.one("SELECT 1 AS found FROM users WHERE admin = ?", (True,))
        user = _user_row(db.one(f"INSERT INTO users (name, password_hash, admin, created_at) VALUES (?, ?, ?, ?) "
                                f"RETURNING {_USER_COLUMNS}", (name, password_hash, bool(admin), time.time())))
        if first_admin:
            db.execute("UPDATE conversations SET user_id = ? WHERE user_id IS NULL", (user["id"],))
    return user


def _remove_user(db: Db, name: str) -> bool:
    with db.transaction():
        user = db.one("SELECT id FROM users WHERE lower(name) = lower(?)", (name,))
        if user is None:
            return False
        db.execute("DELETE FROM usage_days WHERE user_id = ?", (user["id"],))
        db.execute("DELETE FROM users WHERE id = ?", (user["id"],))
    return True


def _open_streams(db: Db, user_id: int, now: float) -> int:
    """The streams the account has open now: its /v1 streams and its page answers, whose owners live (the
    rest are forgotten here)."""
    reap_dead_runs(db, None, now)
    rows = db.all("SELECT id, owner, expires_at FROM api_streams WHERE user_id = ?", (user_id,))
    dead = [row["id"] for row in rows if not leases.alive(row["owner"], row["expires_at"], now)]
    for stream_id in dead:
        db.execute("DELETE FROM api_streams WHERE id = ?", (stream_id,))
    answers = db.one("SELECT count(*) AS n FROM runs JOIN conversations ON conversations.id = runs.conversation_id "
                     "WHERE conversations.user_id = ?", (user_id,))["n"]
    return len(rows) - len(dead) + answers


def _check_streams(db: Db, user_limit: tuple[int, int] | None, now: float) -> None:
    """TooManyStreams when the account is at its limit; its row locked until the transaction ends (two
    workers or nodes claiming at once take turns)."""
    if user_limit is None:
        return
    user_id, limit = user_limit
    db.one("SELECT id FROM users WHERE id = ?" + db.dialect.lock_row, (user_id,))
    running = _open_streams(db, user_id, now)
    if running >= limit:
        raise TooManyStreams(running, limit)


def _claim_stream(db: Db, user_id: int, owner: str, limit: int, expires_at: float) -> str:
    stream_id = secrets.token_hex(8)
    with db.transaction():
        _check_streams(db, (user_id, limit), time.time())
        db.execute("INSERT INTO api_streams (id, user_id, owner, expires_at) VALUES (?, ?, ?, ?)",
                   (stream_id, user_id, owner, expires_at))
    return stream_id


def _add_usage(db: Db, rows: list[tuple]) -> None:
    with db.transaction():
        db.executemany("INSERT INTO usage_days (user_id, day, key_id, model, requests, prompt_tokens, "
                       "completion_tokens) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, day, key_id, model) "
                       "DO UPDATE SET requests = usage_days.requests + excluded.requests, "
                       "prompt_tokens = usage_days.prompt_tokens + excluded.prompt_tokens, "
                       "completion_tokens = usage_days.completion_tokens + excluded.completion_tokens", rows)


def _set_password(db: Db, name: str, password_hash: str) -> bool:
    with db.transaction():
        user = db.one("SELECT id FROM users WHERE lower(name) = lower(?)", (name,))
        if user is None:
            return False
        db.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user["id"]))
        db.execute("DELETE FROM sessions WHERE user_id = ?", (user["id"],))
    return True


def _keys(db: Db, name: str) -> list[dict] | None:
    user = db.one("SELECT id FROM users WHERE lower(name) = lower(?)", (name,))
    if user is None:
        return None
    return db.all("SELECT id, label, created_at, last_used_at FROM api_keys WHERE user_id = ? "
                  "ORDER BY created_at, id", (user["id"],))


def _user_for_key(db: Db, key_hash: str) -> dict | None:
    row = db.one(f"SELECT api_keys.id AS key_id, api_keys.last_used_at AS key_used_at, "
                 f"{', '.join('users.' + column for column in _USER_COLUMNS.split(', '))} "
                 "FROM api_keys JOIN users ON users.id = api_keys.user_id WHERE api_keys.key_hash = ?", (key_hash,))
    if row is None:
        return None
    now, used_at = time.time(), row.pop("key_used_at")
    if used_at is None or now - used_at > 60:
        db.execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (now, row["key_id"]))
        db.execute("UPDATE users SET last_seen_at = ? WHERE id = ?", (now, row["id"]))
    return _user_row(row)


def _session_user(db: Db, session_id: str, max_age: float) -> dict | None:
    row = db.one(f"SELECT sessions.created_at AS signed_in_at, "
                 f"{', '.join('users.' + column for column in _USER_COLUMNS.split(', '))} "
                 "FROM sessions JOIN users ON users.id = sessions.user_id WHERE sessions.id = ?", (session_id,))
    now = time.time()
    if row is None or now - row.pop("signed_in_at") >= max_age:
        return None
    if row["last_seen_at"] is None or now - row["last_seen_at"] > 60:
        db.execute("UPDATE users SET last_seen_at = ? WHERE id = ?", (now, row["id"]))
    return _user_row(row)


def _sign_in_failures(db: Db, name: str, address: str, since: float) -> tuple[list[float], list[float]]:
    rows = db.all("SELECT name, at FROM sign_in_failures WHERE address = ? AND at >= ? ORDER BY at", (address, since))
    return [row["at"] for row in rows if row["name"] == name], [row["at"] for row in rows]


def _sign_in_failed(db: Db, name: str, address: str, forget_before: float) -> None:
    with db.transaction():
        db.execute("DELETE FROM sign_in_failures WHERE at < ?", (forget_before,))
        db.execute("INSERT INTO sign_in_failures (name, address, at) VALUES (?, ?, ?)", (name, address, time.time()))


def _all(db: Db, sql: str, args) -> list[dict]:
    return db.all(sql, args)


def _count(db: Db, sql: str, args) -> int:
    return db.count(sql, args)


def _one(db: Db, sql: str, args) -> dict | None:
    return db.one(sql, args)


def _list_conversations(db: Db, user_id: int | None = None) -> list[dict]:
    with db.transaction():
        reap_dead_runs(db, None, time.time())
        rows = db.all("SELECT id, title, created_at, updated_at, EXISTS (SELECT 1 FROM runs WHERE "
                      "runs.conversation_id = conversations.id) AS running FROM conversations WHERE EXISTS "
                      "(SELECT 1 FROM messages WHERE messages.conversation_id = conversations.id)"
                      + (" AND user_id = ?" if user_id is not None else "") + " ORDER BY updated_at DESC",
                      () if user_id is None else (user_id,))
    return [{**row, "running": bool(row["running"])} for row in rows]


def _import_conversations(db: Db, conversations: list[dict], user_id: int | None = None) -> list[str]:
    ids = []
    with db.transaction():
        for conversation in conversations:
            conversation_id, row, messages = import_rows(conversation)
            db.execute("INSERT INTO conversations (id, title, created_at, updated_at, settings, user_id) VALUES "
                       "(?, ?, ?, ?, ?, ?)", (*row, user_id))
            now = time.time()
            messages = [(*columns, json.dumps([_kept_file(db, conversation_id, attachment, now)
                                               for attachment in message["attachments"]])
                         if message.get("attachments") else None)
                        for columns, message in zip(messages, conversation["messages"], strict=True)]
            parents = [message.get("parent") for message in conversation["messages"]]
            leaf = conversation.get("leaf")
            if all(parent == index - 1 or (index == 0 and parent is None) for index, parent in enumerate(parents)) \
                    and leaf in (None, len(parents) - 1):
                db.executemany(_INSERT_IMPORTED, messages)  # one thread, in order: linked in two statements
                _chain(db, conversation_id)
            else:
                _insert_tree(db, conversation_id, messages, parents, leaf)
            ids.append(conversation_id)
    return ids


_INSERT_IMPORTED = ("INSERT INTO messages (conversation_id, role, content, reasoning, status, error, model, stats, "
                    "tools, created_at, updated_at, attachments) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_INSERT_IMPORTED_UNDER = ("INSERT INTO messages (conversation_id, role, content, reasoning, status, error, model, "
                          "stats, tools, created_at, updated_at, attachments, parent_id) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id")


def _insert_tree(db: Db, conversation_id: str, messages: list[tuple], parents: list, leaf: int | None) -> None:
    """A conversation with versions: each message under its parent's new id (parents come first)."""
    new_ids: list[int] = []
    for message, parent in zip(messages, parents, strict=True):
        new_ids.append(db.one(_INSERT_IMPORTED_UNDER, (*message, None if parent is None else new_ids[parent]))["id"])
    db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?",
               (new_ids[leaf] if leaf is not None and new_ids else None, conversation_id))


def _chain(db: Db, conversation_id: str) -> None:
    """A conversation whose messages came in one thread: each under the one before it, the last its leaf."""
    db.execute("UPDATE messages SET parent_id = (SELECT max(earlier.id) FROM messages AS earlier WHERE "
               "earlier.conversation_id = messages.conversation_id AND earlier.id < messages.id) "
               "WHERE conversation_id = ?", (conversation_id,))
    db.execute("UPDATE conversations SET leaf_id = (SELECT max(id) FROM messages WHERE conversation_id = ?) "
               "WHERE id = ?", (conversation_id, conversation_id))


def _search(db: Db, words: list[str], limit: int, user_id: int | None = None) -> list[dict]:
    rows = db.dialect.search_messages(db, words, limit * 4, user_id)  # several may be one conversation's
    mine = ("user_id = ? AND ", (user_id,)) if user_id is not None else ("", ())
    titles = db.all("SELECT id AS conversation_id, title FROM conversations WHERE " + mine[0]
                    + " AND ".join([f"title {db.dialect.like}"] * len(words)) + " ORDER BY updated_at DESC LIMIT ?",
                    (*mine[1], *[f"%{like_escaped(word)}%" for word in words], limit))
    return search_results(titles, rows, words, limit)


def _get_conversation(db: Db, conversation_id: str, every_version: bool = False) -> dict | None:
    with db.transaction():
        reap_dead_runs(db, conversation_id, time.time())
    row = db.one("SELECT id, title, created_at, updated_at, settings, leaf_id, EXISTS (SELECT 1 FROM runs WHERE "
                 "runs.conversation_id = conversations.id) AS running FROM conversations WHERE id = ?",
                 (conversation_id,))
    if row is None:
        return None
    messages = [message_of(message) for message in
                db.all(f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE conversation_id = ? ORDER BY id",
                       (conversation_id,))]
    branch = branch_of(messages, row["leaf_id"])
    return {**row, "running": bool(row["running"]), "settings": settings_of(row["settings"]),
            "leaf_id": branch[-1]["id"] if branch else None, "messages": messages if every_version else branch}


def _tree(db: Db, conversation_id: str) -> list[dict]:
    return db.all("SELECT id, parent_id, role, content, reasoning, status, stats, tools, attachments FROM messages "
                  "WHERE conversation_id = ? ORDER BY id", (conversation_id,))


def _set_leaf(db: Db, conversation_id: str, message_id: int) -> int | None:
    with db.transaction():
        tree = _tree(db, conversation_id)
        if not any(message["id"] == message_id for message in tree):
            return None
        leaf = newest_descendant(tree, message_id)
        db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf, conversation_id))
    return leaf


def _abandon_answer(db: Db, conversation_id: str, message_id: int, user_message_id: int | None,
                    leaf_id: int | None) -> None:
    with db.transaction():
        db.execute("DELETE FROM runs WHERE message_id = ?", (message_id,))
        db.execute("DELETE FROM messages WHERE conversation_id = ? AND id IN (?, ?)",
                   (conversation_id, message_id, user_message_id if user_message_id is not None else message_id))
        db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?", (leaf_id, conversation_id))


def _delete_conversation(db: Db, conversation_id: str) -> bool:
    with db.transaction():
        for run in db.all("SELECT message_id FROM runs WHERE conversation_id = ?", (conversation_id,)):
            db.dialect.notify(db, f"deleted {run['message_id']}")
        return db.count("DELETE FROM conversations WHERE id = ?", (conversation_id,)) > 0


def _add_message(db: Db, conversation_id, role, content, status, model, trace_id) -> int:
    """A message at the end of the current branch (tests and tools; the page's sends go through _start_answer)."""
    now = time.time()
    with db.transaction():
        parent = db.one("SELECT leaf_id FROM conversations WHERE id = ?", (conversation_id,))
        message_id = db.one("INSERT INTO messages (conversation_id, parent_id, role, content, status, model, trace_id, "
                            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                            (conversation_id, parent and parent["leaf_id"], role, content, status, model, trace_id,
                             now, now))["id"]
        db.execute("UPDATE conversations SET updated_at = ?, leaf_id = ? WHERE id = ?",
                   (now, message_id, conversation_id))
    return message_id


def _claim(db: Db, conversation_id: str, now: float, client: str | None, max_runs: int | None,
           user_limit: tuple[int, int] | None = None) -> None:
    """Lock the conversation for a new run: it exists, runs nothing, and the client and the account are
    under their limits."""
    claimed = db.one("SELECT 1 AS found FROM conversations WHERE id = ?" + db.dialect.lock_row, (conversation_id,))
    if claimed is None:
        raise NoSuchConversation(conversation_id)
    reap_dead_runs(db, conversation_id, now)
    if db.one("SELECT 1 AS found FROM runs WHERE conversation_id = ?", (conversation_id,)):
        raise ConversationBusy(conversation_id)
    if client is not None and max_runs is not None:
        reap_dead_runs(db, None, now)  # the client's answers elsewhere count only while they live
        running = db.one("SELECT count(*) AS running FROM runs WHERE client = ?", (client,))["running"]
        if running >= max_runs:
            raise TooManyRuns(running)
    _check_streams(db, user_limit, now)


def _branch_to(db: Db, conversation_id: str, message_id: int | None) -> list[dict]:
    """The messages from the root down to `message_id`, root first (none for None)."""
    by_id = {message["id"]: message for message in _tree(db, conversation_id)}
    branch = []
    while message_id is not None and message_id in by_id and len(branch) < len(by_id):
        branch.append(by_id[message_id])
        message_id = by_id[message_id]["parent_id"]
    branch.reverse()
    for message in branch:
        message["tools"] = tools_of(message["tools"])
        message["attachments"] = tools_of(message["attachments"])  # (JSON, as the tool steps)
    return branch


def _start_answer(db: Db, conversation_id, owner, parent_id, user_content, title, model, trace_id, client=None,
                  max_runs=None, user_limit=None, attachments=None):
    now = time.time()
    with db.transaction():
        _claim(db, conversation_id, now, client, max_runs, user_limit)
        leaf = db.one("SELECT leaf_id FROM conversations WHERE id = ?", (conversation_id,))["leaf_id"]
        if parent_id == "leaf":
            parent_id = leaf
        if parent_id is not None and not db.one("SELECT 1 AS found FROM messages WHERE id = ? AND conversation_id = ?",
                                                 (parent_id, conversation_id)):
            raise NoSuchConversation(conversation_id)  # the message it answers went with its conversation
        if user_content is not None:
            listed = json.dumps([_kept_file(db, conversation_id, attachment, now) for attachment in attachments]) \
                if attachments else None
            parent_id = db.one("INSERT INTO messages (conversation_id, parent_id, role, content, status, created_at, "
                               "updated_at, attachments) VALUES (?, ?, 'user', ?, 'complete', ?, ?, ?) RETURNING id",
                               (conversation_id, parent_id, user_content, now, now, listed))["id"]
        message_id = db.one("INSERT INTO messages (conversation_id, parent_id, role, content, status, model, trace_id, "
                            "created_at, updated_at) VALUES (?, ?, 'assistant', '', 'streaming', ?, ?, ?, ?) "
                            "RETURNING id", (conversation_id, parent_id, model, trace_id, now, now))["id"]
        db.execute("INSERT INTO runs (message_id, conversation_id, owner, lease_expires_at, client) "
                   "VALUES (?, ?, ?, ?, ?)", (message_id, conversation_id, owner, now + leases.LEASE_SECONDS, client))
        db.execute("UPDATE conversations SET title = coalesce(?, title), updated_at = ?, leaf_id = ? WHERE id = ?",
                   (title, now, message_id, conversation_id))
        history = _branch_to(db, conversation_id, parent_id)
    return message_id, history, leaf


def _kept_file(db: Db, conversation_id: str, attachment, now: float) -> dict:
    """A picture or file kept in the conversation (once per content hash): the message's link to it."""
    found = db.one("SELECT id FROM files WHERE conversation_id = ? AND sha256 = ?",
                   (conversation_id, attachment.sha256))
    file_id = found["id"] if found else secrets.token_urlsafe(16)
    if found is None:
        db.execute("INSERT INTO files (id, conversation_id, sha256, name, type, kind, size, data, text, sent, "
                   "sent_type, note, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (file_id, conversation_id, attachment.sha256, storable(attachment.name), attachment.type,
                    attachment.kind, len(attachment.data), attachment.data,
                    None if attachment.text is None else storable(attachment.text), attachment.sent,
                    attachment.sent_type, attachment.note, now))
    return attachment.public(file_id)


def _one(db: Db, sql: str, args) -> dict | None:
    return db.one(sql, args)


def _continue_answer(db: Db, conversation_id, message_id, owner, trace_id, client=None, max_runs=None,
                     user_limit=None):
    now = time.time()
    with db.transaction():
        _claim(db, conversation_id, now, client, max_runs, user_limit)
        message = db.one("SELECT role, content, status, error, stats, tools FROM messages WHERE id = ? AND "
                         "conversation_id = ?", (message_id, conversation_id))
        if message is None or message["role"] != "assistant" or not message["content"] or message["tools"]:
            return None  # (an answer that called tools: its steps are not continued, it is answered again)
        finish = (json.loads(message["stats"]) if message["stats"] else {}).get("finish_reason")
        if message["status"] not in CONTINUABLE and not (message["status"] == "complete" and finish == "length"):
            return None
        if db.one("SELECT 1 AS found FROM messages WHERE parent_id = ?", (message_id,)):
            return None  # something follows it: its end is no longer the end of the conversation
        db.execute("UPDATE messages SET status = 'streaming', error = NULL, trace_id = coalesce(?, trace_id), "
                   "updated_at = ? WHERE id = ?", (trace_id, now, message_id))
        db.execute("INSERT INTO runs (message_id, conversation_id, owner, lease_expires_at, client) "
                   "VALUES (?, ?, ?, ?, ?)", (message_id, conversation_id, owner, now + leases.LEASE_SECONDS, client))
        db.execute("UPDATE conversations SET updated_at = ?, leaf_id = ? WHERE id = ?",
                   (now, message_id, conversation_id))
        branch = _branch_to(db, conversation_id, message_id)
    branch[-1].update(status=message["status"], error=message["error"],  # how it had ended, until it goes on
                      stats=json.loads(message["stats"]) if message["stats"] else None)
    return branch


def _finish_answer(db: Db, message_id, content, status, error, reasoning, stats, reasoning_moved, tools) -> bool:
    with db.transaction():
        db.execute("DELETE FROM runs WHERE message_id = ?", (message_id,))
        return _save(db, message_id, content, status, error, reasoning, stats, reasoning_moved, tools)


def _tick_runs(db: Db, owner: str, renew: bool, held: tuple[int, ...] = ()) -> dict[int, tuple[bool, float | None]]:
    if renew:
        db.execute("UPDATE runs SET lease_expires_at = ? WHERE owner = ?", (time.time() + leases.LEASE_SECONDS, owner))
    rows = db.all("SELECT message_id, stop_requested, watched_at FROM runs WHERE owner = ?", (owner,))
    states = {row["message_id"]: (bool(row["stop_requested"]), row["watched_at"]) for row in rows}
    for message_id in held:
        if message_id not in states and _claim_again(db, owner, message_id):
            states[message_id] = (False, None)
    return states


def _claim_again(db: Db, owner: str, message_id: int) -> bool:
    """The owner of an answer that was marked interrupted while it could not renew its lease takes it back."""
    with db.transaction():
        message = db.one("SELECT conversation_id, status FROM messages WHERE id = ?", (message_id,))
        if message is None or message["status"] not in ("streaming", "interrupted"):
            return False  # deleted, or ended
        if db.one("SELECT 1 AS found FROM runs WHERE conversation_id = ?", (message["conversation_id"],)):
            return False  # a newer answer holds the conversation
        now = time.time()
        db.execute("INSERT INTO runs (message_id, conversation_id, owner, lease_expires_at) VALUES (?, ?, ?, ?)",
                   (message_id, message["conversation_id"], owner, now + leases.LEASE_SECONDS))
        db.execute("UPDATE messages SET status = 'streaming', error = NULL, updated_at = ? WHERE id = ?",
                   (now, message_id))
    return True


def _request_stop(db: Db, conversation_id: str) -> bool:
    with db.transaction():
        reap_dead_runs(db, conversation_id, time.time())
        stopped = db.all("UPDATE runs SET stop_requested = true WHERE conversation_id = ? RETURNING message_id",
                         (conversation_id,))
        for run in stopped:
            db.dialect.notify(db, f"stop {run['message_id']}")
    return bool(stopped)


def _follow(db: Db, message_id: int, touch: bool) -> dict | None:
    now = time.time()
    with db.transaction():
        row = db.one("SELECT conversation_id FROM messages WHERE id = ?", (message_id,))
        if row is None:
            return None
        reap_dead_runs(db, row["conversation_id"], now)
        if touch:
            db.execute("UPDATE runs SET watched_at = ? WHERE message_id = ?", (now, message_id))
        message = db.one("SELECT id, conversation_id, role, content, reasoning, reasoning_moved, status, error, "
                         "stats, tools, trace_id FROM messages WHERE id = ?", (message_id,))
    return message_of(message)
