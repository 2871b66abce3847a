"""Passwords and personal API keys: what is kept of them, and how one is checked.

Passwords are hashed with Argon2id through `argon2-cffi`, with OWASP's first recommended setting
(19 MiB of memory, 2 passes, 1 lane: Password Storage Cheat Sheet). Checking one is CPU and memory
work in C of some tens of milliseconds, so it runs on gevent's thread pool, never on the hub. A name
that has no account is checked against a dummy hash of the same cost, so an unknown name and a wrong
password take the same time and get the same answer.

Personal API keys are 32 random bytes (`jv-` + URL-safe base64): guessing one is hopeless, so a fast
SHA-256 of the key is enough to find it and keeps the key itself out of the database; the key is shown
once, when it is made. Its id (`key_` + 12 hex digits) names it in listings and revocations.
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
MIN_LENGTH = 8
MAX_LENGTH = 1024  # Argon2 takes any length; a bound keeps a megabyte "password" from costing anything more
# What a name with no account is checked against: the hash of a random password, made once with HASHER's
# settings and thrown away (tests/test_accounts.py checks they still match). Written here rather than
# hashed at import, which cost every worker 35 ms of Argon2 as it started. Never a match: `verify` also
# asks that an account exist.
_DUMMY = "$argon2id$v=19$m=19456,t=2,p=1$zLa3I89iqQUA29/YgToUOQ$nroZ7Y+ngcC7BGlPaL+6ezevaIV8DZ1S0HA1CR40eV8"


class BadPassword(ValueError):
    """A password too short or too long to be set."""


def checked(password: str) -> str:
    if not isinstance(password, str) or not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise BadPassword(f"A password must have {MIN_LENGTH} to {MAX_LENGTH} characters")
    return password


def hash_password(password: str) -> str:
    return HASHER.hash(checked(password))


def verify(password_hash: str | None, password: str) -> bool:
    """Whether `password` is the one `password_hash` was made from; None (no such account) costs the same
    and is never right. Blocking: call through `verify_off_hub` from a request."""
    if not isinstance(password, str) or len(password) > MAX_LENGTH:
        password = ""
    try:
        return HASHER.verify(password_hash or _DUMMY, password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def verify_off_hub(password_hash: str | None, password: str) -> bool:
    """`verify` on gevent's thread pool: the hub keeps serving meanwhile."""
    import gevent

    return gevent.get_hub().threadpool.apply(verify, (password_hash, password))


def hash_off_hub(password: str) -> str:
    """`hash_password` on gevent's thread pool (BadPassword is raised here, before any work)."""
    import gevent

    return gevent.get_hub().threadpool.apply(HASHER.hash, (checked(password),))


def new_key() -> tuple[str, str, str]:
    """A new personal API key: (its id, the key, what the store keeps of it)."""
    key = "jv-" + secrets.token_urlsafe(32)
    return "key_" + secrets.token_hex(6), key, key_hash(key)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
