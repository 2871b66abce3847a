"""Property-based fuzzing of the API and the page API: random JSON and random bytes never cause a 5xx."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fake_upstream import FakeUpstream
from tests.live import LiveServer, content_of, sse_events

pytestmark = pytest.mark.live

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
    upstream = FakeUpstream()
    upstream.scenario.tokens = 2
    jarvis = LiveServer(tmp_path_factory.mktemp("fuzz"), {"JARVIS_UPSTREAM_URL": upstream.url,
                                                          "JARVIS_MAX_BODY_BYTES": "65536"}).start()
    yield jarvis
    jarvis.stop()
    upstream.stop()


def post(url: str, data: bytes, content_type: str = "application/json", method: str = "POST") -> requests.Response:
    response = requests.request(method, url, data=data, headers={"Content-Type": content_type}, timeout=30,
                                stream=True)
    response.content  # read it all, streams included  # noqa: B018
    return response


@FUZZ
@given(body=CHAT | JSON)
def test_chat_completions_with_random_json(server, body):
    response = post(server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code < 500, response.text


@FUZZ
@given(data=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "text/plain", ""]))
def test_chat_completions_with_random_bytes(server, data, content_type):
    assert post(server.url + "/v1/chat/completions", data, content_type).status_code < 500


@FUZZ
@given(create=JSON, rename=JSON, message=JSON | st.fixed_dictionaries({"content": st.text(max_size=30)},
                                                                      optional={"regenerate": JSON, "edit": JSON}))
def test_page_api_with_random_json(server, create, rename, message):
    created = post(server.url + "/api/conversations", json.dumps(create).encode())
    assert created.status_code < 500
    conversation_id = created.json()["id"] if created.status_code == 201 else "missing"
    # json.dumps writes NaN and Infinity, which are not JSON: good fuzz.
    response = post(f"{server.url}/api/conversations/{conversation_id}", json.dumps(rename).encode(), method="PUT")
    assert response.status_code < 500
    assert post(f"{server.url}/api/conversations/{conversation_id}/messages",
                json.dumps(message).encode()).status_code < 500


@FUZZ
@given(path=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30), data=st.binary(max_size=100))
def test_random_paths(server, path, data):
    url = server.url + "/" + requests.utils.quote(path)
    assert requests.post(url, data=data, timeout=30).status_code < 500
    assert requests.get(url, timeout=30).status_code < 500


def test_server_still_serves_after_the_fuzzing(server):
    response = requests.post(server.url + "/v1/chat/completions", stream=True, timeout=30,
                             json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert content_of(sse_events(response)) == "w0 w1 "
    log = server.log()
    assert "[ERROR]" not in log and "Traceback" not in log, log[-3000:]
