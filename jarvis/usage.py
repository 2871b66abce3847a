"""Usage: what each request used, counted per account, key, model and day (the limits read from it
are jarvis.limits).

Counting. Every relay keeps a `Tally` of its stream as its events pass (jarvis.relay): the upstream's
own `usage` (or llama.cpp's `timings`) when it sends it, else one token per event with text, as the
stats under a page's answer count (jarvis.answer). A chunk is parsed only when it carries such an
object: a regular expression over its bytes decides, so an ordinary token costs two searches of a
short string (bench/run.py measures the relay with it). A whole answer's body is read once.

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

log = logging.getLogger(__name__)

FLUSH_SECONDS = 1.0
_RETRY_SECONDS = 5.0
_MAX_REPORTED = 100_000_000  # an upstream's token count beyond this is not believed
_MODEL_CHARS = 200

# An event with text (a chat delta's content or reasoning, a completion's text, a Responses delta),
# and one that carries a usage or timings object (not `"usage": null`, which OpenAI sends on every chunk).
_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning|text|delta)":\s*"(?!")')
_REPORTED = re.compile(rb'"(?:usage|timings)":\s*\{')


class Tally:
    """What one request used, read from its events as they pass."""

    __slots__ = ("chunks", "prompt", "completion")

    def __init__(self):
        self.chunks = 0  # events with text
        self.prompt: int | None = None  # as the upstream reported them
        self.completion: int | None = None

    def feed(self, batch: list[bytes]) -> None:
        for payload in batch:
            if _TEXT.search(payload):
                self.chunks += 1
            if _REPORTED.search(payload):
                self._read(payload)

    def whole(self, body: bytes) -> None:
        """A whole (non-streamed) answer's body."""
        if _REPORTED.search(body):
            self._read(body)

    def _read(self, payload: bytes) -> None:
        if payload.startswith(b"event:") or b"\ndata:" in payload:  # a Responses event, relayed whole
            payload = payload.partition(b"data:")[2]
        try:
            data = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(data, dict):
            return
        usage = data.get("usage")
        if not isinstance(usage, dict) and isinstance(data.get("response"), dict):
            usage = data["response"].get("usage")  # response.completed
        if isinstance(usage, dict):
            prompt = _count(usage, "prompt_tokens", "input_tokens")
            completion = _count(usage, "completion_tokens", "output_tokens")
        elif isinstance(data.get("timings"), dict):
            prompt = _count(data["timings"], "prompt_n")
            completion = _count(data["timings"], "predicted_n")
        else:
            return
        self.prompt = prompt if prompt is not None else self.prompt
        self.completion = completion if completion is not None else self.completion

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion): as reported, else the events with text (and no prompt count)."""
        return (self.prompt or 0), (self.completion if self.completion is not None else self.chunks)


def _count(source: dict, *names: str) -> int | None:
    for name in names:
        value = source.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_REPORTED:
            return value
    return None


def today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


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
        if self.flusher is None:
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
            if self.flusher is None:
                self.flusher = gevent.spawn_later(_RETRY_SECONDS, self._scheduled)
            return False
        if self.failing:
            log.info("the usage counts were written after %d failed tries", self.failing)
            self.failing = 0
        return True

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
