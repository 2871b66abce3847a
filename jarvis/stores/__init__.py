"""The conversation store: conversations that survive Stop, reloads, closed tabs, crashed workers and
(with PostgreSQL) other nodes. Like jarvis.backends, one interface and its implementations:

    ConversationStore   the interface the page API, the runs and the sign-in use (below)
    stores.sql          every transaction, written once against a small dialect
    stores.sqlite       SQLite in WAL mode under JARVIS_DATA_DIR, on one thread of its own
    stores.postgres     PostgreSQL (JARVIS_DATABASE_URL), shared by several nodes; imported only then
    stores.common       what both need around the SQL: text both can hold, search words, import rows

An assistant message moves through: streaming -> complete | stopped | error, or -> interrupted when
whoever looks next finds the worker that ran it gone (jarvis.leases). It keeps its content, a thinking
model's reasoning (never sent upstream again) and the stats shown under it.

Any failure of the database itself (a full disk, a lock held too long, a server that went away, no
connection within JARVIS_STORE_TIMEOUT_SECONDS) reaches callers as `StoreUnavailable`, which every route
answers with 503, OpenAI's error JSON and Retry-After (jarvis.errors).

This package's top level imports only the standard library: gunicorn's master imports it.
"""

from __future__ import annotations

from typing import Protocol

STATUSES = ("streaming", "complete", "stopped", "error", "interrupted")
INTERRUPTED_NOTE = "The server that was writing this answer stopped before it finished"


class StoreError(RuntimeError):
    """The database cannot be used by this version of Jarvis (a newer schema), or cannot be reached at start."""


class StoreUnavailable(RuntimeError):
    """The database failed or did not answer in time; nothing was changed. Worth retrying."""


class NoSuchConversation(LookupError):
    """The conversation does not exist (any more)."""


class ConversationBusy(RuntimeError):
    """The conversation already has an answer running, on this worker or another."""


class TooManyRuns(RuntimeError):
    """The client already has as many answers running as it may (JARVIS_MAX_RUNS_PER_CLIENT)."""

    def __init__(self, running: int):
        super().__init__(f"{running} answers running")
        self.running = running


class ConversationStore(Protocol):
    def list_conversations(self) -> list[dict]: ...
    def create_conversation(self, title: str, settings: dict | None = None) -> dict: ...
    def update_conversation_settings(self, conversation_id: str, settings: dict) -> bool: ...
    def import_conversations(self, conversations: list[dict]) -> list[str]: ...
    def search(self, query: str, limit: int = 50) -> list[dict]: ...
    def get_conversation(self, conversation_id: str, *, every_version: bool = False) -> dict | None: ...
    def rename_conversation(self, conversation_id: str, title: str) -> bool: ...
    def retitle(self, conversation_id: str, was: str, title: str) -> bool: ...
    def delete_conversation(self, conversation_id: str) -> bool: ...
    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete",
                    model: str | None = None, trace_id: str | None = None) -> int: ...
    def update_message(self, message_id: int, content: str, status: str, error: str | None = None, *,
                       reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False) -> bool: ...
    def update_message_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                             reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False): ...
    def set_leaf(self, conversation_id: str, message_id: int) -> int | None: ...
    def abandon_answer(self, conversation_id: str, message_id: int, user_message_id: int | None,
                       leaf_id: int | None) -> None: ...
    def start_answer(self, conversation_id: str, *, owner: str, parent_id: int | None | str = "leaf",
                     user_content: str | None = None, title: str | None = None, model: str | None = None,
                     trace_id: str | None = None, client: str | None = None,
                     max_runs: int | None = None) -> tuple[int, list[dict], int | None]: ...
    def continue_answer(self, conversation_id: str, message_id: int, *, owner: str, trace_id: str | None = None,
                        client: str | None = None, max_runs: int | None = None) -> list[dict] | None: ...
    def finish_answer_later(self, message_id: int, content: str, status: str, error: str | None = None, *,
                            reasoning: str = "", stats: dict | None = None, reasoning_moved: bool = False): ...
    def tick_runs(self, owner: str, *, renew: bool, held=()) -> dict[int, tuple[bool, float | None]]: ...
    def request_stop(self, conversation_id: str) -> bool: ...
    def follow(self, message_id: int, *, touch: bool) -> dict | None: ...
    def listen(self, heard) -> None: ...
    def subscribe(self, message_id: int): ...
    def unsubscribe(self, message_id: int, event) -> None: ...
    def create_session(self, key_check: str) -> str: ...
    def session_valid(self, session_id: str, key_check: str, max_age: float) -> bool: ...
    def delete_session(self, session_id: str) -> None: ...
    def secret(self) -> str: ...
    def status(self) -> dict | None: ...
    def schema_version(self) -> int: ...
    def close(self) -> None: ...


def open_store(settings) -> ConversationStore:
    """PostgreSQL when JARVIS_DATABASE_URL is set (imported only then, after gevent's patch), else SQLite."""
    if settings.database_url:
        from jarvis.stores.postgres import PostgresStore

        return PostgresStore(settings.database_url, settings.store_timeout_seconds)
    from jarvis.stores.sqlite import SQLiteStore

    return SQLiteStore(settings.data_dir, settings.store_busy_seconds)
