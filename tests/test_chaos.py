"""Chaos: many clients leaving at random moments leave no trace: no hang, no leak, no error."""

import random
import threading
import time

import pytest
import requests

from tests.clients import RawClient, chat_body, chat_request, content_of
from tests.live import sse_events, wait_until

pytestmark = [pytest.mark.live, pytest.mark.serial]

CLIENTS = 20
STREAMS_PER_CLIENT = 10
TOKENS = 20


def one_stream(port: int, rng: random.Random, outcomes: list, interval: float, actions: list):
    client = RawClient(port)
    try:
        client.send(chat_request(chat_body({"tokens": TOKENS, "interval": interval})))
        action = rng.choice(actions)
        if action == "read":
            body = client.response().read()
            outcomes.append("complete" if body.endswith(b"data: [DONE]\n\n") else "broken")
            return
        leave_after = rng.randint(0, TOKENS)
        if leave_after:
            client.read_until(b'"content": "w', count=leave_after)
        elif rng.random() < 0.5:
            client.read_until(b": ok\n\n")  # leave between the headers and the first token
        client.close_fin() if action == "fin" else client.close_rst()
        outcomes.append(action)
    finally:
        client.close()


def run_clients(port: int, seed: int, streams_per_client: int, outcomes: list, interval: float = 0.01,
                actions: tuple = ("fin", "rst", "read")):
    errors = []

    def worker(index):
        rng = random.Random(seed * 1000 + index)
        try:
            for _ in range(streams_per_client):
                one_stream(port, rng, outcomes, interval, list(actions))
        except Exception as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]


@pytest.mark.timeout(180)
def test_two_hundred_streams_leaving_at_random_moments(jarvis, upstream):
    # Warm up: 20 overlapping complete streams leave 20 idle connections in the upstream pool,
    # as many as the chaos below can ever leave there.
    warm = []
    run_clients(jarvis.port, seed=0, streams_per_client=1, outcomes=warm, interval=0.05, actions=("read",))
    upstream.wait_for(lambda up: all(exchange.ended for exchange in up.chats), timeout=10)
    worker = jarvis.worker()
    fds_before = worker.num_fds()

    outcomes = []
    run_clients(jarvis.port, seed=1, streams_per_client=STREAMS_PER_CLIENT, outcomes=outcomes)
    assert len(outcomes) == CLIENTS * STREAMS_PER_CLIENT
    assert "broken" not in outcomes
    assert {"fin", "rst", "complete"} <= set(outcomes)

    started = time.monotonic()
    assert requests.get(jarvis.url + "/healthz", timeout=1).ok
    assert time.monotonic() - started < 1
    assert content_of(sse_events(jarvis.chat(fault={"tokens": 3}))) == "w0 w1 w2 "

    upstream.wait_for(lambda up: all(exchange.ended for exchange in up.chats), timeout=10)
    cancelled = [exchange for exchange in upstream.chats if exchange.closed_at is not None]
    assert cancelled, "no upstream generation was cancelled"
    jarvis.wait_for_log("stream end outcome=", count=len(upstream.chats))
    # gunicorn may still be closing the last client sockets: a bounded poll, then the verdict.
    wait_until(lambda: worker.num_fds() <= fds_before + 5, 5, lambda: (fds_before, worker.num_fds()))
    jarvis.assert_log_clean()
    print(f"chaos: {len(upstream.chats)} streams, {len(cancelled)} cancelled upstream, "
          f"fds {fds_before} -> {worker.num_fds()}, outcomes "
          f"{ {name: outcomes.count(name) for name in set(outcomes)} }")
