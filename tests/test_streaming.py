"""Streams arrive token by token, in OpenAI's exact format, whatever the upstream's framing."""

import json
import socket
import threading
import time
import uuid

import pytest
import requests

from tests.clients import RawClient, chat_body, chat_request, content_of
from tests.live import sse_events
from tests.upstream_shapes import answer_chunks

pytestmark = [pytest.mark.live, pytest.mark.shared_servers]


@pytest.mark.serial
def test_tokens_arrive_at_the_upstreams_pace(jarvis):
    """Four streams at once, one per framing of the upstream's body (chunked or closed by the upstream,
    LF or CRLF lines), each judged alone: run one after another they took 1.4 s each."""
    interval = 0.2
    framings = [("chunked", False), ("close", False), ("chunked", True), ("close", True)]
    responses = [jarvis.chat(fault={"tokens": 8, "interval": interval, "stamp": True, "framing": framing,
                                    "crlf": crlf, "comments": True}) for framing, crlf in framings]
    results: dict = {}

    def read(index, response):
        arrivals = []
        for kind, value, arrived in sse_events(response):
            if kind == "data" and value["choices"] and value["choices"][0]["delta"].get("content"):
                sent = float(value["choices"][0]["delta"]["content"].rstrip("|"))
                arrivals.append((sent, arrived))
        results[index] = arrivals

    readers = [threading.Thread(target=read, args=pair) for pair in enumerate(responses)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(30)
    for index, framing in enumerate(framings):
        arrivals = results[index]
        assert len(arrivals) == 8, (framing, arrivals)
        lags = [arrived - sent for sent, arrived in arrivals]
        # Each token reaches the client while the upstream is still producing the next one (a few ms on a
        # slow machine); a relay that buffers delivers them all at the end, up to 7 intervals late.
        assert max(lags) < interval, (framing, lags)
        assert arrivals[-1][1] - arrivals[0][1] > 7 * interval * 0.9, framing


def test_stream_is_openai_shaped_and_ends_right_after_done(jarvis):
    response = jarvis.chat(fault={"tokens": 3})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    body = response.raw.read()
    lines = [line for line in body.split(b"\n") if line]
    assert all(line.startswith((b"data: ", b": ")) for line in lines), lines
    assert not any(line.startswith((b"id:", b"retry:", b"event:")) for line in lines)
    assert body.endswith(b"data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in lines if line.startswith(b"data: {")]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w0 w1 w2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("shape", ["llamacpp", "vllm", "ollama", "deepseek", "openai", "think"])
def test_every_upstream_shape_is_relayed_byte_for_byte(jarvis, shape):
    """/v1 never rewrites what the upstream sent: reasoning fields, tags, tool calls, extra fields."""
    fault = {"shape": shape, "reasoning_tokens": 3, "tokens": 2,
             **({"tool_call": {"name": "f", "arguments": '{"a": 1}'}} if shape == "openai" else {})}
    body = jarvis.chat(fault=fault).raw.read()
    sent = [json.dumps(chunk).encode() for _, chunk in answer_chunks(
        shape, reasoning_tokens=3, tokens=2, tool_calls=[fault["tool_call"]] if fault.get("tool_call") else None)]
    relayed = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: {")]
    assert relayed == sent
    assert b'"usage"' not in body  # the client did not ask for usage, and Jarvis did not ask for it


def test_headers_are_flushed_before_the_first_token(jarvis, upstream):
    started = time.monotonic()
    response = jarvis.chat(fault={"tokens": 1, "first_token_delay": 3})
    assert time.monotonic() - started < 1.5
    assert response.status_code == 200
    assert content_of(sse_events(response)) == "w0 "


def test_unknown_fields_and_stream_options_reach_the_upstream_unchanged(jarvis, upstream):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "model": "m1", "temperature": 0.3,
            "max_tokens": 7, "stop": ["x"], "tools": [{"type": "function", "function": {"name": "f"}}],
            "stream_options": {"include_usage": True}, "vendor_extension": {"a": [1, 2]}}
    events = list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", json=body, stream=True)))
    assert upstream.chats[0].body == body
    assert any(kind == "data" and value.get("usage") for kind, value, _ in events)


def test_default_model_is_added_when_the_request_names_none(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_MODEL": "llama3"})
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", json=body, stream=True)))
    assert upstream.chats[0].body["model"] == "llama3"


def test_a_clients_trace_id_comes_back_and_the_upstream_gets_a_uuid_logged_beside_it(jarvis, upstream):
    """Validating upstreams (llama-cpp-python's server) answer 400 to an X-Request-Id that is not a UUID."""
    response = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 2}), stream=True,
                             headers={"X-Request-Id": "trace-abc-123"})
    list(sse_events(response))
    assert response.headers["X-Request-Id"] == "trace-abc-123"
    sent = upstream.chats[0].headers["x-request-id"]
    assert str(uuid.UUID(sent)) == sent
    log = jarvis.wait_for_log("[trace-abc-123] stream end outcome=complete")
    assert log.count("stream end") == 1 and f"upstream_id={sent}" in log


def test_a_fresh_trace_id_for_each_keep_alive_request(jarvis, upstream):
    with requests.Session() as session:
        ids = [session.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 1}, stream=False))
               .headers["X-Request-Id"] for _ in range(3)]
    assert len(set(ids)) == 3
    # Jarvis's own ids are UUIDs already: the upstream gets the same id, in UUID form.
    assert [exchange.headers["x-request-id"] for exchange in upstream.chats] == [str(uuid.UUID(i)) for i in ids]


def test_models_sends_the_upstream_a_uuid_request_id(jarvis, upstream):
    response = requests.get(jarvis.url + "/v1/models", headers={"X-Request-Id": "client-req-0001"})
    assert response.ok and response.headers["X-Request-Id"] == "client-req-0001"
    sent = next(exchange for exchange in upstream.exchanges if exchange.path.endswith("/models")).headers
    assert str(uuid.UUID(sent["x-request-id"])) == sent["x-request-id"]


def test_non_streaming_completion(jarvis):
    response = jarvis.chat(stream=False, fault={"tokens": 3})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "w0 w1 w2 "


def test_models_come_from_the_upstream(jarvis):
    response = requests.get(jarvis.url + "/v1/models")
    assert response.json()["data"][0]["id"] == "fake-model"


def test_healthz_answers_without_the_upstream(start_jarvis):
    jarvis = start_jarvis(upstream_url="http://127.0.0.1:9/v1")
    started = time.monotonic()
    response = requests.get(jarvis.url + "/healthz")
    assert response.json()["status"] == "ok"
    assert time.monotonic() - started < 0.5


def test_keep_alive_connection_serves_stream_after_stream(jarvis):
    client = RawClient(jarvis.port)
    try:
        for _ in range(3):
            client.send(chat_request(chat_body({"tokens": 3})))
            response = client.response()
            body = response.read()
            assert response.status == 200 and body.endswith(b"data: [DONE]\n\n")
    finally:
        client.close()


def test_pipelined_requests_on_one_connection(jarvis):
    client = RawClient(jarvis.port)
    try:
        client.send(chat_request(chat_body({"tokens": 3, "interval": 0.05})) +
                    chat_request(chat_body({"tokens": 2})))
        first, second = client.response().read(), client.response().read()
        assert first.endswith(b"data: [DONE]\n\n") and b"w2 " in first
        assert second.endswith(b"data: [DONE]\n\n") and b"w1 " in second
    finally:
        client.close()
    jarvis.assert_log_clean()


def test_heartbeats_while_the_upstream_is_silent(start_jarvis):
    jarvis = start_jarvis({"JARVIS_HEARTBEAT_SECONDS": "0.3"})
    events = list(sse_events(jarvis.chat(fault={"tokens": 2, "first_token_delay": 1.2})))
    pings = [event for event in events if event[:2] == ("comment", ": ping")]
    assert len(pings) >= 2
    assert events[-1][0] == "done"


def test_heartbeats_between_tokens_and_every_token_after_them(start_jarvis):
    """The response greenlet reads the upstream itself; a heartbeat interrupts its wait for the next
    token, and nothing of the stream is lost or doubled by that."""
    jarvis = start_jarvis({"JARVIS_HEARTBEAT_SECONDS": "0.2"})
    events = list(sse_events(jarvis.chat(fault={"tokens": 4, "interval": 0.5})))
    kinds = ["ping" if event[:2] == ("comment", ": ping") else event[0] for event in events]
    between = kinds[kinds.index("data"):]
    assert between.count("ping") >= 4, kinds  # ~2 in each of the three silences between tokens
    assert content_of(events) == "w0 w1 w2 w3 " and events[-1][0] == "done"


def test_an_open_upstream_stream_holds_one_greenlet(jarvis):
    """Its response's: the pump that opened the upstream hands the stream over and ends (a pump
    reading into a queue would cost a second greenlet per stream and two more switches per token)."""
    health = requests.Session()  # one keep-alive connection: its greenlet is in every count
    responses, events = [], []  # the event generators kept: dropping one closes its response

    def greenlets_with(streams: int) -> int:
        while len(responses) < streams:
            responses.append(jarvis.chat(fault={"tokens": 3, "interval": 2.0}))
            events.append(sse_events(responses[-1]))
            assert next(events[-1])[0] in ("comment", "data")
        return health.get(jarvis.url + "/healthz?debug=1", timeout=10).json()["greenlets"]

    try:
        # Counted between 10 and 20 streams: the first stream also starts the worker's stream snapshots.
        with_10 = greenlets_with(10)
        assert greenlets_with(20) - with_10 == 10
    finally:
        health.close()
        for response in responses:
            response.close()


def test_an_error_answered_before_the_body_was_read_says_connection_close_and_closes_it(jarvis):
    """The unread rest of the body is never read, so the connection cannot serve another request: the
    client is told (Connection: close) rather than finding it closed when it reuses it."""
    with socket.create_connection(("127.0.0.1", jarvis.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 100000\r\n\r\n" + b"x" * 10)
        received = b""
        while chunk := sock.recv(65536):  # until the server closes it
            received += chunk
    head = received.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 415") and b"\r\nconnection: close" in head, head
