"""Socket helpers that must not disturb gevent: shutting down a socket another greenlet is reading."""

from __future__ import annotations

import _socket
import socket


def shutdown_quietly(sock) -> None:
    """Send FIN and end reads on `sock` through a plain socket object on the same descriptor.

    gevent's own shutdown() wakes the greenlet reading the socket with EBADF (which gunicorn
    logs as an ERROR); a plain shutdown lets that read return EOF instead.
    """
    fileno = sock.fileno()
    if fileno < 0:
        return  # already closed
    try:
        plain = _socket.socket(fileno=fileno)
    except OSError:
        return
    try:
        plain.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        plain.detach()


def stop_reading(environ: dict) -> None:
    """After this response, close the client's connection: reads on it now end (gunicorn ignores an
    app's Connection: close, but ends a keep-alive connection whose next read finds nothing)."""
    sock = environ.get("gunicorn.socket")
    if sock is not None:
        shutdown_reads(sock)


def shutdown_reads(sock) -> None:
    """End reads on `sock` (the greenlet reading it sees EOF); writes still go out."""
    fileno = sock.fileno()
    if fileno < 0:
        return
    plain = _socket.socket(fileno=fileno)
    try:
        plain.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    finally:
        plain.detach()
