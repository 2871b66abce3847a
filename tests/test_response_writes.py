"""jarvis.worker's response writer, in-process: fewer writes, the same bytes on the wire.

gunicorn sends a response's headers alone, every body write through gevent's sendall, and a chunked
body's end alone. The worker's `_Response` sends the headers with the first body bytes and the end
with a `LastChunk`; these tests read back what it wrote with llhttp (httptools) and count its writes.
"""

import gevent
import gevent.socket
import httptools
import pytest
from gunicorn.config import Config

from jarvis.sse import LastChunk
from jarvis.worker import _Response


class _Request:
    def __init__(self, method="GET", version=(1, 1), close=False):
        self.method, self.version, self._close = method, version, close

    def should_close(self):
        return self._close


class _Recorder:
    """A socket stand-in: each write is kept apart."""

    def __init__(self):
        self.writes: list[bytes] = []

    def sendall(self, data):
        self.writes.append(bytes(data))


def _response(method="GET", version=(1, 1)):
    sock = _Recorder()
    response = _Response(_Request(method, version), sock, Config())
    return response, sock


class _Parsed:
    def __init__(self, data: bytes):
        self.status, self.headers, self.body, self.complete = 0, {}, b"", False
        parser = httptools.HttpResponseParser(self)
        parser.feed_data(data)
        self.status = parser.get_status_code()

    def on_header(self, name, value):
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body):
        self.body += body

    def on_message_complete(self):
        self.complete = True


def _sse(response):
    response.start_response("200 OK", [("Content-Type", "text/event-stream")])


def test_a_stream_is_three_writes_headers_with_the_first_bytes_and_the_end_with_the_last():
    response, sock = _response()
    _sse(response)
    response.write(b": ok\n\n")
    response.write(b'data: {"x": 1}\n\n')
    response.write(LastChunk(b"data: [DONE]\n\n"))
    response.close()
    assert len(sock.writes) == 3
    assert sock.writes[0].startswith(b"HTTP/1.1 200 OK\r\n") and sock.writes[0].endswith(b"6\r\n: ok\n\n\r\n")
    assert sock.writes[2].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    parsed = _Parsed(b"".join(sock.writes))
    assert parsed.complete and parsed.headers["transfer-encoding"] == "chunked"
    assert parsed.body == b': ok\n\ndata: {"x": 1}\n\ndata: [DONE]\n\n'


def test_without_a_last_chunk_the_end_goes_alone_once():
    response, sock = _response()
    _sse(response)
    response.write(b": ok\n\n")
    response.write(b"data: [DONE]\n\n")
    response.close()
    assert len(sock.writes) == 3 and sock.writes[2] == b"0\r\n\r\n"
    assert _Parsed(b"".join(sock.writes)).complete


def test_an_empty_body_and_a_generator_that_never_wrote_still_end():
    response, sock = _response()
    _sse(response)
    response.write(b"")
    response.close()
    parsed = _Parsed(b"".join(sock.writes))
    assert parsed.status == 200 and parsed.complete and parsed.body == b""


def test_a_sized_body_leaves_with_its_headers_in_one_write():
    response, sock = _response()
    response.start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")])
    response.write(b'{"ok":true}')
    response.close()
    assert len(sock.writes) == 1
    parsed = _Parsed(sock.writes[0])
    assert parsed.complete and parsed.body == b'{"ok":true}'


def test_a_body_longer_than_its_content_length_is_cut_there():
    response, sock = _response()
    response.start_response("200 OK", [("Content-Length", "4")])
    response.write(b"abcdefgh")
    response.write(b"ijk")
    response.close()
    data = b"".join(sock.writes)
    assert data.endswith(b"\r\n\r\nabcd") and _Parsed(data).body == b"abcd"


def test_head_and_204_send_headers_only():
    for method, status in [("HEAD", "200 OK"), ("GET", "204 No Content")]:
        response, sock = _response(method)
        response.start_response(status, [("Content-Type", "text/plain")])
        response.write(b"not for the wire")
        response.close()
        data = b"".join(sock.writes)
        assert data.endswith(b"\r\n\r\n") and b"not for the wire" not in data


def test_an_http_1_0_stream_is_not_chunked_and_its_last_chunk_is_plain_bytes():
    response, sock = _response(version=(1, 0))
    _sse(response)
    response.write(b": ok\n\n")
    response.write(LastChunk(b"data: [DONE]\n\n"))
    response.close()
    data = b"".join(sock.writes)
    assert b"Transfer-Encoding" not in data and data.endswith(b"\r\n\r\n: ok\n\ndata: [DONE]\n\n")


def test_a_write_the_kernel_takes_in_part_is_finished_by_sendall():
    """A real gevent socket with a small send buffer: 1 MiB cannot leave in one send() (the reader only
    runs once the writer waits), so sendall finishes it, and every byte arrives, in order."""
    left, right = gevent.socket.socketpair()
    left.setsockopt(gevent.socket.SOL_SOCKET, gevent.socket.SO_SNDBUF, 4096)
    response = _Response(_Request(), left, Config())
    _sse(response)
    payload = bytes(range(256)) * 4096  # 1 MiB, far over the buffer
    received = []

    def read():
        while True:
            data = right.recv(65536)
            if not data:
                return
            received.append(data)

    reader = gevent.spawn(read)
    response.write(LastChunk(payload))
    left.close()
    reader.join(timeout=10)
    right.close()
    assert reader.dead
    parsed = _Parsed(b"".join(received))
    assert parsed.complete and parsed.body == payload


def test_a_socket_that_is_not_a_plain_gevent_socket_goes_through_its_sendall():
    response, sock = _response()
    _sse(response)
    response.write(LastChunk(b"data: [DONE]\n\n"))
    assert len(sock.writes) == 1 and sock.writes[0].endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("error", [BrokenPipeError, ConnectionResetError])
def test_a_peer_that_is_gone_raises_as_gunicorns_writes_do(error):
    left, right = gevent.socket.socketpair()
    response = _Response(_Request(), left, Config())
    _sse(response)

    class _Gone:
        def send(self, data):
            raise error()

    left._sock, real = _Gone(), left._sock
    try:
        with pytest.raises(error):
            response.write(b": ok\n\n")
    finally:
        left._sock = real
        left.close()
        right.close()

