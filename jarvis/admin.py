"""The admin's page API: accounts and everyone's usage (/api/admin/*), for an admin's session or key.

An admin manages accounts — adds and removes them, sets a new password, sets limits — and reads how
much each one used. An admin does not read other people's conversations: nothing here names one.
Everything here is also the operator's command (python -m jarvis.users). Without accounts these
routes answer 404 (there is no one to manage); a signed-in account that is not an admin gets 403.
"""

from __future__ import annotations

import logging

from flask import Blueprint, g, jsonify

from jarvis import accounts, limits, passwords, state, usage
from jarvis.errors import ApiError
from jarvis.inputs import read_json_object
from jarvis.stores import UserExists

log = logging.getLogger(__name__)

bp = Blueprint("admin", __name__, url_prefix="/api/admin")

_MAX_LIMIT = 10**12


@bp.before_request
def _admins_only() -> None:
    user = g.get("user")
    if user is None:
        raise ApiError(404, "Jarvis has no accounts: make one with 'python -m jarvis.users add NAME --admin'",
                       code="no_accounts")
    if not user["admin"]:
        raise ApiError(403, "Only an admin may manage accounts", code="admin_only")


def _public(user: dict) -> dict:
    return {name: user[name] for name in ("name", "admin", "tokens_per_day", "max_streams", "created_at",
                                          "last_seen_at")}


def _existing(name: str) -> dict:
    user = state.store().user(name)
    if user is None:
        raise ApiError(404, "No such account", code="user_not_found")
    return user


@bp.get("/users")
def users():
    """Every account, with its usage this month."""
    state.meter().flush()
    store = state.store()
    rows = store.usage(None, usage.month_start())
    return jsonify(data=[{**_public(user), "usage": usage.summary([row for row in rows
                                                                  if row["user_id"] == user["id"]])["total"]}
                         for user in store.users()])


@bp.post("/users")
def add_user():
    """A new account ({"username", "password", "admin"}): 201 with it."""
    body = read_json_object(limit=4096)[1]
    name, password, admin = body.get("username"), body.get("password"), body.get("admin", False)
    if not isinstance(name, str) or not accounts.NAME.fullmatch(name):
        raise ApiError(400, "A name is 1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or "
                            "digit", param="username", code="invalid_value")
    if not isinstance(admin, bool):
        raise ApiError(400, "'admin' must be true or false", param="admin", code="invalid_type")
    try:
        password_hash = passwords.hash_off_hub(password)
    except passwords.BadPassword as error:
        raise ApiError(400, str(error), param="password", code="invalid_value") from None
    try:
        user = state.store().add_user(name, password_hash, admin=admin)
    except UserExists:
        raise ApiError(409, "An account of that name exists already", param="username", code="user_exists") from None
    log.info("an admin added an account")
    return jsonify(_public(user)), 201


@bp.patch("/users/<name>")
def change_user(name):
    """Limits ({"tokens_per_day", "max_streams"}: a number, or null for none) and a new password
    ({"password"}: the account's sessions end); what the body leaves out stays."""
    body = read_json_object(limit=4096)[1]
    user = _existing(name)
    store = state.store()
    changes = {}
    for field in ("tokens_per_day", "max_streams"):
        if field in body:
            value = body[field]
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value <= _MAX_LIMIT):
                raise ApiError(400, f"'{field}' must be a whole number from 1, or null for no limit", param=field,
                               code="invalid_value")
            changes[field] = value
    if "password" in body:
        try:
            password_hash = passwords.hash_off_hub(body["password"])
        except passwords.BadPassword as error:
            raise ApiError(400, str(error), param="password", code="invalid_value") from None
        store.set_password(user["name"], password_hash)
        log.info("an admin set a new password for an account")
    if changes:
        store.set_limits(user["name"], changes.get("tokens_per_day", user["tokens_per_day"]),
                         changes.get("max_streams", user["max_streams"]))
    return jsonify(_public(_existing(user["name"])))


@bp.delete("/users/<name>")
def remove_user(name):
    """Remove an account, its sessions, keys and usage at once (not your own: another admin may)."""
    user = _existing(name)
    if user["id"] == g.user["id"]:
        raise ApiError(400, "You cannot remove your own account here; another admin, or "
                            "'python -m jarvis.users remove', can", code="cannot_remove_self")
    if not state.store().remove_user(user["name"]):
        raise ApiError(404, "No such account", code="user_not_found")
    log.info("an admin removed an account")
    return "", 204


@bp.get("/usage")
def everyones_usage():
    """Every account's usage from ?since= (YYYY-MM-DD; this month by default), by day, model and key."""
    state.meter().flush()
    since = limits.since_param()
    rows = state.store().usage(None, since)
    names = sorted({row["name"] for row in rows}, key=str.lower)
    return jsonify(since=since, users=[{"name": name, **usage.summary([row for row in rows if row["name"] == name])}
                                       for name in names])
