"""The lowest floor: copy the stub's bytes to the client with gevent sockets and nothing else.

No HTTP server, no WSGI, no parsing beyond finding a request's end: one greenlet per client
connection reads a request, sends it on a pooled keep-alive connection to the stub, and passes every
`recv` on to the client until the stub's chunked body ends. What a token costs here is what
gevent, the kernel and this machine charge any Python relay; bench/run.py --floor runs it beside
bench/passthrough.py. It serves bench/upstream.py only (it relies on its chunked framing) and never
cancels anything: a client that leaves is noticed at the next write.

    python bench/socket_relay.py --port 9200 --upstream-port 9100
"""

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.net import http_requests  # noqa: E402

_END = b"0\r\n\r\n"  # the end of the stub's chunked body


def serve(port: int, upstream_port: int) -> None:
    idle: list[socket.socket] = []

    def upstream() -> socket.socket:
        if idle:
            return idle.pop()
        sock = socket.create_connection(("127.0.0.1", upstream_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def handle(client, _address):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for method, path, _headers, body in http_requests(client):
                if path == "/healthz":
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                up = upstream()
                try:
                    up.sendall(b"%s %s HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (method.encode(), path.encode(), len(body), body))
                    while True:
                        data = up.recv(65536)
                        if not data:
                            raise ConnectionError("the stub closed")
                        client.sendall(data)
                        if data.endswith(_END):
                            break
                except OSError:
                    up.close()  # mid-answer: not reusable
                    raise
                idle.append(up)
        except OSError:
            return  # the client or the stub went away

    StreamServer(("127.0.0.1", port), handle).serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    serve(args.port, args.upstream_port)
