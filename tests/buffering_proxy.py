"""A reverse proxy that does what breaks streaming in real deployments: it holds each whole response
before passing it on (nginx with proxy_buffering and no X-Accel-Buffering support, a corporate proxy,
a CDN), and optionally gzips it (gzip on text/event-stream). Threads; loopback only."""

from __future__ import annotations

import gzip
import http.client
import socket

from tests.net import accept_in_threads, close_now, read_http_request

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}


class BufferingProxy:
    def __init__(self, target_port: int, *, compress: bool = False):
        self.target_port = target_port
        self.compress = compress
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        accept_in_threads(self.listener, self._serve)

    def stop(self) -> None:
        close_now(self.listener)

    def _serve(self, client: socket.socket) -> None:
        with client:
            try:
                request, _ = read_http_request(client, b"")
                if request is None:
                    return
                method, path, headers, body = request
                upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
                try:  # closed however it ends: a client gone mid-reply left it to the garbage collector
                    forwarded = {name: value for name, value in headers.items() if name not in _HOP}
                    upstream.request(method, path, body=body or None, headers=forwarded)
                    response = upstream.getresponse()
                    data = response.read()  # the whole response, held: this is the fault
                    out = [(name, value) for name, value in response.getheaders() if name.lower() not in _HOP]
                    if self.compress and data:
                        data = gzip.compress(data)
                        out.append(("Content-Encoding", "gzip"))
                    out.append(("Via", "1.1 buffering-proxy"))
                    head = f"HTTP/1.1 {response.status} {response.reason}\r\n" + "".join(
                        f"{name}: {value}\r\n" for name, value in out) + \
                        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                    client.sendall(head.encode("latin-1") + data)
                finally:
                    upstream.close()
            except OSError:
                return
