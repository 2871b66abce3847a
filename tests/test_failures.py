"""Every abnormal end is visible to the client: a real status before the first byte, else an error event + [DONE]."""

import time

import pytest
import requests

from tests.clients import content_of
from tests.live import sse_events

pytestmark = [pytest.mark.live, pytest.mark.shared_servers]


def error_then_done(events):
    """The last two events must be the in-band error and [DONE]; return the error object."""
    kinds = [kind for kind, _, _ in events]
    assert kinds[-1] == "done", kinds
    assert kinds[-2] == "data" and "error" in events[-2][1], events[-2:]
    assert kinds.count("done") == 1
    return events[-2][1]["error"]


def test_inactivity_ends_the_stream_with_an_error_event(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_STREAM_INACTIVITY_SECONDS": "2", "JARVIS_HEARTBEAT_SECONDS": "1"})
    response = jarvis.chat(fault={"tokens": 10, "stall_after": 3})
    events = list(sse_events(response))  # returns only once the body has ended
    error = error_then_done(events)
    assert error["code"] == "stream_inactivity" and error["type"] == "timeout_error"
    assert content_of(events) == "w0 w1 w2 "
    last_token = max(arrived for kind, value, arrived in events if kind == "data" and "choices" in value)
    error_at = events[-2][2]
    pings = [arrived for kind, _, arrived in events if kind == "comment" and arrived > last_token]
    assert len(pings) >= 1
    assert 1.9 < error_at - last_token < 3.5
    exchange = upstream.wait_until_ended(upstream.chats[0], timeout=2)
    assert exchange.closed_at is not None
    jarvis.wait_for_log("outcome=inactivity")


def test_max_duration_ends_the_stream(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_STREAM_MAX_SECONDS": "1"})
    events = list(sse_events(jarvis.chat(fault={"tokens": 100, "interval": 0.05})))
    assert error_then_done(events)["code"] == "stream_max_duration"
    assert upstream.wait_until_ended(upstream.chats[0], timeout=2).closed_at is not None
    jarvis.wait_for_log("outcome=max_duration")


@pytest.mark.parametrize("fault, code", [
    ({"done": False}, "upstream_incomplete"),
    ({"done": False, "framing": "close"}, "upstream_incomplete"),
    ({"reset_after": 3}, "upstream_disconnected"),
    ({"close_after": 3}, "upstream_disconnected"),
    ({"close_after": 3, "framing": "close"}, "upstream_incomplete"),
])
def test_upstream_ending_early_becomes_an_error_event(jarvis, fault, code):
    events = list(sse_events(jarvis.chat(fault={"tokens": 5, **fault})))
    error = error_then_done(events)
    assert error["code"] == code and error["type"] == "upstream_error"
    jarvis.wait_for_log("outcome=upstream_error")
    jarvis.assert_log_clean()


def test_upstream_error_event_is_relayed_as_it_came(jarvis):
    events = list(sse_events(jarvis.chat(fault={"tokens": 5, "error_event_after": 2})))
    assert error_then_done(events) == {"message": "the model crashed", "type": "server_error", "param": None,
                                       "code": "model_crash"}
    assert content_of(events) == "w0 w1 "


def test_malformed_upstream_lines_are_skipped(jarvis):
    events = list(sse_events(jarvis.chat(fault={"tokens": 4, "malformed_after": 2})))
    assert content_of(events) == "w0 w1 w2 w3 "
    assert events[-1][0] == "done"
    jarvis.wait_for_log("[WARNING] jarvis.backends.upstream [")
    assert "skipped 1 upstream events that were not JSON objects" in jarvis.log()


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_upstream_http_error_keeps_its_status_and_body(jarvis, status):
    body = {"error": {"message": f"upstream says {status}", "type": "invalid_request_error", "param": "model",
                      "code": "model_not_found"}}
    response = jarvis.chat(fault={"status": status, "error_body": body})
    assert response.status_code == status
    assert response.json() == body


def test_upstream_http_error_without_openai_body_is_wrapped(jarvis):
    response = jarvis.chat(fault={"status": 500, "error_body": "boom"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "upstream_status" and "500" in error["message"]


def test_unreachable_upstream_is_502(start_jarvis):
    jarvis = start_jarvis(upstream_url="http://127.0.0.1:9/v1")
    response = jarvis.chat()
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unreachable"
    assert requests.get(jarvis.url + "/v1/models").status_code == 502


def test_no_upstream_headers_within_the_inactivity_limit_is_504(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_STREAM_INACTIVITY_SECONDS": "1"})
    started = time.monotonic()
    response = jarvis.chat(fault={"headers_delay": 10})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5
    assert upstream.wait_until_ended(upstream.chats[0], timeout=2).closed_at is not None


def test_server_keeps_serving_after_every_failure(jarvis):
    for fault in [{"reset_after": 1}, {"status": 500, "error_body": {}}, {"done": False}]:
        list(sse_events(jarvis.chat(fault={"tokens": 3, **fault}))) if "status" not in fault else jarvis.chat(
            fault=fault)
    assert content_of(sse_events(jarvis.chat(fault={"tokens": 2}))) == "w0 w1 "
    jarvis.assert_log_clean()
