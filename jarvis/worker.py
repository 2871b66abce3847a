"""gunicorn's gevent worker, with a cap on the connections one client address may hold open, and
connection shedding near `worker_connections`.

Without it, one client holding connections open — request heads or bodies sent a byte at a time, idle
keep-alives — fills the worker's `worker_connections`, and every other client, health checks
included, waits. Connections beyond JARVIS_MAX_CLIENT_CONNECTIONS from one address are closed as soon
as they are accepted. Addresses gunicorn trusts as proxies (`forwarded_allow_ips`, loopback by
default) are exempt: every client of a reverse proxy shares its address, so the proxy must apply its
own per-client limits (see the README).

The cap alone does not stop an attacker with many addresses (60 addresses x 100 connections fill
5,000 slots), and a full worker stops accepting: health checks and new streams wait in the kernel's
backlog. So `Shedder` keeps the connections that have not sent a whole request yet — a head still
arriving, a body still arriving, an idle keep-alive — in the order they started waiting, and when the
worker holds more than 90% of `worker_connections`, each connection it accepts sheds the oldest of
them (a FIN; a body still arriving is answered 503 first). A connection whose request is being
served — a stream above all — is never shed; only when every slot serves a real request does the
worker stop accepting.

The deadlines that end slow heads and idle keep-alives (gunicorn's `keepalive`) and slow bodies
(JARVIS_BODY_SECONDS) are stretched by a random 0-10% (at most a second): 2,000 of them started
together would otherwise expire in one loop turn and send their answers in one burst.

The worker also raises its own limit on open files to what `worker_connections` needs, and writes
responses with fewer system calls (`_Response`). `ClientWatcher`, at the end, is how a stream hears
its client leave: it watches the socket this worker accepted.

gunicorn's master imports this module to find the worker class: it must import nothing but gunicorn,
gevent, jarvis.settings, jarvis.sockets and jarvis.sse (all standard library only) at module level.
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import contextvars
import ipaddress
import logging
import random
import resource
import socket

import gevent
import gevent.socket
from gunicorn.http import wsgi
from gunicorn.workers.ggevent import GeventWorker

from jarvis.sockets import shutdown_quietly, shutdown_reads
from jarvis.sse import LastChunk

log = logging.getLogger(__name__)

_FILES_BESIDES_CONNECTIONS = 256  # the listener, the database, the upstream pool, logs, metrics
_NAMED_ADDRESSES = 10000  # addresses a refusal is logged for by name; past that, every 1000th refusal
_CACHED_ADDRESSES = 10000  # addresses whose exemption (a trusted proxy or not) is remembered
SHED_ABOVE = 0.9  # of worker_connections: past this, each connection accepted sheds the oldest waiting one
_SHED_NAMED_EVERY = 1000  # shed connections logged: the first, then every 1000th


def jittered(seconds: float) -> float:
    """A deadline stretched by a random 0-10% (at most 1 s), so deadlines set together expire apart."""
    return seconds + random.uniform(0.0, min(1.0, seconds * 0.1))


class Shedder:
    """The worker's connections that have not sent a whole request yet, oldest first (see the module).

    `waiting` maps a socket to what it is waiting for: "head" (a request head, or the next request on a
    kept-alive connection) or "body". `open` counts every connection the worker holds; `shedding`, the
    ones shed whose greenlets have not ended yet (they still hold a slot, but are on their way out).
    """

    def __init__(self, worker_connections: int):
        self.limit = max(1, int(worker_connections * SHED_ABOVE))
        self.open = 0
        self.waiting: dict = {}
        self.shedding: set = set()
        self.shed_bodies: set = set()
        self.shed = 0

    def opened(self, sock) -> None:
        self.open += 1
        self.waiting[sock] = "head"
        while self.open - len(self.shedding) > self.limit and self.waiting:
            self._shed_oldest()

    def closed(self, sock) -> None:
        self.open -= 1
        self.waiting.pop(sock, None)
        self.shedding.discard(sock)
        self.shed_bodies.discard(sock)

    def serving(self, sock) -> None:
        """A whole request head arrived: its answer is under way (a body may still be read: `awaiting_body`)."""
        self.waiting.pop(sock, None)

    def idle(self, sock) -> None:
        """An answer ended and the connection is kept alive: it waits for its next request, the newest waiter."""
        if sock not in self.shedding:
            self.waiting[sock] = "head"

    @contextlib.contextmanager
    def awaiting_body(self, sock):
        """While a route reads its request's body; yields a check: was the connection shed meanwhile?"""
        self.waiting[sock] = "body"
        try:
            yield lambda: sock in self.shed_bodies
        finally:
            self.waiting.pop(sock, None)

    def _shed_oldest(self) -> None:
        sock, waiting_for = next(iter(self.waiting.items()))
        del self.waiting[sock]
        self.shedding.add(sock)
        self.shed += 1
        if self.shed == 1 or self.shed % _SHED_NAMED_EVERY == 0:
            log.warning("shed a connection still waiting for its request %s: the worker holds %d connections, "
                        "over %d of worker_connections; %d shed so far", waiting_for, self.open, self.limit,
                        self.shed)
        if waiting_for == "body":
            self.shed_bodies.add(sock)  # its route reads EOF, sees this and answers 503
            shutdown_reads(sock)
        else:
            shutdown_quietly(sock)  # gunicorn's head parser reads EOF and closes quietly


SHEDDER: Shedder | None = None  # the worker's, once it runs; None in-process (the test client, scripts)


@contextlib.contextmanager
def awaiting_body(environ: dict):
    """Around reading a request body: the connection may be shed meanwhile; yields `was_shed()`."""
    sock = environ.get("gunicorn.socket")
    if SHEDDER is None or sock is None:
        yield lambda: False
        return
    with SHEDDER.awaiting_body(sock) as was_shed:
        yield was_shed



class _Response(wsgi.Response):
    """gunicorn's response, written with fewer system calls — each one on loopback also wakes the client.

    The headers leave with the first body bytes (gunicorn sends them alone first), the end of a
    chunked body (`0\\r\\n\\r\\n`) with a body's `LastChunk`, and a write is one plain `send()` on
    the non-blocking socket, falling back to gevent's `sendall` only for what the kernel did not take
    (gevent's asks the kernel for the socket's buffer size on every call). Anything unusual — a body
    longer than its Content-Length, a HEAD, a TLS socket — takes gunicorn's own path. It overrides
    gunicorn 27's `write`, `_emit_body` and `close` (hence the pin in requirements.txt).
    """

    ended = False  # the chunked body's end went out with its last bytes

    def process_headers(self, headers):
        # gunicorn drops an app's hop-by-hop headers, Connection among them, and keeps the connection
        # alive: an app's "Connection: close" (an error answered before its body was read, whose rest will
        # never be read) closes it here, and says so to the client, which then never reuses it.
        if any(name.lower() == "connection" and value.strip().lower() == "close" for name, value in headers):
            self.force_close()
        super().process_headers(headers)

    def write(self, arg):
        if (type(arg) not in (bytes, LastChunk) or not arg or self._omits_body
                or self.response_length is not None and self.sent + len(arg) > self.response_length):
            return super().write(arg)  # gunicorn's checks, and its cut at Content-Length
        self.sent += len(arg)
        if self.headers_sent:
            self._send(self._framed(arg))
            return
        head = self.default_headers()
        head.extend([f"{name}: {value}\r\n" for name, value in self.headers])
        head.append("\r\n")
        self.headers_sent = True
        self._send("".join(head).encode("latin-1") + self._framed(arg))

    def _emit_body(self, data):
        self._send(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        if not self.chunked:
            return data
        if type(data) is LastChunk:
            self.ended = True
            return b"%X\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        return b"%X\r\n%s\r\n" % (len(data), data)

    def close(self):
        if self.ended:
            return
        if self.headers_sent and self.chunked:
            self._send(b"0\r\n\r\n")
            return
        super().close()

    def _send(self, data: bytes) -> None:
        sock = self.sock
        if type(sock) is gevent.socket.socket:  # not TLS: its raw socket is the connection
            try:
                sent = sock._sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        sock.sendall(data)


@contextlib.contextmanager
def _entry_points_read_once():
    """importlib.metadata.entry_points, its answer to each question kept while the block runs."""
    import importlib.metadata

    original = importlib.metadata.entry_points
    answers: dict = {}

    def entry_points(**selection):
        key = tuple(sorted(selection.items()))
        if key not in answers:
            answers[key] = original(**selection)
        return answers[key]

    importlib.metadata.entry_points = entry_points
    try:
        yield
    finally:
        importlib.metadata.entry_points = original


class JarvisWorker(GeventWorker):
    def init_process(self):
        from jarvis.settings import Settings

        wsgi.Response = _Response  # what gunicorn's request handling builds responses with, in this worker

        self.max_per_client = Settings.from_env().max_client_connections
        self.open_by_address: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.refused_addresses: set[str] = set()
        self.exempt_by_address: dict[str, bool] = {}  # parsed and matched once per address
        global SHEDDER
        SHEDDER = self.shedder = Shedder(self.cfg.worker_connections)
        _raise_open_files_limit(self.cfg.worker_connections + _FILES_BESIDES_CONNECTIONS)
        # Before the hub and its monitor thread start: a report of the worker's own start-up (an import
        # that holds the hub on a busy machine) is then printed as the others are (a JSON object in JSON
        # mode), without holding back the first report of the worker serving.
        from jarvis import diagnostics

        diagnostics.rate_limit_blocking_reports()
        diagnostics.worker_starting()
        super().init_process()

    def run(self):
        from jarvis import diagnostics

        # Runs when run() first waits: the listening servers are started, the worker serves.
        gevent.spawn(diagnostics.worker_serving)
        super().run()

    def patch(self):
        """gunicorn's monkey-patching (gevent's `patch_all`), with gevent's plugin look-ups read once each.

        Before and after each module it patches, gevent looks up its plugins' entry points: 25 look-ups,
        each reading every installed distribution's metadata afresh. Measured with the test dependencies
        installed (94 distributions): 4.3 ms a look-up, 0.11 s of `patch_all`'s 0.14 s, a third of a
        worker's start. Nothing is installed while a worker patches, so each of the five groups is read
        once; the plugins found are the same and are still called.
        """
        with _entry_points_read_once():
            super().patch()

    def timeout_ctx(self):
        """gunicorn's deadline for a request head (and an idle keep-alive), jittered."""
        return gevent.Timeout(jittered(self.cfg.keepalive), False)

    def handle(self, listener, client, addr):
        address = addr[0] if isinstance(addr, tuple) else None
        if address is None or self._exempt(address):
            return self._held(listener, client, addr)
        if self.open_by_address[address] >= self.max_per_client:
            self.refused += 1
            first = address not in self.refused_addresses and len(self.refused_addresses) < _NAMED_ADDRESSES
            if first:
                self.refused_addresses.add(address)
            if first or self.refused % 1000 == 0:  # each offender named once, then a count now and then
                log.warning("closed a connection from %s: it already has %d open (JARVIS_MAX_CLIENT_CONNECTIONS); "
                            "%d refused so far", address, self.max_per_client, self.refused)
            client.close()  # refused before it counts: it sheds nobody else's connection
            return None
        self.open_by_address[address] += 1
        try:
            return self._held(listener, client, addr)
        finally:
            self.open_by_address[address] -= 1
            if not self.open_by_address[address]:
                del self.open_by_address[address]

    def _held(self, listener, client, addr):
        """gunicorn's handling of a connection the worker keeps, counted by the shedder while it lasts."""
        self.shedder.opened(client)
        try:
            return super().handle(listener, client, addr)
        finally:
            self.shedder.closed(client)

    def handle_request(self, listener_name, req, sock, addr):
        self.shedder.serving(sock)
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self.shedder.idle(sock)

    def _exempt(self, address: str) -> bool:
        exempt = self.exempt_by_address.get(address)
        if exempt is None:
            if len(self.exempt_by_address) >= _CACHED_ADDRESSES:
                self.exempt_by_address.clear()
            exempt = self.exempt_by_address[address] = self._trusted(address)
        return exempt

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if "*" in self.cfg.forwarded_allow_ips:
            return True
        return any(ip in network for network in self.cfg.forwarded_allow_networks())


def _raise_open_files_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if hard != resource.RLIM_INFINITY and hard < wanted:
        log.warning("the open-files limit (%d) is below what worker_connections needs (%d): raise it (ulimit -n, "
                    "LimitNOFILE= in systemd)", hard, wanted)


class ClientWatcher:
    """Reports a client's FIN or RST the moment it arrives, by peeking at its socket.

    A libev read watcher on the client's descriptor, not a greenlet: starting and
    stopping one costs no spawn, no switch and no kill per stream. When the
    descriptor turns readable the hub peeks (without blocking, through a plain
    socket object on the same descriptor): EOF is a FIN, an error a reset, and
    data the client's pipelined next request — then it stops watching and lets
    a failing heartbeat write report a disconnect instead. `on_gone` runs right
    there, in the hub, in the context (trace id) of whoever started the watch,
    so it must never block: it may set flags, shut a socket down, kill a greenlet
    without waiting, put_nowait, set an Event, spawn.
    Skipped where peeking is impossible or unsafe (TLS, HTTP/2, no socket). The
    relay stops the watcher before gunicorn reads the next request on the socket.
    """

    def __init__(self, environ: dict, on_gone):
        sock = environ.get("gunicorn.socket")
        usable = (sock is not None and getattr(sock, "cipher", None) is None
                  and str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1"))
        self.sock = sock if usable else None
        self.on_gone = on_gone
        self.io = None
        self.context = None

    def start(self) -> None:
        if self.sock is None:
            return
        fileno = self.sock.fileno()
        if fileno < 0:
            return
        self.context = contextvars.copy_context()
        loop = gevent.get_hub().loop
        # 1: readable. The highest priority: in a loop turn with hundreds of streams' reads pending, a
        # client's FIN is handled (and its upstream cancelled) before them, not after.
        self.io = loop.io(fileno, 1, priority=getattr(loop, "MAXPRI", None))
        self.io.start(self._readable)

    def _readable(self) -> None:
        """In the hub: never block, never raise."""
        io = self.io
        if io is None:
            return
        how = None
        try:
            plain = _socket.socket(fileno=io.fd)
        except OSError:
            how = "reset"  # the descriptor is gone
        else:
            try:
                data = plain.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return  # woken for nothing: keep watching
            except OSError:
                how = "reset"
            else:
                how = None if data else "fin"
            finally:
                plain.detach()
        self.stop()
        if how is not None:
            try:  # at once, in the hub: a spawned greenlet would wait for the loop's next turn (tens of ms
                # under load), and every on_gone only sets flags, shuts a socket down and queues a wake-up
                self.context.run(self.on_gone, how)
            except Exception:
                log.exception("reporting a client's disconnect failed")

    def stop(self) -> None:
        io, self.io = self.io, None
        if io is not None:
            io.stop()
            io.close()
