"""Small socket and HTTP helpers for the test suite, which the benchmark scripts reuse (no gevent here)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request


def accept_in_threads(listener: socket.socket, handle) -> None:
    """Accept on `listener` until it is closed (close_now), each connection handed to `handle(sock)` on a daemon
    thread of its own; the accepting runs on a daemon thread too."""

    def accept() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(sock,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def close_now(sock: socket.socket) -> None:
    """Close a listening or connected socket so that it is closed at once. close() alone leaves a thread
    blocked in accept() or recv() on it blocked, and Linux keeps the socket open while it is: a stopped
    server's port went on accepting (a stopped fake upstream took the next request, seen at half speed).
    shutdown() first wakes them: accept() fails and new connections are refused."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected, or closed already
    sock.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60) -> None:
    """Poll `url` until it answers (time.sleep is gevent's where the caller monkey-patched)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def http_requests(sock):
    """Each HTTP/1.1 request on a keep-alive connection, (method, path, headers, body), until the peer closes."""
    buffer = b""
    while True:
        request, buffer = read_http_request(sock, buffer)
        if request is None:
            return
        yield request


def read_http_request(sock, buffer: bytes):
    """Read one HTTP/1.1 request with a Content-Length body from `sock`.

    Returns ((method, path, headers, body), the bytes after it), or (None, b"") when the peer closed.
    """
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(buffer) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buffer += data
    return (method, path, headers, buffer[:length]), buffer[length:]
