"""Server-Sent Events framing, both directions, as bytes.

`SSEDecoder` turns whatever bytes an upstream delivers (split anywhere, LF, CRLF
or CR line ends, comment lines) into complete `data` payloads, following the
WHATWG field rules. The encoders produce exactly what OpenAI clients accept:
`data:` lines and `: ping` comments, never `id:` or `retry:` lines, and `event:`
lines only where the Responses API names its events.
"""

from __future__ import annotations

import json

DONE = b"[DONE]"
PING = b": ping\n\n"
OPENING = b": ok\n\n"
DONE_EVENT = b"data: [DONE]\n\n"


class LastChunk(bytes):
    """The last bytes of a streamed body. jarvis.worker sends the end of the chunked body with them:
    one write and one wake-up of the client, not two. Any other server treats it as plain bytes."""

    __slots__ = ()

MAX_EVENT_BYTES = 4 * 1024 * 1024


class MalformedStream(ValueError):
    """The upstream sent an event larger than MAX_EVENT_BYTES without ending it."""


class SSEDecoder:
    """Incremental decoder: `feed(bytes)` returns the data payloads completed so far.

    Linear in what it is fed: an event still arriving is kept as pieces, and only the new bytes are
    searched for its end (a blank line, which may straddle two reads), so a 4 MiB event read 64 KB at
    a time costs one pass, not sixty-four.
    """

    def __init__(self, *, whole_events: bool = False) -> None:
        self._pieces: list[bytes] = []  # the event still arriving, normalised to LF
        self._pending = 0  # its length
        self._carriage_return_pending = False
        # Whole events (every line, `event:` included, LF-separated) instead of their data: the
        # Responses API names its events, and a relay of it must keep the names.
        self._of = _whole_event if whole_events else _data_of

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._carriage_return_pending:
            chunk = b"\r" + chunk
            self._carriage_return_pending = False
        if chunk.endswith(b"\r"):
            # The LF of a CRLF may be in the next chunk: decide when it comes.
            chunk = chunk[:-1]
            self._carriage_return_pending = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        straddles = chunk[:1] == b"\n" and self._pieces and self._pieces[-1][-1:] == b"\n"
        if b"\n\n" not in chunk and not straddles:
            if chunk:
                self._pending += len(chunk)
                if self._pending > MAX_EVENT_BYTES:
                    raise MalformedStream(f"an upstream event exceeded {MAX_EVENT_BYTES} bytes")
                self._pieces.append(chunk)
            return []
        buffer = b"".join(self._pieces) + chunk if self._pieces else chunk
        *blocks, rest = buffer.split(b"\n\n")
        self._pieces, self._pending = ([rest], len(rest)) if rest else ([], 0)
        payloads = []
        for block in blocks:
            payload = self._of(block)
            if payload is not None:
                payloads.append(payload)
        return payloads

    def finish(self) -> list[bytes]:
        """At end of input: the last event may lack its blank line (some upstreams end so)."""
        rest = b"".join(self._pieces) + (b"\n" if self._carriage_return_pending else b"")
        self._pieces, self._pending = [], 0
        payload = self._of(rest.strip(b"\n")) if rest.strip() else None
        return [payload] if payload is not None else []


def _data_of(block: bytes) -> bytes | None:
    """The data of one event block, or None when it has no data field."""
    if block.startswith(b"data: ") and b"\n" not in block:
        return block[6:]
    data = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if name == b"data":
            data.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(data) if data else None


def _whole_event(block: bytes) -> bytes | None:
    """An event block without its comment lines, or None when it carries no data."""
    lines = [line for line in block.split(b"\n") if line and not line.startswith(b":")]
    return b"\n".join(lines) if any(line.startswith(b"data") for line in lines) else None


def event_name(block: bytes) -> bytes | None:
    """The `event:` field of a whole event block, if it has one."""
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            return line[6:].strip()
    return None


def data_event(payload: bytes) -> bytes:
    """Frame one payload as a `data:` event (multi-line payloads as several data lines)."""
    if b"\n" in payload:
        return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"
    return b"data: " + payload + b"\n\n"


def error_event(error: dict) -> bytes:
    """An in-band error followed by [DONE]: what every abnormal end looks like to a client."""
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n" + DONE_EVENT


def responses_error_event(error: dict) -> bytes:
    """How a Responses-API stream ends abnormally: an `error` event with its own fields (type, code,
    message, param) and the error object itself, on which the openai SDK raises; no [DONE] follows."""
    body = {"type": "error", "code": error.get("code"), "message": error.get("message"), "param": error.get("param"),
            "error": error}
    return b"event: error\ndata: " + json.dumps(body).encode() + b"\n\n"
