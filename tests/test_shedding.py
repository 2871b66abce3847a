"""The worker's connection shedding and deadline jitter, in-process: which connection goes first, what is
never shed, and deadlines set together expiring apart (the live attack: tests/test_connection_limits.py)."""

import socket
import types

import pytest

from jarvis import inputs
from jarvis.worker import JarvisWorker, Shedder, jittered


@pytest.fixture
def pairs():
    made = []

    def pair():
        server, client = socket.socketpair()
        made.append((server, client))
        return server, client

    yield pair
    for server, client in made:
        server.close()
        client.close()


def eof(sock) -> bool:
    """Has this end been shut down for reads (a read would return EOF now)?"""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False


def test_past_ninety_percent_each_new_connection_sheds_the_oldest_waiting_one_never_one_being_served(pairs):
    shedder = Shedder(10)  # sheds above 9
    socks = [pairs()[0] for _ in range(10)]
    for sock in socks[:9]:
        shedder.opened(sock)
    assert shedder.shed == 0
    shedder.serving(socks[0])  # the oldest is being answered (a stream): never shed
    shedder.opened(socks[9])
    assert shedder.shed == 1
    assert eof(socks[1]) and not eof(socks[0]) and not eof(socks[2])
    # The shed one still holds its slot until its greenlet ends, but counts as leaving: no second shed.
    shedder.opened(pairs()[0])
    assert shedder.shed == 2 and eof(socks[2]) and not eof(socks[3])
    shedder.closed(socks[1])
    shedder.closed(socks[2])
    assert shedder.open == 9 and not shedder.shedding


def test_a_kept_alive_connection_waits_again_as_the_newest_and_a_body_shed_is_answered(pairs):
    shedder = Shedder(4)  # sheds above 3
    a, b, c = (pairs()[0] for _ in range(3))
    for sock in (a, b, c):
        shedder.opened(sock)
    shedder.serving(a)
    shedder.idle(a)  # its answer went out: it waits for its next request, now the newest waiter
    with shedder.awaiting_body(b) as was_shed:
        shedder.opened(pairs()[0])
        assert was_shed()  # b, reading its body, was the oldest waiter: its route answers 503
    assert not eof(a) and not eof(c)


def test_deadlines_set_together_expire_apart(client, monkeypatch):
    values = [jittered(10.0) for _ in range(1000)]
    assert all(10.0 <= value <= 11.0 for value in values)
    assert max(values) - min(values) > 0.5  # 1,000 deadlines spread over most of a second, not one instant
    assert all(30.0 <= jittered(30.0) <= 31.0 for _ in range(1000))  # at most a second late
    # The two deadlines a slow client meets are jittered: a request body's, and gunicorn's for a head.
    asked = []
    monkeypatch.setattr(inputs, "jittered", lambda seconds: asked.append(seconds) or seconds)
    assert client.post("/api/conversations", json={}).status_code == 201
    assert asked == [10.0 + len(b"{}") / 16384]  # JARVIS_BODY_SECONDS plus its share of the body
    worker = JarvisWorker.__new__(JarvisWorker)
    worker.cfg = types.SimpleNamespace(keepalive=15)
    heads = [worker.timeout_ctx().seconds for _ in range(100)]
    assert all(15.0 <= seconds <= 16.0 for seconds in heads) and len(set(heads)) > 1
