"""Bad requests get a 4xx with OpenAI's error JSON, never a 500, and the server keeps serving."""

import json

import pytest
import requests

from tests.live import content_of, sse_events

pytestmark = pytest.mark.live

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.fake_upstream import FakeUpstream
    from tests.live import LiveServer

    upstream = FakeUpstream()
    jarvis = LiveServer(tmp_path_factory.mktemp("bad-input"), {"JARVIS_UPSTREAM_URL": upstream.url,
                                                               "JARVIS_MAX_BODY_BYTES": "4096"}).start()
    yield jarvis, upstream
    jarvis.stop()
    upstream.stop()


CASES = {
    "malformed JSON": ("POST", "/v1/chat/completions", b'{"messages": [', "application/json", 400, "invalid_json"),
    "not an object": ("POST", "/v1/chat/completions", b"[1, 2]", "application/json", 400, "invalid_json"),
    "not UTF-8": ("POST", "/v1/chat/completions", b'{"messages": "\xff"}', "application/json", 400, "invalid_json"),
    "deeply nested": ("POST", "/v1/chat/completions", b"[" * 4000, "application/json", 400, "invalid_json"),
    "missing messages": ("POST", "/v1/chat/completions", {"model": "m"}, "application/json", 400,
                         "invalid_messages"),
    "empty messages": ("POST", "/v1/chat/completions", {"messages": []}, "application/json", 400,
                       "invalid_messages"),
    "messages not a list": ("POST", "/v1/chat/completions", {"messages": "hi"}, "application/json", 400,
                            "invalid_messages"),
    "message without role": ("POST", "/v1/chat/completions", {"messages": [{"content": "hi"}]},
                             "application/json", 400, "invalid_messages"),
    "role not a string": ("POST", "/v1/chat/completions", {"messages": [{"role": 1}]}, "application/json", 400,
                          "invalid_messages"),
    "message not an object": ("POST", "/v1/chat/completions", {"messages": ["hi"]}, "application/json", 400,
                              "invalid_messages"),
    "stream not a boolean": ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stream": "yes"},
                             "application/json", 400, "invalid_type"),
    "body over the size limit": ("POST", "/v1/chat/completions", {"messages": MESSAGES, "pad": "x" * 5000},
                                 "application/json", 413, "request_too_large"),
    "wrong content type": ("POST", "/v1/chat/completions", b"messages=hi", "application/x-www-form-urlencoded",
                           415, "unsupported_media_type"),
    "wrong method": ("GET", "/v1/chat/completions", None, None, 405, "method_not_allowed"),
    "wrong method on models": ("DELETE", "/v1/models", None, None, 405, "method_not_allowed"),
    "unknown path": ("POST", "/v1/embeddings", {"input": "x"}, "application/json", 404, "unknown_url"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_request_gets_openai_error_json(server, case):
    jarvis, upstream = server
    method, path, body, content_type, status, code = CASES[case]
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.request(method, jarvis.url + path, data=data, headers=headers, timeout=10)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-should-retry"] == "false"


def test_the_server_keeps_serving_and_never_logged_an_error(server):
    jarvis, upstream = server
    for case in CASES.values():  # run them all again, back to back, on one connection
        method, path, body, content_type, _, _ = case
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        requests.request(method, jarvis.url + path, data=data,
                         headers={"Content-Type": content_type} if content_type else {}, timeout=10)
    response = requests.post(jarvis.url + "/v1/chat/completions", stream=True, timeout=10,
                             json={"messages": MESSAGES, "stream": True})
    assert content_of(sse_events(response)) == "w0 w1 w2 w3 w4 "
    assert not upstream.chats[:-1], "an invalid request reached the upstream"
    assert "[ERROR]" not in jarvis.log() and "Traceback" not in jarvis.log()
