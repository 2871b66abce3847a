"""Clients that hold connections open as slowly as they can, to attack Jarvis's connection limits.

One thread drives every socket through a selector (thousands of threads would be the test's own
bottleneck). Each attack connects from a chosen loopback source address (127.0.0.2, say), so the test's
own checks from 127.0.0.1 count as another client. Modes:

    slow_body   a complete head with Content-Length, then one body byte every `trickle` seconds
    slowloris   a request line, then one header line every `trickle` seconds, never the blank line
    idle        one whole request, its answer read, then silence on the kept-alive connection

`closed_at[i]` records when the server ended connection i (EOF or reset); loopback only, bounded.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time


class SlowClients:
    def __init__(self, port: int, count: int, mode: str, *, source: str = "127.0.0.2",
                 path: str = "/v1/chat/completions", body_bytes: int = 10000, trickle: float = 1.0, headers: str = ""):
        self.port, self.count, self.mode, self.source = port, count, mode, source
        self.path, self.body_bytes, self.trickle, self.headers = path, body_bytes, trickle, headers
        self.opened_at: list[float | None] = [None] * count
        self.closed_at: list[float | None] = [None] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SlowClients:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def open_count(self) -> int:
        return sum(1 for opened, closed in zip(self.opened_at, self.closed_at, strict=True) if opened and not closed)

    def _head(self) -> bytes:
        if self.mode == "slowloris":
            return f"POST {self.path} HTTP/1.1\r\nHost: localhost\r\n".encode()
        body = f"Content-Length: {self.body_bytes}\r\n" if self.mode == "slow_body" else "Content-Length: 0\r\n"
        method = "GET /healthz" if self.mode == "idle" else f"POST {self.path}"
        return (f"{method} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{self.headers}"
                f"{body}\r\n").encode()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        sockets: dict[int, socket.socket] = {}
        for index in range(self.count):
            sock = socket.socket()
            sock.bind((self.source, 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            sockets[index] = sock
            selector.register(sock, selectors.EVENT_WRITE, index)  # writable: connected
        last_trickle = time.monotonic()
        while not self._stop.is_set() and any(closed is None for closed in self.closed_at):
            for key, events in selector.select(timeout=0.05):
                if events & selectors.EVENT_WRITE:
                    self._connected(key.fileobj, key.data, selector)
                else:
                    self._readable(key.fileobj, key.data, selector)
            if time.monotonic() - last_trickle >= self.trickle:
                last_trickle = time.monotonic()
                self._trickle(sockets)
        for sock in sockets.values():
            sock.close()
        selector.close()

    def _connected(self, sock, index: int, selector) -> None:
        self.opened_at[index] = time.monotonic()
        try:
            sock.send(self._head())
            selector.modify(sock, selectors.EVENT_READ, index)
        except OSError:  # refused, or closed before the head went out
            self.closed_at[index] = time.monotonic()
            selector.unregister(sock)

    def _readable(self, sock, index: int, selector) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:  # the server ended this connection
            self.closed_at[index] = time.monotonic()
            selector.unregister(sock)

    def _trickle(self, sockets) -> None:
        if self.mode == "idle":
            return
        for index, sock in sockets.items():
            if self.opened_at[index] is not None and self.closed_at[index] is None:
                try:
                    sock.send(b"x" if self.mode == "slow_body" else f"X-Trickle-{index}: 1\r\n".encode())
                except OSError:
                    pass
