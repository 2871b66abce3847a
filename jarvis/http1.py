"""A lean HTTP/1.1 client for talking to upstreams: gevent sockets, llhttp framing (httptools).

Why not `requests`: on the streaming path every relayed token went through
urllib3's and http.client's chunked reader (a `readline` for the size, a
`read` for the data, a `readline` for the CRLF, each a Python call or three),
which cost about a third of the worker's CPU per token. Here one `recv` is fed
to the C parser, whose body callback appends to a list: one Python call per
chunk, whatever its framing.

What it keeps from the `requests` setup it replaces: one base URL per client
and nothing else contacted (no redirects followed, no proxy or .netrc from the
environment), `Accept-Encoding: identity`, a connect timeout and no read timeout
(the relay enforces inactivity by closing the socket), TLS with certificate and
host name verification (certifi's roots, or a CA file), idle keep-alive
connections reused and checked before reuse, and a response that is not read
to its end never going back to the pool.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections import deque
from urllib.parse import urlsplit

import httptools

from jarvis.sockets import shutdown_quietly

READ_SIZE = 65536
HEADER_LIMIT = 65536  # status line and headers together
IDLE_LIMIT = 1024  # idle keep-alive connections kept per upstream


class UpstreamHTTPError(Exception):
    """The connection or the framing failed; `kind` says which, for the caller's error code."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # connect_timeout | unreachable | closed | malformed | disconnected


class _Parser:
    """httptools callbacks for one response; a 1xx interim response is read past."""

    __slots__ = ("parser", "status", "headers", "headers_done", "complete", "body", "interim", "keep_alive")

    def __init__(self):
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.complete = False
        self.body: list[bytes] = []
        self.interim = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1").strip()
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim, self.headers = True, {}  # 100 Continue, 103 Early Hints: the answer follows
            return
        self.status = status
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is over


class Response:
    """One response: status and headers read, the body read as it arrives."""

    def __init__(self, connection: _Connection, parser: _Parser, close_delimited: bool):
        self.connection = connection
        self._parser = parser
        self.status = parser.status
        self.headers = parser.headers
        self.close_delimited = close_delimited
        self.complete = parser.complete
        self.closed = False

    def read1(self) -> bytes:
        """The body bytes that have arrived (waiting for some); b"" at the end of the body.
        UpstreamHTTPError("disconnected") when the connection ends before the body does."""
        parser = self._parser
        while True:
            if parser.body:
                data = b"".join(parser.body) if len(parser.body) > 1 else parser.body[0]
                parser.body.clear()
                return data
            if parser.complete:
                self.complete = True
                return b""
            data = self.connection.recv()
            if not data:
                if self.close_delimited:
                    parser.complete = self.complete = True
                    return b""
                raise UpstreamHTTPError("disconnected", "the upstream closed the connection mid-body")
            self.connection.feed(parser, data)

    @property
    def full_read(self) -> bool:
        """Whether the last read filled the buffer (the upstream sends faster than we read)."""
        return self.connection.last_read == READ_SIZE

    def read(self, limit: int) -> bytes:
        """The rest of the body, at most `limit` + 1 bytes (so a caller can tell it was over)."""
        pieces, size = [], 0
        while size <= limit:
            data = self.read1()
            if not data:
                break
            pieces.append(data)
            size += len(data)
        return b"".join(pieces)[:limit + 1]

    def abort(self) -> None:
        """From any greenlet: FIN to the upstream, and the reader's next recv returns EOF."""
        if not self.closed:
            shutdown_quietly(self.connection.sock)

    def close(self) -> None:
        """Back to the pool when read to its end on a keep-alive connection; else closed."""
        if self.closed:
            return
        self.closed = True
        parser = self._parser
        if (parser.complete and not self.close_delimited and not parser.body and not self.connection.leftover
                and parser.keep_alive):
            self.connection.release()
        else:
            self.connection.close()


class _Connection:
    __slots__ = ("client", "sock", "reused", "last_read", "leftover")

    def __init__(self, client: Client, sock):
        self.client = client
        self.sock = sock
        self.reused = False
        self.last_read = 0
        self.leftover = False

    def recv(self) -> bytes:
        try:
            data = self.sock.recv(READ_SIZE)
        except (OSError, ValueError) as error:  # ValueError: closed by another greenlet; ssl errors are OSErrors
            raise UpstreamHTTPError("disconnected", f"the upstream connection broke ({type(error).__name__})")
        self.last_read = len(data)
        return data

    def feed(self, parser: _Parser, data: bytes) -> None:
        try:
            parser.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise UpstreamHTTPError("malformed", "the upstream switched protocols")
        except httptools.HttpParserError as error:
            if parser.complete:  # bytes after the end of the answer: fine for this one, not for reuse
                self.leftover = True
                return
            raise UpstreamHTTPError("malformed", f"the upstream's HTTP framing is broken ({error})")

    def release(self) -> None:
        self.reused = True
        self.client._release(self)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Client:
    """Requests to one base URL over a pool of keep-alive connections."""

    def __init__(self, base_url: str, connect_timeout: float, headers: dict[str, str],
                 ca_file: str | None = None, idle_limit: int = IDLE_LIMIT):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = self.port == (443 if self.tls else 80)
        self._fixed_headers = (f"Host: {host if default_port else f'{host}:{self.port}'}\r\n"
                               + "".join(f"{name}: {value}\r\n" for name, value in headers.items()))
        self.connect_timeout = connect_timeout
        try:  # an address needs no resolver (gevent's runs getaddrinfo on a thread, each time)
            self._address = (socket.AF_INET6 if ipaddress.ip_address(self.host).version == 6 else socket.AF_INET,
                             (self.host, self.port))
        except ValueError:
            self._address = None  # a name: resolved for every new connection, as DNS may change
        self.ca_file = ca_file
        self._context = None  # made on first use: after gevent has patched ssl, in the worker
        self._idle: deque[_Connection] = deque()
        self.idle_limit = idle_limit
        self.opened = 0  # connections made, for tests and metrics

    # -- requests --------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        """Send the request; return once the status line and headers are in (1xx read past).

        A reused connection the upstream closed while idle is retried once on a new one; a new
        connection that ends before the status line is "closed"."""
        head = [f"{method} {self.prefix}{path} HTTP/1.1\r\n", self._fixed_headers]
        if headers:
            head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is not None:
            head.append(f"Content-Length: {len(body)}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + (body or b"")
        while True:
            connection = self._connection()
            try:
                return self._exchange(connection, data)
            except UpstreamHTTPError as error:
                connection.close()
                if not (connection.reused and error.kind == "closed"):
                    raise
            except BaseException:  # killed while waiting (a stop, a failover's deadline): the upstream sees FIN
                connection.close()
                raise

    def _exchange(self, connection: _Connection, data: bytes) -> Response:
        try:
            connection.sock.sendall(data)
        except OSError as error:
            kind = "closed" if connection.reused else "unreachable"
            raise UpstreamHTTPError(kind, f"sending the request failed ({type(error).__name__})")
        parser = _Parser()
        received = 0
        while not parser.headers_done:
            chunk = connection.recv()
            if not chunk:
                if received or parser.interim:
                    raise UpstreamHTTPError("malformed", "the upstream closed the connection inside its headers")
                raise UpstreamHTTPError("closed", "the upstream closed the connection before answering")
            received += len(chunk)
            connection.feed(parser, chunk)
            if not parser.headers_done and received > HEADER_LIMIT:
                raise UpstreamHTTPError("malformed", f"the upstream's headers are over {HEADER_LIMIT} bytes")
        encoding = parser.headers.get("transfer-encoding")
        if encoding is not None and encoding.lower() != "chunked":
            raise UpstreamHTTPError("malformed", f"the upstream's answer has Transfer-Encoding {encoding[:60]!r}, "
                                                 "which Jarvis does not decode (only chunked)")
        close_delimited = encoding is None and "content-length" not in parser.headers and not parser.complete
        return Response(connection, parser, close_delimited)

    # -- the pool --------------------------------------------------------------------------

    def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()  # the most recently used: the likeliest to be alive
            if _still_open(connection.sock):
                return connection
            connection.close()
        return _Connection(self, self._connect())

    def _release(self, connection: _Connection) -> None:
        if len(self._idle) >= self.idle_limit:
            connection.close()
        else:
            self._idle.append(connection)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _connect(self):
        try:
            sock = self._open_socket()
        except TimeoutError:
            raise UpstreamHTTPError("connect_timeout", "the upstream did not accept a connection in time")
        except OSError as error:
            raise UpstreamHTTPError("unreachable", f"connecting failed ({type(error).__name__})")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = self._tls_context().wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(None)  # reads wait as long as the relay lets them
        except (OSError, ValueError) as error:
            sock.close()
            if isinstance(error, ssl.SSLCertVerificationError):
                raise UpstreamHTTPError("unreachable", f"the upstream's TLS certificate is not trusted "
                                                       f"({error.verify_message})")
            if isinstance(error, TimeoutError):
                raise UpstreamHTTPError("connect_timeout", "the upstream's TLS handshake did not finish in time")
            raise UpstreamHTTPError("unreachable", f"the TLS handshake failed ({type(error).__name__})")
        self.opened += 1
        return sock

    def _open_socket(self):
        if self._address is None:
            return socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        family, address = self._address
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def _tls_context(self) -> ssl.SSLContext:
        if self._context is None:
            cafile = self.ca_file
            if cafile is None:
                try:
                    import certifi  # the roots requests used, so a working upstream keeps working

                    cafile = certifi.where()
                except ImportError:
                    cafile = None
            context = ssl.create_default_context(cafile=cafile)
            context.set_alpn_protocols(["http/1.1"])
            self._context = context
        return self._context


_select = None


def _still_open(sock) -> bool:
    """An idle connection is usable when nothing is readable on it: neither EOF nor stray bytes."""
    global _select
    if _select is None:  # the unpatched select(2): a zero timeout never waits, so no need to yield
        import gevent.monkey

        _select = gevent.monkey.get_original("select", "select")
    try:
        readable, _, _ = _select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable
