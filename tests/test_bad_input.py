"""Bad requests get a 4xx with OpenAI's error JSON, never a 500, and the app keeps serving (in-process)."""

import json

import pytest

from tests.clients import content_of, sse

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(make_client):
    return make_client(max_body_bytes=4096)


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
    "unknown path": ("POST", "/v1/images/generations", {"prompt": "x"}, "application/json", 404, "unknown_url"),
}


def send(client, case):
    method, path, body, content_type, _, _ = case
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return client.open(path, method=method, data=data, headers={"Content-Type": content_type} if content_type else {})


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_request_gets_openai_error_json(client, case):
    response = send(client, CASES[case])
    assert response.status_code == CASES[case][4]
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == CASES[case][5] and error["type"] == "invalid_request_error" and error["message"]
    assert response.headers["x-should-retry"] == "false"


def test_the_app_keeps_serving_and_never_logged_an_error(client, backend, jarvis_log):
    for case in CASES.values():
        send(client, case)
    response = client.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    assert content_of(sse(response.get_data())) == "w0 w1 w2 "
    assert len(backend.requests) == 1, "an invalid request reached the backend"
    jarvis_log.assert_clean()
