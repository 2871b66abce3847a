"""Who may call Jarvis, from where, and the headers every response carries.

- With JARVIS_API_KEY set, every /v1/*, /api/*, /debug/* and /metrics request needs it:
  `Authorization: Bearer <key>` or `x-api-key: <key>` (the same check, compared
  in constant time; a wrong key in either header fails even with a good
  cookie), or the page's signed, HttpOnly, SameSite=Strict session cookie that
  POST /api/session sets. The cookie holds only a random session id; the session
  itself is kept in the store, so signing out revokes it on every worker, and a
  new key ends every session. /healthz, the page shell and its static files stay open.
- State-changing requests from another site are refused (Origin and
  Sec-Fetch-Site), so a page elsewhere cannot start, rename or delete anything.
- A request must name an allowed host (JARVIS_ALLOWED_HOSTS; by default loopback
  names and the address Jarvis listens on), else 421: a page that re-points its
  own name at 127.0.0.1 (DNS rebinding) is same-origin to the browser, but its
  requests still say its name. /healthz answers to any name, for load balancers.
- Every response says nosniff, no-referrer and no framing.

With accounts (jarvis.accounts; as soon as one exists), a person signs in on the page with a name and
password (POST /api/session {"username", "password"}), every /api/* request needs that session, and
every /v1/* request one of their personal API keys (or the session). JARVIS_API_KEY is then an operator
key for /metrics and /debug/* only, which an admin's session or key also opens. An unknown name and a
wrong password get the same 401 in the same time (jarvis.passwords).

Keys and passwords never appear in a log line or an error message.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import time
import urllib.parse

from flask import Blueprint, Flask, Response, current_app, g, request, session
from flask.sessions import SecureCookieSessionInterface

from jarvis import accounts, passwords, state
from jarvis.errors import ApiError
from jarvis.inputs import read_json_object
from jarvis.settings import Settings
from jarvis.stores import ConversationStore, UserExists

log = logging.getLogger(__name__)

bp = Blueprint("session", __name__, url_prefix="/api/session")

_PROTECTED = ("/v1/", "/api/", "/metrics", "/debug/")
_SIGN_IN_BYTES = 4096  # a key, in JSON: the only body anyone may send before signing in
_STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


def init_app(app: Flask, settings: Settings, store: ConversationStore) -> None:
    # The cookie-signing secret: JARVIS_SECRET_KEY, else one the store keeps (shared by every node).
    app.config.update(SECRET_KEY=settings.secret_key or store.secret(),
                      SESSION_COOKIE_NAME="jarvis_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict")
    app.session_interface = _SessionInterface()
    app.before_request(_check_request)
    app.after_request(_add_headers)
    app.register_blueprint(bp)


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed cookie, without building its signer for the requests that carry none (every
    OpenAI client's): an empty session, as Flask would give them after verifying nothing."""

    def open_session(self, app, request):
        if self.get_cookie_name(app) not in request.cookies:
            return self.session_class()
        return super().open_session(app, request)


def _key_check(key: str) -> str:
    """What a stored session keeps of the key it was made with (keyed with the secret; never in a
    cookie): a new key makes every session invalid."""
    return hmac.new(current_app.secret_key.encode(), b"jarvis-api-key:" + key.encode(), hashlib.sha256).hexdigest()


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _check_request() -> None:
    environ = request.environ
    if "HTTP_HOST" not in environ and environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
        # RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host (else the name it
        # falls back on, the listening address, would pass the host check below).
        raise ApiError(400, "An HTTP/1.1 request must send a Host header", code="missing_host")
    path = request.path
    if path != "/healthz":
        _refuse_unknown_host(state.settings())
    if request.method in _STATE_CHANGING:
        _refuse_cross_site()
    if not path.startswith(_PROTECTED):
        return
    if accounts.on():
        _check_account(path)
        return
    key = state.settings().api_key
    if key is None or path == "/api/session":
        return
    if not _authenticated(key):
        raise ApiError(401, "Send the API key as 'Authorization: Bearer <key>' or 'x-api-key: <key>', "
                            "or sign in on the page", code="invalid_api_key")


def _check_account(path: str) -> None:
    """Accounts mode: who is asking (`g.user`), or 401. /api/session itself is open (sign in and out)."""
    if path == "/api/session":
        return
    named = _named_by_proxy()
    if named is not None:
        g.user = named
        if path.startswith(("/metrics", "/debug/")) and not named["admin"]:
            raise ApiError(403, "Only an admin (or the operator's JARVIS_API_KEY) may read this", code="admin_only")
        return
    presented = _presented_keys()
    if presented:  # every key presented must be the same person's: a second header is never a bypass
        found = [state.store().user_for_key(passwords.key_hash(candidate)) for candidate in dict.fromkeys(presented)]
        user = found[0] if all(one is not None and one["id"] == found[0]["id"] for one in found) else None
        operator = state.settings().api_key
        if user is None and operator is not None and path.startswith(("/metrics", "/debug/")) and \
                all(hmac.compare_digest(candidate.encode(), operator.encode()) for candidate in presented):
            return  # the operator's key: /metrics and /debug/* only
        if user is None:
            raise ApiError(401, "That API key is not valid (revoked, or its account removed); make one with "
                                "'python -m jarvis.users key NAME'", code="invalid_api_key")
    else:
        session_id = session.get("sid")
        max_age = current_app.permanent_session_lifetime.total_seconds()
        user = state.store().session_user(session_id, max_age) if isinstance(session_id, str) else None
        if user is None:
            raise ApiError(401, "Sign in on the page, or send one of your API keys as 'Authorization: Bearer "
                                "<key>'", code="sign_in_required")
    if path.startswith(("/metrics", "/debug/")) and not user["admin"]:
        raise ApiError(403, "Only an admin (or the operator's JARVIS_API_KEY) may read this", code="admin_only")
    g.user = user


def _named_by_proxy() -> dict | None:
    """JARVIS_TRUSTED_USER_HEADER from a proxy gunicorn trusts (`forwarded_allow_ips`): that account, made
    on first sight (with no password: it signs in only through the proxy until one is set). From any
    other address the header is ignored. None: no such header, or not from a trusted proxy."""
    header = state.settings().trusted_user_header
    name = request.headers.get(header) if header else None
    if not name or not _trusted_proxy(request.environ.get("REMOTE_ADDR") or ""):
        return None
    name = name.strip()
    if not accounts.NAME.fullmatch(name):
        raise ApiError(401, f"The {header} header does not hold a valid account name", code="invalid_user_header")
    store = state.store()
    user = store.user(name)
    if user is None:
        try:
            user = store.add_user(name, accounts.NO_PASSWORD)
            log.info("made the account %s on its first sign-in through %s", name, header)
        except UserExists:
            user = store.user(name)
    return user


def trust_proxies(trusted) -> None:
    """Take gunicorn's `forwarded_allow_ips` (the worker's check of an address) as the proxies to trust."""
    global _trusted_proxy
    _trusted_proxy = trusted


def _presented_keys() -> list[str]:
    presented = []
    authorization = request.headers.get("Authorization")
    if authorization is not None:
        scheme, _, token = authorization.partition(" ")
        presented.append(token.strip() if scheme.lower() == "bearer" else "")
    if "x-api-key" in request.headers:
        presented.append(request.headers["x-api-key"].strip())
    return presented


def _authenticated(key: str) -> bool:
    presented = _presented_keys()
    if presented:  # every key presented must be right: a second header is never a bypass
        return all(hmac.compare_digest(candidate.encode(), key.encode()) for candidate in presented)
    session_id = session.get("sid")
    max_age = current_app.permanent_session_lifetime.total_seconds()
    return isinstance(session_id, str) and state.store().session_valid(session_id, _key_check(key), max_age)


def _refuse_unknown_host(settings: Settings) -> None:
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    host = host.strip("[]").lower()
    allowed = settings.allowed_hosts
    if allowed is None:
        listening = request.environ.get("SERVER_NAME", "")
        allowed = _LOOPBACK_NAMES | {listening.strip("[]").lower(), settings.bind.rsplit(":", 1)[0].strip("[]")}
        if host.endswith(".localhost") or _is_loopback_literal(host):
            return
    if "*" in allowed or host in allowed:
        return
    raise ApiError(421, f"This server does not answer to the name {host[:100]!r}: add it to JARVIS_ALLOWED_HOSTS "
                        "if it is yours", code="misdirected_request")


@functools.lru_cache(maxsize=1024)
def _is_loopback_literal(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_cross_site() -> None:
    fetch_site = request.headers.get("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        raise ApiError(403, "Cross-site requests are not accepted", code="cross_site")
    origin = request.headers.get("Origin")
    # Compare hosts, not schemes: behind a TLS-terminating proxy the page is https, Jarvis sees http.
    if origin is not None and urllib.parse.urlsplit(origin).netloc != request.host:
        raise ApiError(403, "Cross-site requests are not accepted", code="cross_site")


def _add_headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
    return response


@bp.get("")
def session_state():
    """Whether the page needs to ask for the key, or (`accounts`) for a name and password; who is signed in."""
    if accounts.on():
        session_id = session.get("sid")
        max_age = current_app.permanent_session_lifetime.total_seconds()
        user = _named_by_proxy() or \
            (state.store().session_user(session_id, max_age) if isinstance(session_id, str) else None)
        return {"required": True, "accounts": True, "signed_in": user is not None,
                "user": {"name": user["name"], "admin": user["admin"]} if user else None}
    key = state.settings().api_key
    return {"required": key is not None, "accounts": False, "signed_in": key is None or _authenticated(key),
            "user": None}


@bp.post("")
def sign_in():
    """Exchange the API key, or with accounts a name and password, for the page's session cookie (a new
    session at each sign-in: a cookie set before it never becomes signed in)."""
    body = read_json_object(limit=_SIGN_IN_BYTES)[1]
    if accounts.on():
        return _sign_in_as(body.get("username"), body.get("password"))
    key = state.settings().api_key
    candidate = body.get("key")
    if key is None:
        return "", 204
    if not isinstance(candidate, str) or not hmac.compare_digest(candidate.encode(), key.encode()):
        raise ApiError(401, "That is not the API key", code="invalid_api_key")
    session.clear()
    session["sid"] = state.store().create_session(_key_check(key))
    session.permanent = True
    return "", 204


# Guessing: after this many failed sign-ins within the window, one name from one address (or any names
# from one address) gets 429 until the oldest of them is older than the window. The right password still
# works from any other address, so a guesser cannot lock the account's owner out.
FAILURES_PER_NAME, FAILURES_PER_ADDRESS, FAILURE_WINDOW_SECONDS = 10, 30, 600.0


def _sign_in_as(name, password):
    name = name if isinstance(name, str) and 0 < len(name) <= 64 else None
    store, address, now = state.store(), client_address(request.environ), time.time()
    by_name, by_address = store.sign_in_failures(name or "", address, now - FAILURE_WINDOW_SECONDS)
    for failures, limit in ((by_name, FAILURES_PER_NAME), (by_address, FAILURES_PER_ADDRESS)):
        if len(failures) >= limit:
            wait = max(1, int(failures[-limit] + FAILURE_WINDOW_SECONDS - now) + 1)
            raise ApiError(429, f"Too many failed sign-ins from here: try again in {wait} s",
                           code="too_many_sign_ins", headers={"Retry-After": str(wait)})
    user = store.user(name) if name is not None else None
    # The same work and the same answer whether the name exists or not (a dummy hash for an unknown one).
    if not passwords.verify_off_hub(user["password_hash"] if user else None,
                                    password if isinstance(password, str) else ""):
        store.sign_in_failed(name or "", address, now - FAILURE_WINDOW_SECONDS)
        log.info("a failed sign-in from %s", address)
        raise ApiError(401, "Wrong name or password", code="invalid_credentials")
    store.sign_in_succeeded(name, address)
    session.clear()
    session["sid"] = state.store().create_session("", user["id"])
    session.permanent = True
    return "", 204


@bp.delete("")
def sign_out():
    """End the page's session, on the server too: a copy of the cookie no longer works anywhere."""
    session_id = session.get("sid")
    if isinstance(session_id, str):
        state.store().delete_session(session_id)
    session.clear()
    return "", 204


def client_address(environ: dict) -> str:
    """Who a request comes from, for per-client limits: the peer's address; behind a reverse proxy on
    loopback (gunicorn's default `forwarded_allow_ips`), the last address of X-Forwarded-For, which is
    the one that proxy saw (anything before it, the client could have written)."""
    peer = environ.get("REMOTE_ADDR") or "-"
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if forwarded and _trusted_proxy(peer):
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return peer


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


_trusted_proxy = _is_loopback  # gunicorn's default forwarded_allow_ips; its own setting once a worker runs
