"""A raw-socket HTTP client, for closing a connection with FIN or RST at a chosen moment."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import time


def chat_request(body: dict, path: str = "/v1/chat/completions", extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra_headers}\r\n").encode() + data


def chat_body(fault: dict | None = None, stream: bool = True) -> dict:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if fault is not None:
        body["x_fault"] = fault
    return body


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of `name` in a /metrics text whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()))


def parse_event_block(block: bytes) -> list[tuple[str, object]]:
    """One SSE event block from Jarvis as (kind, value) pairs: data (parsed JSON), comment, done, other."""
    parsed = []
    for line in block.split(b"\n"):
        if line.startswith(b":"):
            parsed.append(("comment", line.decode()))
        elif line == b"data: [DONE]":
            parsed.append(("done", None))
        elif line.startswith(b"data: "):
            parsed.append(("data", json.loads(line[6:])))
        elif line:
            parsed.append(("other", line.decode()))
    return parsed


def sse(body: bytes) -> list[tuple[str, object]]:
    """A whole SSE body as (kind, value) pairs (see parse_event_block)."""
    return [event for block in body.split(b"\n\n") for event in parse_event_block(block)]


def content_of(events) -> str:
    """The content deltas of (kind, value, ...) events, joined."""
    text = ""
    for event in events:
        if event[0] == "data" and event[1].get("choices"):
            text += event[1]["choices"][0]["delta"].get("content") or ""
    return text


def data_of(events) -> list[dict]:
    """The JSON data payloads of (kind, value, ...) events."""
    return [event[1] for event in events if event[0] == "data"]


def page_text(chunks: list[dict]) -> tuple[str, str]:
    """(reasoning, content) as the page shows them from its chunks (the rules static/page/message-view.js applies)."""
    reasoning = content = ""
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            delta = choice["delta"]
            if delta.get("content_was_reasoning"):
                reasoning, content = reasoning + content, ""
            reasoning += delta.get("reasoning_content", "")
            content += delta.get("content", "")
    return reasoning, content


class _KeptOpenReader(io.BufferedReader):
    """http.client closes its file after each response; keep it for the next one."""

    def close(self):
        pass


class _SocketFile:
    """Lets http.client read several responses from one buffered socket file (keep-alive, pipelining)."""

    def __init__(self, sock):
        self.file = _KeptOpenReader(socket.SocketIO(sock, "rb"))

    def makefile(self, *args, **kwargs):
        return self.file


class RawClient:
    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.received = b""
        self._file = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, count: int = 1, timeout: float = 15.0) -> bytes:
        """Read until `marker` has arrived `count` times; return everything received so far."""
        deadline = time.monotonic() + timeout
        while self.received.count(marker) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before {marker!r} x{count}: {self.received[-500:]!r}")
            self.received += data
        return self.received

    def response(self) -> http.client.HTTPResponse:
        """The next whole response on this connection (http.client handles chunked framing)."""
        if self._file is None:
            self._file = _SocketFile(self.sock)
        response = http.client.HTTPResponse(self._file)
        response.begin()
        return response

    def close_fin(self) -> float:
        """Send FIN (half-close); return the moment it was sent."""
        now = time.monotonic()
        self.sock.shutdown(socket.SHUT_WR)
        return now

    def close_rst(self) -> float:
        """Abort the connection with RST; return the moment it was sent."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        now = time.monotonic()
        self.sock.close()
        return now

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def raw_client_on(port: int, worker: int, timeout: float = 30.0) -> RawClient:
    """A keep-alive connection that worker `worker` accepted (a connection stays with the worker that
    accepted it; which one accepts is the kernel's choice, so ask /healthz until it is the one wanted).
    Bounded in time, not in tries: a worker still importing on a slow machine accepts nothing for
    seconds, while the other takes hundreds of connections."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        client = RawClient(port)
        client.send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = client.response()
        if json.loads(response.read())["worker"] == worker:
            client._file = None  # the next bytes are read from the socket again
            return client
        client.close()
    raise AssertionError(f"worker {worker} accepted none of {attempts} connections in {timeout:g} s")
