"""Accounts on the request side: whether accounts are on, who is asking, and what is theirs.

Accounts mode starts as soon as one account exists (`python -m jarvis.users add NAME`), without a
restart: each worker asks the store whether any account exists once a second, in the background. Then every
/api/* request needs a page session signed in as someone, and every /v1/* request one of their
personal API keys (or that session); jarvis.security sets `g.user`. Without accounts, Jarvis behaves
exactly as before: `user_id()` is None, which the store reads as "everyone's".

Every conversation belongs to one account. A conversation of someone else is answered exactly as one
that does not exist (404), on every route that names one: the check is made once, before any view of
/api/conversations/<conversation_id>/... runs (jarvis.conversations), so a new route cannot forget it.
"""

from __future__ import annotations

import re
import time

import gevent
from flask import Blueprint, current_app, g, jsonify

from jarvis import passwords, state
from jarvis.errors import ApiError
from jarvis.inputs import read_json_object, text_field
from jarvis.stores import StoreUnavailable

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")  # an account's name (an e-mail address fits)
NO_PASSWORD = "!"  # what an account made by an identity proxy keeps as its password: no password matches it
_CHECK_SECONDS = 1.0
_WATCH = "jarvis.accounts"  # in the app's extensions


class _Watch:
    """Whether accounts exist, as last heard from the store, asked again in the background once a second:
    a request never waits for it, and a database outage neither opens nor closes the door (the last
    answer stands until the store answers again). The first ask is made by the first request that needs
    it, which fails as the store does (503) rather than guess."""

    def __init__(self, store):
        self.store = store
        self.exist = store.accounts_exist()
        self.asked_at = time.monotonic()
        self.asking: gevent.Greenlet | None = None

    def current(self) -> bool:
        if time.monotonic() - self.asked_at >= _CHECK_SECONDS and (self.asking is None or self.asking.dead):
            self.asked_at = time.monotonic()
            self.asking = gevent.spawn(self._ask)
        return self.exist

    def _ask(self) -> None:
        try:
            self.exist = self.store.accounts_exist()
        except StoreUnavailable:
            pass


def on() -> bool:
    """Whether accounts are on: an identity proxy names the users (JARVIS_TRUSTED_USER_HEADER), or an
    account exists, or a conversation still belongs to one (removing the last account must not open
    everyone's conversations to anyone); asked of the store once a second per worker, in the background."""
    if state.settings().trusted_user_header:
        return True
    watch = current_app.extensions.get(_WATCH)
    if watch is None:
        watch = current_app.extensions[_WATCH] = _Watch(state.store())
    return watch.current()


def forget() -> None:
    """Ask the store again at the next request (an account was just added or removed in this process)."""
    current_app.extensions.pop(_WATCH, None)


def user_id() -> int | None:
    """Whose the request's conversations are: the signed-in account's id; None without accounts."""
    current = g.get("user")
    return current["id"] if current is not None else None


def check_owner(conversation_id: str) -> None:
    """404 for a conversation that is not the signed-in account's, exactly as for one that does not exist."""
    current = g.get("user")
    if current is None:
        return
    exists, owner = state.store().conversation_owner(conversation_id)
    if not exists or owner != current["id"]:
        raise ApiError(404, "No such conversation", code="conversation_not_found")


# -- the signed-in person's own account: GET /api/account, their personal API keys ------------------------

bp = Blueprint("account", __name__, url_prefix="/api/account")
_KEYS_PER_ACCOUNT = 50


def _signed_in() -> dict:
    current = g.get("user")
    if current is None:
        raise ApiError(404, "Jarvis has no accounts: make one with 'python -m jarvis.users add NAME'",
                       code="no_accounts")
    return current


@bp.get("")
def account():
    """Who is signed in, and their keys (ids and labels; never the keys)."""
    current = _signed_in()
    return {"name": current["name"], "admin": current["admin"], "keys": state.store().keys(current["name"]) or []}


@bp.post("/keys")
def make_key():
    """A new personal API key ({"label"}): 201 with the key, shown this once."""
    current = _signed_in()
    label = text_field(read_json_object(limit=4096)[1], "label", required=False) or ""
    if len(state.store().keys(current["name"]) or []) >= _KEYS_PER_ACCOUNT:
        raise ApiError(400, f"An account may have at most {_KEYS_PER_ACCOUNT} keys: revoke one first",
                       code="too_many_keys")
    key_id, key, kept = passwords.new_key()
    if not state.store().add_key(current["name"], key_id, kept, label[:100]):
        raise ApiError(404, "No such account", code="no_accounts")
    return jsonify(id=key_id, label=label[:100], key=key), 201


@bp.delete("/keys/<key_id>")
def revoke_key(key_id):
    """Revoke one of your keys; anyone else's id is answered as one that does not exist."""
    if not state.store().revoke_key(key_id, _signed_in()["id"]):
        raise ApiError(404, "No such key", code="key_not_found")
    return "", 204
