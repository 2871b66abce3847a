"""The upstream HTTP/1.1 client (jarvis/http1.py): framing, status lines, the pool, TLS.

Framing is tested on scripted sockets, whose `recv` hands out exactly the pieces
a test chooses (a real socket would coalesce them); the pool and TLS on real
loopback sockets.
"""

from __future__ import annotations

import socket
import ssl

import pytest

from jarvis import http1
from jarvis.backends import INTERRUPTED, Interrupted
from jarvis.backends.upstream import UpstreamBackend, UpstreamGeneration
from jarvis.errors import ApiError, StreamError, UpstreamErrorEvent
from jarvis.settings import Settings
from jarvis.upstreams import UpstreamConfig
from tests.live import wait_until
from tests.net import accept_in_threads
from tests.tls import make_certificate, server_context

EVENTS = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
CHUNKED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
           + f"{len(EVENTS) - 14:x}\r\n".encode() + EVENTS[:-14] + b"\r\n"
           + f"{14:x};ext=1\r\n".encode() + EVENTS[-14:] + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")
GZIP_CHUNKED = CHUNKED.replace(b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip, chunked")


class ScriptedSocket:
    """A socket whose recv returns the given pieces, one per call, then EOF."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = list(pieces)
        self.sent = b""
        self.closed = False

    def sendall(self, data: bytes) -> None:
        self.sent += data

    def recv(self, size: int) -> bytes:
        piece = self.pieces.pop(0) if self.pieces else b""
        if isinstance(piece, BaseException):
            raise piece  # what a throw into a greenlet waiting in recv looks like to its caller
        return piece

    def fileno(self) -> int:
        return -1

    def close(self) -> None:
        self.closed = True


def scripted_client(*responses: list[bytes]) -> tuple[http1.Client, list[ScriptedSocket]]:
    """A client whose successive new connections answer with `responses`."""
    client = http1.Client("http://upstream.test:8080/v1", 1.0, {"User-Agent": "jarvis"})
    sockets = [ScriptedSocket(pieces) for pieces in responses]
    made = iter(sockets)
    client._connect = lambda: next(made)
    return client, sockets


def body_of(response: http1.Response) -> bytes:
    data = b""
    while piece := response.read1():
        data += piece
    return data


def test_the_request_names_the_host_path_length_and_fixed_headers():
    client, (sock,) = scripted_client([b"HTTP/1.1 204 No Content\r\n\r\n"])
    response = client.request("POST", "/chat/completions", b"{}", {"X-Request-Id": "abc"})
    assert response.status == 204 and response.complete
    head, _, body = sock.sent.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [b"POST /v1/chat/completions HTTP/1.1", b"Host: upstream.test:8080",
                                   b"User-Agent: jarvis", b"X-Request-Id: abc", b"Content-Length: 2"]
    assert body == b"{}"


@pytest.mark.parametrize("split", range(1, len(CHUNKED)))
def test_a_chunked_body_split_at_any_byte_reads_the_same(split):
    client, (sock,) = scripted_client([CHUNKED[:split], CHUNKED[split:]])
    response = client.request("GET", "/x")
    assert response.status == 200 and response.headers["content-type"] == "text/event-stream"
    assert body_of(response) == EVENTS  # extensions and trailers are framing, not body
    response.close()
    assert client._idle and not sock.closed  # read to its end: back to the pool


def test_a_chunked_body_one_byte_per_read():
    client, _ = scripted_client([CHUNKED[i:i + 1] for i in range(len(CHUNKED))])
    assert body_of(client.request("GET", "/x")) == EVENTS


def test_a_content_length_body_ends_at_its_length_and_the_connection_is_kept():
    body = b'{"object":"list","data":[]}'
    client, (sock,) = scripted_client([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5],
                                       body[5:]])
    response = client.request("GET", "/models")
    assert response.read(1000) == body and response.complete
    response.close()
    assert list(client._idle) and not sock.closed


def test_a_close_delimited_body_ends_at_eof_and_the_connection_is_closed():
    client, (sock,) = scripted_client([b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
                                       EVENTS[:10], EVENTS[10:]])
    response = client.request("GET", "/x")
    assert response.close_delimited
    assert body_of(response) == EVENTS
    response.close()
    assert sock.closed and not client._idle


def test_crlf_event_lines_pass_through_unchanged():
    events = EVENTS.replace(b"\n", b"\r\n")
    client, _ = scripted_client([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(events) + events])
    assert body_of(client.request("GET", "/x")) == events


@pytest.mark.parametrize("cut", [len(CHUNKED) - 5, len(CHUNKED) - 40, CHUNKED.index(b"\r\n\r\n") + 6])
def test_a_body_cut_mid_chunk_is_a_disconnect(cut):
    client, (sock,) = scripted_client([CHUNKED[:cut]])
    response = client.request("GET", "/x")
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        body_of(response)
    assert raised.value.kind == "disconnected"
    response.close()
    assert sock.closed and not client._idle


def test_a_100_continue_then_the_answer():
    client, _ = scripted_client([b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                                 + CHUNKED])
    response = client.request("POST", "/chat/completions", b"{}")
    assert response.status == 200 and "link" not in response.headers
    assert body_of(response) == EVENTS


def test_gzip_transfer_coding_is_refused_with_a_clear_error():
    client, (sock,) = scripted_client([GZIP_CHUNKED])
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        client.request("GET", "/x")
    assert raised.value.kind == "malformed" and "gzip, chunked" in str(raised.value)
    assert sock.closed


@pytest.mark.parametrize("garbage", [b"HTTP/1.1 20O OK\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\n"
                                     b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n"])
def test_a_broken_status_line_or_header_is_malformed(garbage):
    client, _ = scripted_client([garbage])
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        client.request("GET", "/x")
    assert raised.value.kind == "malformed"


def test_headers_past_the_limit_are_refused():
    client, _ = scripted_client([b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad: " + b"a" * 1000 + b"\r\n"] * 100)
    with pytest.raises(http1.UpstreamHTTPError, match="headers are over"):
        client.request("GET", "/x")


def test_eof_before_the_status_line_is_closed_and_inside_the_headers_malformed():
    client, _ = scripted_client([], [b"HTTP/1.1 200 OK\r\nContent-"])
    with pytest.raises(http1.UpstreamHTTPError) as first:
        client.request("GET", "/x")
    with pytest.raises(http1.UpstreamHTTPError) as second:
        client.request("GET", "/x")
    assert (first.value.kind, second.value.kind) == ("closed", "malformed")


# -- through the backend: statuses become OpenAI errors, bodies become batches ------------------------

def backend_on(*responses: list[bytes]) -> UpstreamBackend:
    backend = UpstreamBackend(Settings.from_env({}), UpstreamConfig(name="up", url="http://upstream.test/v1"))
    backend.client, _ = scripted_client(*responses)
    return backend


@pytest.mark.parametrize(("status", "code"), [(301, "upstream_redirect"), (307, "upstream_redirect"),
                                              (404, "upstream_status"), (429, "upstream_status"),
                                              (500, "upstream_status"), (503, "upstream_status")])
def test_3xx_4xx_5xx_status_lines_become_errors_with_their_status(status, code):
    body = b'{"detail": "nope"}'
    backend = backend_on([b"HTTP/1.1 %d X\r\nLocation: http://elsewhere/\r\nContent-Length: %d\r\n\r\n"
                          % (status, len(body)) + body])
    with pytest.raises(ApiError) as raised:
        backend.models()
    assert raised.value.status == (502 if status < 400 else status)
    assert raised.value.body["error"]["code"] == code


def test_an_openai_error_body_is_kept_as_it_came():
    body = b'{"error": {"message": "model not found", "type": "invalid_request_error", "code": "model_not_found"}}'
    backend = backend_on([b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n" % len(body) + body])
    with pytest.raises(ApiError) as raised:
        backend.models()
    assert raised.value.status == 404 and raised.value.body["error"]["code"] == "model_not_found"


def test_a_stream_cut_mid_chunk_is_upstream_disconnected_after_its_events():
    client, _ = scripted_client([CHUNKED[:CHUNKED.index(b"data: [DONE]")]])
    generation = UpstreamGeneration(client.request("GET", "/x"), 1 << 20)
    batches = generation.batches()
    assert next(batches) == [b'{"choices":[{"delta":{"content":"hi"}}]}']
    with pytest.raises(StreamError) as raised:
        next(batches)
    assert raised.value.code == "upstream_disconnected"
    generation.close()


def test_a_gzip_transfer_coding_is_a_502_before_streaming():
    backend = backend_on([GZIP_CHUNKED])
    with pytest.raises(ApiError) as raised:
        backend.models()
    assert raised.value.status == 502 and raised.value.body["error"]["code"] == "upstream_malformed"
    assert "gzip" in raised.value.body["error"]["message"]


# -- the pool, on real sockets ------------------------------------------------------------------------

class CountingServer:
    """Answers every request on a connection with a small JSON body; counts connections; can close
    every idle connection."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        self.connections: list[socket.socket] = []
        self.requests = 0
        accept_in_threads(self.listener, self._serve)

    def _serve(self, sock):
        try:
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True)  # takes over the descriptor
        except (OSError, ValueError):
            sock.close()
            return
        with sock:
            self._answer(sock)

    def _answer(self, sock):
        try:
            self.connections.append(sock)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                self.requests += 1
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        except (OSError, ValueError):
            return

    def close_idle(self):
        for sock in self.connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self):
        self.listener.close()
        self.close_idle()


@pytest.fixture
def server():
    server = CountingServer()
    yield server
    server.stop()


@pytest.fixture
def new_client():
    """http1.Client(...), each closed (its idle connections with it) after the test."""
    made = []

    def new(*args, **kwargs) -> http1.Client:
        made.append(http1.Client(*args, **kwargs))
        return made[-1]

    yield new
    for client in made:
        client.close()


def test_a_connection_read_to_its_end_is_reused(new_client, server):
    client = new_client(f"http://127.0.0.1:{server.port}/v1", 2.0, {})
    for _ in range(5):
        response = client.request("GET", "/models")
        assert response.read(100) == b"{}"
        response.close()
    assert client.opened == 1 and server.requests == 5


def test_a_response_closed_unread_never_goes_back_to_the_pool(new_client, server):
    client = new_client(f"http://127.0.0.1:{server.port}/v1", 2.0, {})
    client.request("GET", "/models").close()  # its body not read
    assert not client._idle
    response = client.request("GET", "/models")
    assert response.read(100) == b"{}"
    response.close()
    assert client.opened == 2


def test_a_connection_the_upstream_closed_while_idle_is_replaced(new_client, server):
    client = new_client(f"http://127.0.0.1:{server.port}/v1", 2.0, {})
    response = client.request("GET", "/models")
    response.read(100)
    response.close()
    server.close_idle()
    idle = client._idle[0]
    wait_until(lambda: not http1._still_open(idle.sock), 5, lambda: "the upstream's FIN never arrived",
               interval=0.005)
    response = client.request("GET", "/models")
    assert response.read(100) == b"{}" and client.opened == 2
    response.close()


def test_a_reused_connection_closed_just_after_the_check_is_retried_once(new_client, server):
    client = new_client(f"http://127.0.0.1:{server.port}/v1", 2.0, {})
    response = client.request("GET", "/models")
    response.read(100)
    response.close()
    stale = client._idle[0]
    stale.sock.shutdown(socket.SHUT_RDWR)  # as if the upstream's idle timeout hit between check and send
    http1_still_open = http1._still_open
    try:
        http1._still_open = lambda sock: True  # the check saw it open
        response = client.request("GET", "/models")
    finally:
        http1._still_open = http1_still_open
    assert response.read(100) == b"{}" and client.opened == 2
    response.close()


def test_connecting_to_a_closed_port_is_unreachable():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        http1.Client(f"http://127.0.0.1:{port}/v1", 2.0, {}).request("GET", "/models")  # nothing to close
    assert raised.value.kind == "unreachable"


# -- TLS -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_server(certificate):
    server = CountingServer(tls=server_context(*certificate))
    yield server
    server.stop()


def test_tls_with_the_ca_configured_reads_the_answer_and_reuses_the_connection(new_client, tls_server, certificate):
    client = new_client(f"https://localhost:{tls_server.port}/v1", 2.0, {}, ca_file=str(certificate[0]))
    for _ in range(3):
        response = client.request("GET", "/models")
        assert response.read(100) == b"{}"
        response.close()
    assert client.opened == 1


def test_tls_without_the_ca_is_refused_as_untrusted(new_client, tls_server):
    client = new_client(f"https://localhost:{tls_server.port}/v1", 2.0, {})  # certifi's public roots
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        client.request("GET", "/models")
    assert raised.value.kind == "unreachable" and "not trusted" in str(raised.value)


def test_tls_to_a_name_the_certificate_does_not_carry_is_refused(new_client, tls_server, certificate):
    client = new_client(f"https://127.0.0.1:{tls_server.port}/v1", 2.0, {}, ca_file=str(certificate[0]))
    with pytest.raises(http1.UpstreamHTTPError) as raised:
        client.request("GET", "/models")
    assert raised.value.kind == "unreachable" and "mismatch" in str(raised.value)


def test_the_events_before_an_error_event_in_the_same_read_still_go_out():
    events = (b'data: {"choices":[{"delta":{"content":"w0 "}}]}\n\ndata: {"choices":[{"delta":{"content":"w1 "}}]}\n\n'
              b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    client, _ = scripted_client([b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + events])
    generation = UpstreamGeneration(client.request("GET", "/x"), 1 << 20)
    batches = generation.batches()
    assert [payload[-9:] for payload in next(batches)] == [b'"w0 "}}]}', b'"w1 "}}]}']
    with pytest.raises(UpstreamErrorEvent) as raised:
        next(batches)
    assert raised.value.error["message"] == "overloaded"
    generation.close()


def test_an_interrupted_wait_yields_interrupted_and_the_stream_goes_on_unharmed():
    """The relay interrupts the response greenlet's wait for the upstream (heartbeats, limits, a stop):
    batches() says so and goes on where it was, an event split across the interruption included."""
    event = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
    client, _ = scripted_client([head + event[:20], Interrupted(), Interrupted(), event[20:] + event,
                                 Interrupted(), b"data: [DONE]\n\n"])
    generation = UpstreamGeneration(client.request("GET", "/x"), 1 << 20)
    assert generation.interruptible
    seen = list(generation.batches())
    assert seen == [INTERRUPTED, INTERRUPTED, [event[6:-2]] * 2, INTERRUPTED]
    assert generation.finished
    generation.close()
