"""An account's limits on the request side, and its usage as the page API gives it (GET /api/usage).

Before a request starts (a /v1 request, a page's answer): its account's `tokens_per_day` is checked
against the store's count of the day (UTC) plus what this worker has not written yet (jarvis.usage):
at or over it, 429 `daily_token_limit` with Retry-After until midnight UTC and `x-should-retry:
false` (the OpenAI SDKs retry a 429 otherwise; waiting seconds will not help). Its `max_streams`
counts its open /v1 requests (a row each in the store, on any worker or node, gone when the request
ends or its process dies; jarvis.relay gives it back before the last bytes go out) and its page
answers (their runs, claimed in the same transaction as the answer): at the limit, 429
`too_many_streams`. A stream under way is never cut by a limit.
"""

from __future__ import annotations

import datetime
import time

from flask import Blueprint, g, jsonify, request

from jarvis import state
from jarvis.errors import ApiError
from jarvis.stores import TooManyStreams
from jarvis.usage import month_start, seconds_to_midnight, summary, today


def account_of_request() -> tuple[int, str]:
    """Whom a request's usage counts to: (account id, key id — '' for the page); (0, '') without accounts."""
    user = g.get("user")
    if user is None:
        return 0, ""
    return user["id"], user.get("key_id") or ""


def check_daily_tokens(user: dict | None) -> None:
    """429 daily_token_limit when the signed-in account has used its tokens of the day (UTC)."""
    limit = user.get("tokens_per_day") if user else None
    if limit is None:
        return
    day = today()
    used = state.store().tokens_used(user["id"], day) + state.meter().pending_tokens(user["id"], day)
    if used >= limit:
        wait = seconds_to_midnight()
        raise ApiError(429, f"You have used {used} of your {limit} tokens of today (UTC); the count starts again "
                            f"in {wait // 3600} h {wait % 3600 // 60} min", code="daily_token_limit",
                       headers={"Retry-After": str(wait), "x-should-retry": "false"})


def too_many_streams(error: TooManyStreams) -> ApiError:
    return ApiError(429, f"You already have {error.running} answers or API streams open, the most your account "
                         f"may have ({error.limit}): stop one, or wait for one to end", code="too_many_streams",
                    headers={"Retry-After": "2"})


def stream_limit(user: dict | None) -> tuple[int, int] | None:
    """(account id, max_streams) for an account held to a number of streams; None: no limit."""
    if user is None or user.get("max_streams") is None:
        return None
    return user["id"], user["max_streams"]


def claim_stream(user: dict | None, expires_in: float):
    """Claim one of the account's streams for a /v1 request; returns what gives it back (None: no limit)."""
    limit = stream_limit(user)
    if limit is None:
        return None
    store = state.store()
    try:
        stream_id = store.claim_stream(limit[0], state.runs().owner, limit[1], time.time() + expires_in)
    except TooManyStreams as error:
        raise too_many_streams(error) from None
    return lambda: store.release_stream(stream_id)


# -- GET /api/usage: your own -------------------------------------------------------------------------------

bp = Blueprint("usage", __name__, url_prefix="/api/usage")


def since_param() -> str:
    """?since=YYYY-MM-DD (UTC); by default the first day of this month."""
    since = request.args.get("since")
    if since is None:
        return month_start()
    try:
        return datetime.date.fromisoformat(since).isoformat()
    except ValueError:
        raise ApiError(400, "'since' must be a day, YYYY-MM-DD", param="since", code="invalid_value") from None


@bp.get("")
def own_usage():
    """The signed-in account's usage (without accounts: everyone's) from ?since= (this month by default),
    and its limits."""
    state.meter().flush()  # this worker's last second too
    user = g.get("user")
    since = since_param()
    result = summary(state.store().usage(user["id"] if user else 0, since))
    limits = {"tokens_per_day": user.get("tokens_per_day"), "max_streams": user.get("max_streams")} if user else \
        {"tokens_per_day": None, "max_streams": None}
    return jsonify(since=since, **result, limits=limits)
