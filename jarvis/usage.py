"""Usage: what each request used, counted per account, key, model and day (the limits read from it
are jarvis.limits).

Counting. The upstream's own `usage` (or llama.cpp's `timings`) when it sends it, else one token per
event with text, as the stats under a page's answer count. A page's answer parses every chunk anyway
(jarvis.answer), and its counts are used as they are (the page always asks for usage). A /v1 stream is
relayed without parsing, and a scan of every chunk for text cost 1–2.6 µs a chunk (against 6–12 µs
for relaying it, bench/run.py), so its `Tally` only counts events and keeps the first and last few:
a usage object comes at the end, and the events without text (the role chunk, the finish chunk, a
usage chunk) at the edges. An event without text in the middle of a chat stream counts as a token
(a tool call's argument chunk is one). A Responses stream, whose events without text are many and
in the middle, is scanned event by event. A whole answer's body is read once.

Recording. When a request ends, its relay adds it to its worker's `Meter`: prometheus's
jarvis_tokens_total{direction} at once (no account label: bounded cardinality), and the account's
row of the day in the store once a second, for every request of that second in one transaction (a
store that is away keeps them here until it answers). Without accounts everything is counted to
account 0. Probes Jarvis makes for itself (can a server continue an answer?) count to nobody.
"""

from __future__ import annotations

import json
import logging
import re
import time
import weakref

import gevent

from jarvis import metrics
from jarvis.stores import StoreUnavailable
from jarvis.streams import has_text

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
_RETRY_SECONDS = 5.0
_MAX_REPORTED = 100_000_000  # an upstream's token count beyond this is not believed
_MODEL_CHARS = 200

# A Responses event with text, and an event that carries a usage or timings object (not `"usage": null`,
# which OpenAI sends on every chunk once usage is asked for). Whether a chat event has text:
# jarvis.streams.has_text, which also tells a stream's phase.
_DELTA = re.compile(rb'"delta":\s*"(?!")')  # a Responses event with text (its .done events repeat it whole)
_REPORTED = re.compile(rb'"(?:usage|timings)":\s*\{')


class Tally:
    """What one request used, from its events as they pass: counted, and the first and last few kept."""

    __slots__ = ("events", "first", "previous", "last", "each", "texts", "body")
    EDGE = 4  # events looked at, at each end

    def __init__(self, each_event: bool = False):
        self.events = 0
        self.first: list[bytes] | None = None
        self.previous: list[bytes] = []
        self.last: list[bytes] = []
        self.each = each_event  # look at every event for text (a Responses stream)
        self.texts = 0  # events with text, when looking at each
        self.body: bytes | None = None  # a whole answer

    def feed(self, batch: list[bytes]) -> None:
        self.events += len(batch)
        if self.first is None:
            self.first = batch
        self.previous, self.last = self.last, batch
        if self.each:
            self.texts += sum(1 for payload in batch if _DELTA.search(payload))

    def whole(self, body: bytes) -> None:
        """A whole (non-streamed) answer's body."""
        self.body = body

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion): as the upstream reported them, else the events with text (no prompt count)."""
        if self.body is not None:
            reported = _reported(self.body) if _REPORTED.search(self.body) else None
            return reported if reported is not None else (0, 0)
        tail = (self.previous + self.last)[-self.EDGE:]
        prompt = completion = None
        for payload in tail:
            if (b'"usage"' in payload or b'"timings"' in payload) and _REPORTED.search(payload):
                found = _reported(payload)
                if found is not None:  # (a later report fills in what an earlier one lacked)
                    prompt = found[0] if found[0] is not None else prompt
                    completion = found[1] if found[1] is not None else completion
        if completion is not None:
            return prompt or 0, completion
        if self.each:
            return prompt or 0, self.texts
        edges = {id(payload): payload for payload in [*(self.first or [])[:self.EDGE], *tail]}
        without_text = sum(1 for payload in edges.values() if not has_text(payload))
        return prompt or 0, max(0, self.events - without_text)


def _reported(payload: bytes) -> tuple[int | None, int | None] | None:
    """(prompt, completion) from an event's or a body's usage or timings object; None: none in it."""
    if payload.startswith(b"event:") or b"\ndata:" in payload:  # a Responses event, relayed whole
        payload = payload.partition(b"data:")[2]
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if not isinstance(usage, dict) and isinstance(data.get("response"), dict):
        usage = data["response"].get("usage")  # response.completed
    if isinstance(usage, dict):
        return _count(usage, "prompt_tokens", "input_tokens"), _count(usage, "completion_tokens", "output_tokens")
    if isinstance(data.get("timings"), dict):
        return _count(data["timings"], "prompt_n"), _count(data["timings"], "predicted_n")
    return None


def _count(source: dict, *names: str) -> int | None:
    for name in names:
        value = source.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_REPORTED:
            return value
    return None


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def month_start() -> str:
    """The first day of this month (UTC), as usage is read by default."""
    return today()[:8] + "01"


def seconds_to_midnight() -> int:
    now = time.time()
    return max(1, int(86400 - now % 86400) + 1)


_METERS: weakref.WeakSet = weakref.WeakSet()


class Meter:
    """This worker's usage on its way to the store: added up in memory, written once a second."""

    def __init__(self, store):
        self.store = store
        self.pending: dict[tuple[int, str, str, str], list[int]] = {}
        self.flusher: gevent.Greenlet | None = None
        self.failing = 0
        self.closed = False
        _METERS.add(self)

    def add(self, account: tuple[int, str] | None, model: str, prompt: int, completion: int) -> None:
        """One request's use: to the metrics always, and to `account` (user id, key id) when it has one."""
        if prompt:
            metrics.TOKENS.labels("prompt").inc(prompt)
        if completion:
            metrics.TOKENS.labels("completion").inc(completion)
        if account is None:
            return
        row = self.pending.setdefault((account[0], today(), account[1], model[:_MODEL_CHARS]), [0, 0, 0])
        row[0] += 1
        row[1] += prompt
        row[2] += completion
        if self.flusher is None and not self.closed:
            self.flusher = gevent.spawn_later(FLUSH_SECONDS, self._scheduled)

    def _scheduled(self) -> None:
        self.flusher = None
        self.flush()

    def flush(self) -> bool:
        """Write what is pending (False: the store refused; it stays pending and is tried again)."""
        if not self.pending:
            return True
        pending, self.pending = self.pending, {}
        try:
            self.store.add_usage([(*key, *counts) for key, counts in pending.items()])
        except Exception as error:
            for key, counts in pending.items():
                row = self.pending.setdefault(key, [0, 0, 0])
                for index, value in enumerate(counts):
                    row[index] += value
            self.failing += 1
            if self.failing == 1 or self.failing % 60 == 0:
                log.warning("could not write the usage counts to the store (%s); they are kept and tried again",
                            error if isinstance(error, StoreUnavailable) else type(error).__name__)
            if self.flusher is None and not self.closed:
                self.flusher = gevent.spawn_later(_RETRY_SECONDS, self._scheduled)
            return False
        if self.failing:
            log.info("the usage counts were written after %d failed tries", self.failing)
            self.failing = 0
        return True

    def close(self) -> None:
        """Write what is pending, once, and schedule nothing more (an app thrown away, as in tests: a timer
        left behind would write to a closed store during a later test)."""
        self.closed = True
        if self.flusher is not None:
            self.flusher.kill(block=False)
            self.flusher = None
        self.flush()

    def pending_tokens(self, user_id: int, day: str) -> int:
        return sum(counts[1] + counts[2] for (user, when, _, _), counts in self.pending.items()
                   if user == user_id and when == day)


def flush_all() -> None:
    """Write every meter's pending counts (a worker that stops)."""
    for meter in list(_METERS):
        meter.flush()


# -- reading it ---------------------------------------------------------------------------------------


def summary(rows: list[dict]) -> dict:
    """Usage rows as {"total", "days": [{"day", counts..., "models": {model: counts}, "keys": {key: counts}}]}."""
    total = _zero()
    days: dict[str, dict] = {}
    for row in rows:
        counts = {name: int(row[name]) for name in _zero()}
        day = days.setdefault(row["day"], {"day": row["day"], **_zero(), "models": {}, "keys": {}})
        for name, value in counts.items():
            total[name] += value
            day[name] += value
            for group, label in (("models", row["model"] or "-"), ("keys", row["key_id"] or "page")):
                day[group].setdefault(label, _zero())[name] += value
    return {"total": total, "days": list(days.values())}


def _zero() -> dict:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
