"""Property-based fuzzing of the API and the page API: random JSON and random bytes never cause a 5xx.

In-process, through the real app and relay around a FakeBackend: thousands of requests in seconds.
"""

import json
import logging
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jarvis import create_app, state
from jarvis.settings import Settings
from tests.clients import content_of, sse
from tests.fake_backend import FakeBackend

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                        max_size=4),
                    max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | JSON},
                                optional={"content": st.text(max_size=50) | JSON})
CHAT = st.fixed_dictionaries({}, optional={"messages": st.lists(MESSAGE | JSON, max_size=3) | JSON,
                                           "stream": st.booleans() | JSON, "model": st.text(max_size=10) | JSON,
                                           "temperature": JSON, "max_tokens": JSON, "stop": JSON})
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One app for the whole module, and every ERROR it logs."""
    errors = _ErrorRecorder()
    logging.getLogger("jarvis").addHandler(errors)
    app = create_app(Settings(data_dir=str(tmp_path_factory.mktemp("fuzz")), max_body_bytes=65536),
                     backend=FakeBackend(["w0 ", "w1 "]))
    yield app.test_client(), errors
    logging.getLogger("jarvis").removeHandler(errors)
    with app.app_context():
        state.runs().close()
        state.store().close()


class _ErrorRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def post(server, path: str, data: bytes, content_type: str = "application/json", method: str = "POST"):
    """One request, read to its end (streams included); no ERROR logged while it was served. Checked per
    request: under xdist a module's tests are spread over processes, so a check at the module's end could
    run where no fuzzing did."""
    client, errors = server
    logged_before = len(errors.lines)
    response = client.open(path, method=method, data=data, headers={"Content-Type": content_type})
    response.get_data()
    assert errors.lines[logged_before:] == [], (path, data[:200], errors.lines[logged_before:][:3])
    return response


@FUZZ
@given(body=CHAT | JSON)
def test_chat_completions_with_random_json(server, body):
    response = post(server, "/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code < 500, response.get_data(as_text=True)


@FUZZ
@given(data=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_chat_completions_with_random_bytes(server, data, content_type):
    assert post(server, "/v1/chat/completions", data, content_type).status_code < 500


@FUZZ
@given(create=JSON, rename=JSON, message=JSON | st.fixed_dictionaries({"content": st.text(max_size=30)},
                                                                      optional={"regenerate": JSON, "edit": JSON}))
@pytest.mark.long(6)
def test_page_api_with_random_json(server, create, rename, message):
    created = post(server, "/api/conversations", json.dumps(create).encode())
    assert created.status_code < 500
    conversation_id = created.json["id"] if created.status_code == 201 else "missing"
    # json.dumps writes NaN and Infinity, which are not JSON: good fuzz.
    response = post(server, f"/api/conversations/{conversation_id}", json.dumps(rename).encode(), method="PUT")
    assert response.status_code < 500
    assert post(server, f"/api/conversations/{conversation_id}/messages",
                json.dumps(message).encode()).status_code < 500


@FUZZ
@given(path=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30), data=st.binary(max_size=100))
def test_random_paths(server, path, data):
    url = "/" + urllib.parse.quote(path).lstrip("/")  # "//x" would read as a host to the test client
    assert post(server, url, data, content_type="application/octet-stream").status_code < 500
    assert post(server, url, b"", method="GET").status_code < 500


def test_the_app_still_serves_after_the_fuzzing_and_logged_no_error(server):
    client, errors = server
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                          "stream": True})
    assert content_of(sse(response.get_data())) == "w0 w1 "
    assert errors.lines == [], errors.lines[:3]
