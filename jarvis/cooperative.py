"""Long work on a gevent worker's hub in slices: JSON parsed and files checked while every other
greenlet (health checks, streams) keeps running.

`json.loads` is C that holds the GIL for the whole document: a 29 MB import of 250,000 tiny
conversations held the hub for 0.75–1 s here, and checking its conversations one by one in Python for
4–5 s more. `loads` walks the outer levels of a document itself, hands each inner value to the C
decoder (`raw_decode`: a conversation, a message), and lets the hub run every `SLICE_SECONDS`.
`Slicer.step()` does the same for any loop.
"""

from __future__ import annotations

import gc
import json
import re
import time

import gevent

SLICE_SECONDS = 0.005  # the hub runs at least this often during long work
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class Slicer:
    """`step()` in a long loop: every SLICE_SECONDS of work, the hub gets to run."""

    __slots__ = ("last",)

    def __init__(self):
        self.last = time.perf_counter()

    def step(self) -> None:
        now = time.perf_counter()
        if now - self.last >= SLICE_SECONDS:
            gevent.idle()  # (sleep(0) lets ready greenlets run, but timers and sockets wait for the loop)
            self.last = time.perf_counter()


class TooLong(ValueError):
    """An array in the outer levels holds more than `max_items` values (the parse stopped there)."""


def loads(raw: bytes | str, depth: int = 2, max_items: int | None = None):
    """As json.loads (ValueError on anything that is not one JSON value), with the hub running between
    the values of the outer `depth` levels of arrays and objects; TooLong as soon as one of those arrays
    passes `max_items`, before the rest is parsed."""
    text = raw.decode(json.detect_encoding(raw), "surrogatepass") if isinstance(raw, bytes) else raw
    if text.startswith("\ufeff"):
        raise ValueError("Unexpected UTF-8 BOM")
    parser = _Parser(text, max_items)
    # A parse makes hundreds of thousands of objects and no cycle: the collector's passes over them would
    # each hold the hub for tens of milliseconds (85 ms measured), so it waits until the parse is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        value, end = parser.value(_skip(text, 0), depth)
    except IndexError:
        raise ValueError("Unexpected end of JSON") from None
    finally:
        if collecting:
            gc.enable()
    if _skip(text, end) != len(text):
        raise ValueError(f"Extra data at {end}")
    return value


def _skip(text: str, index: int) -> int:
    return _WHITESPACE.match(text, index).end()


class _Parser:
    def __init__(self, text: str, max_items: int | None):
        self.text = text
        self.max_items = max_items
        self.decoder = json.JSONDecoder()
        self.slicer = Slicer()

    def value(self, index: int, depth: int):
        text = self.text
        opening = text[index]
        if depth == 0 or opening not in "[{":
            return self.decoder.raw_decode(text, index)
        closing = "]" if opening == "[" else "}"
        result: list | dict = [] if opening == "[" else {}
        index = _skip(text, index + 1)
        if text[index] == closing:
            return result, index + 1
        while True:
            if opening == "[":
                item, index = self.value(index, depth - 1)
                result.append(item)
                if self.max_items is not None and len(result) > self.max_items:
                    raise TooLong(f"more than {self.max_items} items")
            else:
                if text[index] != '"':
                    raise ValueError(f"Expecting a property name at {index}")
                key, index = self.decoder.raw_decode(text, index)
                index = _skip(text, index)
                if text[index] != ":":
                    raise ValueError(f"Expecting ':' at {index}")
                item, index = self.value(_skip(text, index + 1), depth - 1)
                result[key] = item
            self.slicer.step()
            index = _skip(text, index)
            if text[index] == ",":
                index = _skip(text, index + 1)
            elif text[index] == closing:
                return result, index + 1
            else:
                raise ValueError(f"Expecting ',' or {closing!r} at {index}")
