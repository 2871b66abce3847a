"""A client that leaves, at any moment and in any way, cancels the upstream generation at once."""

import statistics

import pytest
import requests

from tests.clients import RawClient, chat_body, chat_request
from tests.live import wait_until

pytestmark = [pytest.mark.live, pytest.mark.serial, pytest.mark.shared_servers]

CANCEL_LIMIT = 0.1  # seconds from the client's close to the upstream connection's close


def open_stream(jarvis, upstream, fault, index):
    client = RawClient(jarvis.port)
    client.send(chat_request(chat_body(fault)))
    exchange = upstream.wait_for_exchange(index)
    return client, exchange


def stop_mid_stream(jarvis, upstream, how, runs=20):
    delays = []
    for run in range(1, runs + 1):
        client, exchange = open_stream(jarvis, upstream, {"tokens": 1000, "interval": 0.02}, run)
        upstream.wait_for_tokens(exchange, 3)
        client.read_until(b'"content": "w2 "')
        closed = client.close_fin() if how == "fin" else client.close_rst()
        upstream.wait_until_ended(exchange, timeout=5)
        client.close()
        assert exchange.closed_at is not None, "the upstream finished instead of being cancelled"
        delays.append(exchange.closed_at - closed)
    return delays


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_stop_mid_stream_cancels_the_upstream_within_100_ms_every_time(jarvis, upstream, how):
    delays = stop_mid_stream(jarvis, upstream, how)
    print(f"{how}: cancel p50={statistics.median(delays) * 1000:.1f} ms max={max(delays) * 1000:.1f} ms")
    assert max(delays) < CANCEL_LIMIT, delays
    assert all(exchange.tokens_sent < 1000 for exchange in upstream.chats)
    jarvis.wait_for_log("outcome=client_stop", count=20)
    jarvis.assert_log_clean()


@pytest.mark.parametrize("fault", [{"headers_delay": 5}, {"first_token_delay": 5}, {"stall_after": 2}],
                         ids=["before-headers", "before-first-token", "during-stall"])
@pytest.mark.parametrize("how", ["fin", "rst"])
def test_stop_while_the_upstream_is_silent(jarvis, upstream, fault, how):
    client, exchange = open_stream(jarvis, upstream, {"tokens": 10, **fault}, 1)
    if "stall_after" in fault:
        client.read_until(b'"content": "w1 "')
    elif "first_token_delay" in fault:
        client.read_until(b": ok\n\n")
    closed = client.close_fin() if how == "fin" else client.close_rst()
    upstream.wait_until_ended(exchange, timeout=5)
    client.close()
    assert exchange.closed_at is not None
    assert exchange.closed_at - closed < CANCEL_LIMIT
    jarvis.wait_for_log("outcome=client_stop")


def test_non_streaming_request_cancels_the_upstream_when_the_client_leaves(jarvis, upstream):
    client = RawClient(jarvis.port)
    client.send(chat_request(chat_body({"tokens": 3, "headers_delay": 5}, stream=False)))
    exchange = upstream.wait_for_exchange(1)
    closed = client.close_rst()
    upstream.wait_until_ended(exchange, timeout=5)
    assert exchange.closed_at is not None and exchange.closed_at - closed < CANCEL_LIMIT
    jarvis.wait_for_log("outcome=client_stop")


def test_stop_is_one_info_line_without_traceback(jarvis, upstream):
    stop_mid_stream(jarvis, upstream, "rst", runs=1)
    jarvis.wait_for_log("outcome=client_stop")
    end_lines = jarvis.end_lines()
    assert len(end_lines) == 1 and "[INFO]" in end_lines[0] and "cancel_ms=" in end_lines[0]
    jarvis.assert_log_clean("[WARNING]")


def test_with_detached_seconds_0_a_page_leaving_cancels_at_once_and_saves_the_answer_as_stopped(
        start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_DETACHED_SECONDS": "0"})
    upstream.scenario.tokens, upstream.scenario.interval = 200, 0.02
    conversation_id = requests.post(jarvis.url + "/api/conversations", json={}).json()["id"]
    client = RawClient(jarvis.port)
    client.send(chat_request({"content": "hi"}, path=f"/api/conversations/{conversation_id}/messages"))
    received = client.read_until(b'"content": "w5 "')
    closed = client.close_fin()
    exchange = upstream.wait_until_ended(upstream.wait_for_exchange(1))
    client.close()
    assert exchange.closed_at is not None and exchange.closed_at - closed < CANCEL_LIMIT
    jarvis.wait_for_log("outcome=client_stop")

    def saved_stopped():
        last = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}").json()["messages"][-1]
        return last if last["status"] == "stopped" else None

    assistant = wait_until(saved_stopped, 5, lambda: "the answer was never saved as stopped")
    assert assistant["content"].startswith("w0 w1 w2 w3 w4 w5 ") and b"w5" in received
