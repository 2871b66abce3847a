"""Safe to expose: authentication, cross-site refusal, limits, headers, secrets kept out of logs."""

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from jarvis.settings import is_loopback_bind
from tests.live import ROOT, content_of, free_port, sse_events

pytestmark = pytest.mark.live

KEY = "test-key-0123456789abcdef"
UPSTREAM_CANARY = "sk-upstream-canary-5f1e0c9a7b"
CLIENT_CANARY = "client-canary-key-8d2b4a6c1e"

ROUTES = [("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
          ("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/api/conversations", None),
          ("POST", "/api/conversations", {}), ("GET", "/api/conversations/some-id", None),
          ("PUT", "/api/conversations/some-id", {"title": "x"}), ("DELETE", "/api/conversations/some-id", None),
          ("POST", "/api/conversations/some-id/messages", {"content": "hi"})]


@pytest.fixture
def guarded(start_jarvis):
    return start_jarvis({"JARVIS_API_KEY": KEY})


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_the_key(guarded, method, path, body):
    response = requests.request(method, guarded.url + path, json=body)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert KEY not in response.text


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}],
                         ids=["bearer", "x-api-key"])
def test_either_header_with_the_key_works(guarded, headers):
    assert requests.get(guarded.url + "/v1/models", headers=headers).status_code == 200
    response = requests.post(guarded.url + "/v1/chat/completions", headers=headers, stream=True,
                             json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert content_of(sse_events(response)) == "w0 w1 w2 w3 w4 "


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"x-api-key": "wrong-key-0123456789abcdef"},
    {"Authorization": f"Bearer {KEY}", "x-api-key": "wrong"}, {"Authorization": "wrong", "x-api-key": KEY},
    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"x-api-key": ""}],
    ids=["wrong bearer", "wrong x-api-key", "good bearer + wrong x-api-key", "wrong scheme + good x-api-key",
         "basic", "prefix", "empty"])
def test_a_wrong_key_in_any_header_never_passes(guarded, headers):
    assert requests.get(guarded.url + "/v1/models", headers=headers).status_code == 401


def test_healthz_and_the_page_shell_stay_open(guarded):
    assert requests.get(guarded.url + "/healthz").status_code == 200
    assert requests.get(guarded.url + "/").status_code == 200
    assert requests.get(guarded.url + "/static/chat.js").status_code == 200
    assert requests.get(guarded.url + "/api/session").json() == {"required": True, "signed_in": False}


def test_page_signs_in_once_with_a_strict_httponly_cookie(guarded):
    with requests.Session() as browser:
        assert browser.post(guarded.url + "/api/session", json={"key": "nope"}).status_code == 401
        response = browser.post(guarded.url + "/api/session", json={"key": KEY})
        assert response.status_code == 204
        cookie = response.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
        assert browser.get(guarded.url + "/api/conversations").status_code == 200
        assert browser.get(guarded.url + "/api/conversations", headers={"x-api-key": "wrong"}).status_code == 401
        browser.delete(guarded.url + "/api/session")
        assert browser.get(guarded.url + "/api/conversations").status_code == 401


def test_forged_cookie_is_refused(guarded):
    forged = {"jarvis_session": "eyJhdXRoIjoiYWJjIn0.Zm9v.YmFy"}
    assert requests.get(guarded.url + "/api/conversations", cookies=forged).status_code == 401


def test_non_loopback_bind_without_a_key_is_refused():
    env = {"PATH": "/usr/bin:/bin", "JARVIS_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind",
                             f"0.0.0.0:{free_port()}", "app:app"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr and "JARVIS_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("address, loopback", [("127.0.0.1:8000", True), ("[::1]:8000", True),
                                               ("localhost:8000", True), ("unix:/run/jarvis.sock", True),
                                               ("0.0.0.0:8000", False), ("192.168.1.5:80", False),
                                               ("[::]:8000", False), ("example.org:80", False)])
def test_loopback_detection(address, loopback):
    assert is_loopback_bind(address) is loopback


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"}])
def test_cross_site_state_changes_are_refused(jarvis, headers):
    for method, path, body in [("POST", "/api/conversations", {}), ("POST", "/v1/chat/completions",
                                                                   {"messages": [{"role": "user", "content": "x"}]})]:
        response = requests.request(method, jarvis.url + path, json=body, headers=headers)
        assert response.status_code == 403 and response.json()["error"]["code"] == "cross_site"
    assert requests.get(jarvis.url + "/api/conversations").json()["data"] == []


def test_same_origin_requests_pass(jarvis):
    response = requests.post(jarvis.url + "/api/conversations", json={},
                             headers={"Origin": jarvis.url, "Sec-Fetch-Site": "same-origin"})
    assert response.status_code == 201


def test_get_never_changes_state(jarvis):
    conversation = requests.post(jarvis.url + "/api/conversations", json={}).json()
    before = requests.get(f"{jarvis.url}/api/conversations/{conversation['id']}").json()
    for path in ["/", "/healthz", "/v1/models", "/metrics", "/api/conversations", "/api/session",
                 f"/api/conversations/{conversation['id']}", "/v1/chat/completions",
                 f"/api/conversations/{conversation['id']}/messages?content=hi", "/?prompt=hi"]:
        assert requests.get(jarvis.url + path).status_code in (200, 405)
    assert requests.get(f"{jarvis.url}/api/conversations/{conversation['id']}").json() == before
    assert len(requests.get(jarvis.url + "/api/conversations").json()["data"]) == 1


def test_security_headers_on_every_response(jarvis):
    for path in ["/", "/healthz", "/v1/models", "/nope", "/static/chat.js"]:
        headers = requests.get(jarvis.url + path).headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    page = requests.get(jarvis.url + "/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in page and "connect-src 'self'" in page and "img-src 'self' data:" in page
    assert "unsafe-inline" not in page


def test_message_count_and_size_limits(start_jarvis):
    jarvis = start_jarvis({"JARVIS_MAX_MESSAGES": "3", "JARVIS_MAX_MESSAGE_CHARS": "100"})
    too_many = [{"role": "user", "content": "x"}] * 4
    response = requests.post(jarvis.url + "/v1/chat/completions", json={"messages": too_many})
    assert response.status_code == 400 and response.json()["error"]["code"] == "too_many_messages"
    too_long = [{"role": "user", "content": "x" * 101}]
    response = requests.post(jarvis.url + "/v1/chat/completions", json={"messages": too_long})
    assert response.status_code == 400 and response.json()["error"]["code"] == "messages_too_long"


def test_over_the_stream_cap_is_429_and_streams_below_it_are_unaffected(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_MAX_STREAMS": "3"})
    running = [jarvis.chat(fault={"tokens": 20, "interval": 0.05}) for _ in range(3)]
    upstream.wait_for(lambda up: len(up.chats) == 3)
    refused = jarvis.chat(fault={"tokens": 1})
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "too_many_streams"
    for response in running:
        assert content_of(sse_events(response)) == "".join(f"w{i} " for i in range(20))
    assert content_of(sse_events(jarvis.chat(fault={"tokens": 1}))) == "w0 "


def test_canary_secrets_never_reach_the_logs(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_UPSTREAM_API_KEY": UPSTREAM_CANARY, "JARVIS_API_KEY": CLIENT_CANARY,
                           "JARVIS_LOG_LEVEL": "DEBUG"})
    good = {"Authorization": f"Bearer {CLIENT_CANARY}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    requests.get(jarvis.url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_CANARY}x"})
    requests.post(jarvis.url + "/v1/chat/completions", headers=good, json={"messages": "bad"})
    list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", headers=good, stream=True,
                                  json={**body, "x_fault": {"error_event_after": 1}})))
    requests.post(jarvis.url + "/v1/chat/completions", headers=good, json={**body, "x_fault": {
        "status": 500, "error_body": {"error": {"message": "boom", "type": "x", "param": None, "code": None}}}})
    stopped = requests.post(jarvis.url + "/v1/chat/completions", headers=good, stream=True,
                            json={**body, "x_fault": {"tokens": 200, "interval": 0.02}})
    next(sse_events(stopped))
    with requests.Session() as browser:
        browser.post(jarvis.url + "/api/session", json={"key": CLIENT_CANARY})
        cookie = browser.cookies.get("jarvis_session")
        browser.get(jarvis.url + "/api/conversations")
    os.kill(jarvis.worker().pid, signal.SIGUSR1)
    stopped.close()
    jarvis.wait_for_log("==== end of jarvis stack dump")
    jarvis.wait_for_log("outcome=client_stop")
    assert upstream.chats[0].headers["authorization"] == f"Bearer {UPSTREAM_CANARY}"  # to the upstream only
    everything = jarvis.log() + jarvis.stderr_path.read_text()
    for secret in (UPSTREAM_CANARY, CLIENT_CANARY, cookie):
        assert secret and secret not in everything


def test_json_logs_one_object_per_line(start_jarvis):
    jarvis = start_jarvis({"JARVIS_LOG_FORMAT": "json"})
    response = requests.post(jarvis.url + "/v1/chat/completions", stream=True, headers={"X-Request-Id": "json-1"},
                             json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    list(sse_events(response))
    jarvis.wait_for_log('"outcome": "complete"')
    entries = [json.loads(line) for line in jarvis.log().splitlines() if line.startswith("{")]
    end = next(entry for entry in entries if entry.get("outcome") == "complete")
    assert end["trace_id"] == "json-1" and end["events"] == 6 and end["duration_ms"] >= 0
    assert end["ttft_ms"] is not None and end["level"] == "INFO"


def test_redirecting_upstream_is_not_followed(start_jarvis, upstream):
    jarvis = start_jarvis()
    response = jarvis.chat(fault={"status": 307, "error_body": {}})
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_redirect"
    assert len(upstream.exchanges) == 1


def test_page_receives_only_known_chunk_fields(jarvis, upstream):
    upstream.scenario.shape, upstream.scenario.reasoning_tokens = "openai", 2  # chunks full of extra fields
    conversation = requests.post(jarvis.url + "/api/conversations", json={}).json()
    response = requests.post(f"{jarvis.url}/api/conversations/{conversation['id']}/messages",
                             json={"content": "hi"}, stream=True)
    chunks = [value for kind, value, _ in sse_events(response) if kind == "data"]
    assert chunks and all(set(chunk) <= {"id", "object", "created", "model", "choices", "stats"} for chunk in chunks)
    assert all(set(choice) == {"index", "delta", "finish_reason"} for chunk in chunks for choice in chunk["choices"])
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    assert all(set(delta) <= {"role", "content", "reasoning_content", "content_was_reasoning"} for delta in deltas)
    assert all(isinstance(value, (int, float, str, type(None))) for value in chunks[-1]["stats"].values())


