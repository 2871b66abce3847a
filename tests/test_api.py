"""The OpenAI-compatible API in-process: shapes, errors and limits through the real relay, no server."""

import json

from jarvis.errors import ApiError, StreamError
from tests.clients import content_of, metric, sse
from tests.fake_backend import STALL, Pause

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def test_models_lists_the_backends_models(client):
    response = client.get("/v1/models")
    assert response.status_code == 200 and response.json["data"][0]["id"] == "fake-model"


def test_a_stream_is_openai_shaped_and_ends_with_done(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache" and response.headers["X-Accel-Buffering"] == "no"
    body = response.get_data()
    assert body.startswith(b": ok\n\n") and body.endswith(b"data: [DONE]\n\n")
    events = sse(body)
    assert content_of(events) == "w0 w1 w2 "
    assert {value["object"] for kind, value in events if kind == "data"} == {"chat.completion.chunk"}


def test_the_body_reaches_the_backend_byte_for_byte(client, backend):
    raw = json.dumps({**CHAT, "stream": True, "temperature": 0.3, "vendor_extension": {"a": [1, 2]}}).encode()
    client.post("/v1/chat/completions", data=raw, content_type="application/json").get_data()
    assert backend.requests[0].raw == raw


def test_a_whole_answer_when_not_streaming(client):
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200 and response.json["choices"][0]["message"]["content"] == "w0 w1 w2 "


def test_a_mid_stream_failure_is_an_error_event_then_done(client, backend):
    backend.enqueue(["w0 ", StreamError("model_crash", "the model crashed", "server_error")])
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data())
    assert [kind for kind, _ in events][-2:] == ["data", "done"]
    assert events[-2][1]["error"] == {"message": "the model crashed", "type": "server_error", "param": None,
                                      "code": "model_crash"}
    assert content_of(events) == "w0 "


def test_a_backend_refusal_before_the_first_byte_keeps_its_status(client, backend):
    backend.fail_next(ApiError(503, "the model is loading", type_="server_error", code="model_loading"))
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 503 and response.json["error"]["code"] == "model_loading"


def test_a_silent_backend_ends_with_stream_inactivity_and_is_cancelled(make_client, backend):
    client = make_client(stream_inactivity_seconds=0.3, heartbeat_seconds=0.1)
    backend.enqueue(["w0 ", STALL])
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data())
    assert events[-2][1]["error"]["code"] == "stream_inactivity" and events[-1][0] == "done"
    assert ("comment", ": ping") in events  # heartbeats while it was silent
    assert backend.generations[0].closed


def test_a_stream_past_its_max_duration_is_ended(make_client, backend):
    client = make_client(stream_max_seconds=0.3)
    backend.enqueue([item for index in range(100) for item in (f"t{index} ", Pause(0.02))])
    events = sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data())
    assert events[-2][1]["error"]["code"] == "stream_max_duration" and backend.generations[0].closed


def test_metrics_count_streams_by_outcome(client, backend):
    def count(outcome):
        return metric(client.get("/metrics").get_data(as_text=True), "jarvis_streams_total", outcome=outcome,
                      endpoint="chat/completions", upstream="fake")

    before = count("complete"), count("upstream_error")
    client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data()
    backend.enqueue([StreamError("model_crash", "the model crashed")])
    client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data()
    assert (count("complete"), count("upstream_error")) == (before[0] + 1, before[1] + 1)


def test_a_path_with_a_newline_cannot_forge_a_log_line(make_app, jarvis_log):
    app = make_app()

    def boom(rest):
        raise RuntimeError("a bug")

    app.add_url_rule("/boom/<rest>", view_func=boom)
    response = app.test_client().get("/boom/x%0a[2026-01-01 00:00:00 +0000] [1] [INFO] forged")
    assert response.status_code == 500 and response.json["error"]["code"] == "internal_error"
    message = next(message for message in jarvis_log.messages() if "unexpected error" in message)
    assert "\n" not in message and "x\\x0a[2026-01-01" in message


def test_batches_queued_while_the_response_lagged_go_out_in_one_write(client, backend):
    # The first token goes out alone; the fake backend then queues the rest without yielding, as an
    # upstream read does when the response greenlet is behind: they leave together, in order.
    backend.enqueue([f"t{index} " for index in range(6)])
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, buffered=False)
    writes = list(response.response)
    response.close()
    tokens = [content_of(sse(write)) for write in writes]
    assert tokens[:2] == ["", "t0 "]  # the opening comment, then the first token by itself
    assert tokens[2] == "t1 t2 t3 t4 t5 "


def test_a_client_found_gone_at_a_failed_write_counts_its_cancel_latency(client, backend):
    """gunicorn closes the response when a write to a client that left fails: when no watcher saw the client
    go first (a busy machine), that is the stop, and its cancel is timed from it like any other. (It was
    not: /metrics counted 3 cancels for 4 client stops once, with one core kept busy.)"""
    def cancels() -> float:
        return metric(client.get("/metrics").get_data(as_text=True), "jarvis_cancel_latency_seconds_count")

    before = cancels()
    backend.enqueue([f"t{index} " for index in range(50)])
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, buffered=False)
    writes = iter(response.response)
    assert content_of(sse(next(writes) + next(writes))) == "t0 "
    response.close()  # what gunicorn does after a failed write
    assert cancels() == before + 1


class _DeliveredAnswer:
    """An upstream's stream read in the response's greenlet, whose last event is its first batch."""

    interruptible, upstream = True, None

    def __init__(self):
        self.finished = self.aborted = self.closed = False

    def batches(self):
        self.finished = True  # as UpstreamGeneration does on [DONE] or response.completed
        yield [b'{"choices": [{"index": 0, "delta": {"content": "all"}, "finish_reason": "stop"}]}']

    def result(self):
        raise NotImplementedError

    def abort(self):
        self.aborted = self.aborted or not self.finished  # nothing to cancel once it has finished

    def close(self):
        self.closed = True


def test_a_client_hanging_up_right_after_the_last_event_leaves_a_complete_answer():
    """Codex CLI closes its connection the moment it reads response.completed: the answer was whole, so
    it is `complete` (not client_stop), and the upstream is not cancelled (its connection can be reused)."""
    from jarvis.backends import ChatRequest
    from jarvis.endings import Outcome
    from jarvis.relay import Relay
    from jarvis.settings import Settings
    from jarvis.sse import OPENING

    generation = _DeliveredAnswer()
    backend = type("Backend", (), {"name": "upstream", "open": lambda self, request: generation})()
    relay = Relay(backend, ChatRequest(body={}, raw=b"", stream=True, trace_id="t"), Settings(), {})
    relay.open()
    stream = relay.stream()
    assert next(stream) is OPENING
    assert b'"all"' in next(stream)
    relay.interrupt(Outcome.CLIENT_STOP)  # the client read it and hung up, before the relay looked again
    assert b"[DONE]" in b"".join(stream)
    assert relay.ending.outcome is Outcome.COMPLETE
    assert not generation.aborted and generation.closed
