"""A fast OpenAI-compatible stub upstream for benchmarks (gevent, its own process).

Each request's options set `tokens`, `interval` (seconds between tokens),
`delay` (before the first token) and an `id`: an `x_bench` object in the body,
or the last message's content `x_bench {...}` (which any proxy passes on
unchanged, where it might refuse or drop an unknown body field). Every token's content is
the monotonic time it was sent ("<seconds>|"), so a client can compute
per-token latency. The server records when each request finished or its peer
closed; GET /_stats returns those records, POST /_reset clears them.

    python bench/upstream.py --port 9100
"""

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.net import http_requests  # noqa: E402

RECORDS: dict[str, dict] = {}
_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n")
_PREFIX = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,' \
          b'"model":"bench","choices":[{"index":0,"delta":{"content":"'
_SUFFIX = b'|"},"finish_reason":null}]}\n\n'
_LAST = b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,' \
        b'"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json(sock, status: int, body) -> None:
    data = json.dumps(body).encode()
    sock.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (status, len(data), data))


def _watch(sock, record: dict, done: gevent.event.Event):
    """Record the moment the peer closes, even while the stream is idle."""
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except OSError:
        data = b""
    if not data and record.get("closed_at") is None and record.get("finished_at") is None:
        record["closed_at"] = time.monotonic()
        done.set()


def _stream(sock, options: dict) -> bool:
    record = {"opened_at": time.monotonic(), "tokens": 0, "closed_at": None, "finished_at": None}
    RECORDS[str(options.get("id", len(RECORDS)))] = record
    tokens, interval, delay = int(options.get("tokens", 10)), float(options.get("interval", 0)), \
        float(options.get("delay", 0))
    peer_closed = gevent.event.Event()
    watcher = gevent.spawn(_watch, sock, record, peer_closed)
    try:
        sock.sendall(_HEAD)
        if delay and peer_closed.wait(delay):
            return False
        next_at = time.monotonic()
        for _ in range(tokens):
            if interval:
                next_at += interval
                pause = next_at - time.monotonic()
                if pause > 0 and peer_closed.wait(pause):
                    return False
            sock.sendall(_chunk(_PREFIX + b"%.6f" % time.monotonic() + _SUFFIX))
            record["tokens"] += 1
        sock.sendall(_chunk(_LAST) + b"0\r\n\r\n")
        record["finished_at"] = time.monotonic()
        return True
    except OSError:
        if record["closed_at"] is None:
            record["closed_at"] = time.monotonic()
        return False
    finally:
        watcher.kill(block=True)


def _options(body: dict) -> dict:
    if isinstance(body.get("x_bench"), dict):
        return body["x_bench"]
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content")
    if isinstance(content, str) and content.startswith("x_bench "):
        return json.loads(content[len("x_bench "):])
    return {}


def handle(sock, address):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as any real server: no Nagle delays
    try:
        for _method, path, _, body in http_requests(sock):
            if path == "/_stats":
                _json(sock, 200, RECORDS)
            elif path == "/_reset":
                RECORDS.clear()
                _json(sock, 200, {})
            elif path.endswith("/models"):
                _json(sock, 200, {"object": "list", "data": [{"id": "bench", "object": "model"}]})
            elif path.endswith("/chat/completions"):
                options = _options(json.loads(body))
                if not _stream(sock, options):
                    return
            else:
                _json(sock, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
    except OSError:
        return
    finally:
        sock.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = StreamServer(("127.0.0.1", args.port), handle, backlog=4096)
    print(f"bench upstream on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
