"""Several upstreams behind one URL (JARVIS_UPSTREAMS_FILE): merged model lists, routing by model,
failover before the first byte and never after it, each key to its own upstream, and the rest of the
OpenAI surface (completions, embeddings, responses) through the same relay."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import openai
import pytest
import requests

from jarvis.errors import ApiError
from jarvis.settings import Settings, SettingsError
from tests.clients import RawClient, chat_request, content_of, data_of
from tests.fake_upstream import FakeUpstream, Scenario
from tests.live import ROOT, LiveServer, sse_events, wait_until
from tests.net import free_port

KEY_A, KEY_B = "sk-upstream-a-0123456789", "sk-upstream-b-9876543210"


def write_upstreams(tmp_path, text: str) -> str:
    path = tmp_path / "upstreams.toml"
    path.write_text(text)
    return str(path)


def two_tables(tmp_path, a: FakeUpstream, b: FakeUpstream) -> str:
    (tmp_path / "key-b").write_text(KEY_B + "\n")
    return write_upstreams(tmp_path, f"""
[[upstream]]
name = "a"
url = "{a.url}"
api_key_env = "KEY_A"

[[upstream]]
name = "b"
url = "{b.url}"
api_key_file = "{tmp_path / 'key-b'}"
""")


ROUTED = {"KEY_A": KEY_A, "JARVIS_UPSTREAM_HEADERS_SECONDS": "1"}


def two_upstreams() -> tuple[FakeUpstream, FakeUpstream]:
    """Two fake upstreams with their own models and one they share."""
    return FakeUpstream(("alpha", "shared")), FakeUpstream(("beta", "shared"))


# Most tests here leave the router as they found it (every upstream up), so they share one pair and one
# Jarvis in front of it (a gunicorn start saved per test, as with the marker shared_servers); a test that
# fails an upstream over (the router then rests it) has its own, `own_pair` and `own_routed`.


@pytest.fixture(scope="module")
def module_pair():
    a, b = two_upstreams()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def module_routed(tmp_path_factory, module_pair):
    folder = tmp_path_factory.mktemp("routed")
    server = LiveServer(folder, {"JARVIS_UPSTREAMS_FILE": two_tables(folder, *module_pair), **ROUTED})
    yield server.start()
    server.stop()


@pytest.fixture
def pair(module_pair):
    """The module's two upstreams, reset (no exchanges, the default scenario)."""
    return tuple(upstream.reset() for upstream in module_pair)


@pytest.fixture
def routed(module_routed, pair):
    """The module's Jarvis in front of both, `a` first, its log read from this test's start. A test that
    left an upstream resting or unreachable takes it down with it: the next one gets a new one."""
    yield module_routed.for_next_test()
    try:
        health = requests.get(module_routed.url + "/healthz", timeout=10).json()
        states = [upstream["state"] for upstream in health["upstreams"]]
    except requests.RequestException:
        states = None
    if states != ["up", "up"]:
        module_routed.stop()


@pytest.fixture
def own_pair():
    a, b = two_upstreams()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def own_routed(start_jarvis, tmp_path, own_pair):
    """A Jarvis of the test's own in front of `own_pair`, `a` first."""
    return start_jarvis({"JARVIS_UPSTREAMS_FILE": two_tables(tmp_path, *own_pair), **ROUTED})


def chat(jarvis, model: str | None, fault: dict | None = None) -> list:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "x_fault": fault or {"tokens": 3}}
    if model is not None:
        body["model"] = model
    response = requests.post(jarvis.url + "/v1/chat/completions", json=body, stream=True, timeout=30)
    assert response.status_code == 200, response.text
    return list(sse_events(response))


# -- the file ---------------------------------------------------------------------------------------


BAD_FILES = {
    "not TOML": ("[[upstream]\nname = 'a'", ["not valid TOML"]),
    "no table": ("title = 'x'\n", ["unknown top-level key 'title'"]),
    "empty": ("", ["declares no upstream"]),
    "unknown key": ("[[upstream]]\nname = 'a'\nurl = 'http://127.0.0.1:1/v1'\nmodel = ['x']\n",
                    ["[[upstream]] #1", "unknown key 'model'"]),
    "duplicate name": ("[[upstream]]\nname = 'a'\nurl = 'http://127.0.0.1:1/v1'\n"
                       "[[upstream]]\nname = 'a'\nurl = 'http://127.0.0.1:2/v1'\n",
                       ["[[upstream]] #2", "'a' is used twice"]),
    "bad URL": ("[[upstream]]\nname = 'gpu'\nurl = 'localhost:11434'\n", ["'gpu'", "'url'"]),
    "no URL": ("[[upstream]]\nname = 'gpu'\n", ["'gpu'", "'url' is required"]),
    "bad name": ("[[upstream]]\nname = 'a b'\nurl = 'http://127.0.0.1:1/v1'\n", ["#1", "'name'"]),
    "key variable unset": ("[[upstream]]\nname = 'cloud'\nurl = 'https://api.openai.com/v1'\n"
                           "api_key_env = 'NOT_SET_ANYWHERE'\n", ["'cloud'", "api_key_env", "NOT_SET_ANYWHERE"]),
    "key file missing": ("[[upstream]]\nname = 'cloud'\nurl = 'https://api.openai.com/v1'\n"
                         "api_key_file = '/nonexistent/key'\n", ["'cloud'", "api_key_file", "/nonexistent/key"]),
    "two keys": ("[[upstream]]\nname = 'cloud'\nurl = 'https://x.example/v1'\napi_key_env = 'A'\n"
                 "api_key_file = '/k'\n", ["'cloud'", "not both"]),
    "models not a list": ("[[upstream]]\nname = 'cloud'\nurl = 'https://x.example/v1'\nmodels = 'gpt'\n",
                          ["'cloud'", "'models'"]),
    "embedded with a URL": ("[[upstream]]\nname = 'mine'\nembedded = true\nurl = 'http://127.0.0.1:1/v1'\n",
                            ["'mine'", "takes no 'url'"]),
}


@pytest.mark.parametrize("text, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_upstreams_file_is_refused_with_the_file_table_and_key_named(tmp_path, text, expected):
    path = write_upstreams(tmp_path, text)
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"JARVIS_UPSTREAMS_FILE": path})
    message = str(raised.value)
    assert path in message
    for part in expected:
        assert part in message, message


def test_a_missing_upstreams_file_is_named(tmp_path):
    with pytest.raises(SettingsError, match="JARVIS_UPSTREAMS_FILE.*cannot be read"):
        Settings.from_env({"JARVIS_UPSTREAMS_FILE": str(tmp_path / "nope.toml")})


def test_the_file_and_the_one_url_shorthand_exclude_each_other(tmp_path):
    path = write_upstreams(tmp_path, "[[upstream]]\nname = 'a'\nurl = 'http://127.0.0.1:1/v1'\n")
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({"JARVIS_UPSTREAMS_FILE": path, "JARVIS_UPSTREAM_URL": "http://127.0.0.1:2/v1"})
    with pytest.raises(SettingsError, match="each upstream its key in the file"):
        Settings.from_env({"JARVIS_UPSTREAMS_FILE": path, "JARVIS_UPSTREAM_API_KEY": KEY_A})


def test_a_good_file_reads_keys_from_the_environment_and_files_and_keeps_them_out_of_repr(tmp_path):
    (tmp_path / "key").write_text(f"  {KEY_B}\n")
    path = write_upstreams(tmp_path, f"""
[[upstream]]
name = "gpu-box"
url = "http://10.0.0.5:11434/v1/"

[[upstream]]
name = "cloud"
url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-4.1-mini"]

[[upstream]]
name = "spare"
url = "http://10.0.0.6:8080/v1"
api_key_file = "{tmp_path / 'key'}"
""")
    settings = Settings.from_env({"JARVIS_UPSTREAMS_FILE": path, "OPENAI_API_KEY": KEY_A})
    assert [(u.name, u.url, u.api_key, u.models) for u in settings.upstreams] == [
        ("gpu-box", "http://10.0.0.5:11434/v1", None, None),
        ("cloud", "https://api.openai.com/v1", KEY_A, ("gpt-4.1-mini",)),
        ("spare", "http://10.0.0.6:8080/v1", KEY_B, None)]
    assert KEY_A not in repr(settings) and KEY_B not in repr(settings)


def test_the_one_url_shorthand_is_one_upstream_and_no_url_is_the_embedded_model():
    assert [(u.name, u.url) for u in Settings.from_env({"JARVIS_UPSTREAM_URL": "http://h:1/v1"}).upstreams] == \
        [("upstream", "http://h:1/v1")]
    assert [u.embedded for u in Settings.from_env({}).upstreams] == [True]


@pytest.mark.live
def test_gunicorn_refuses_to_start_with_a_bad_upstreams_file(tmp_path):
    path = write_upstreams(tmp_path, "[[upstream]]\nname = 'gpu'\nurl = 'http://10.0.0.5:11434/v1'\napi_key = 'x'\n")
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py",
                             "--bind", f"127.0.0.1:{free_port()}", "app:app"],
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin", "JARVIS_UPSTREAMS_FILE": path},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert path in result.stderr and "'gpu'" in result.stderr and "unknown key 'api_key'" in result.stderr
    assert "Traceback" not in result.stderr


# -- models and routing ---------------------------------------------------------------------------


@pytest.mark.live
def test_models_are_merged_once_each_and_every_model_goes_to_its_upstream(routed, pair):
    a, b = pair
    models = requests.get(routed.url + "/v1/models", timeout=10).json()["data"]
    assert [(model["id"], model["owned_by"]) for model in models] == [("alpha", "a"), ("shared", "a"), ("beta", "b")]
    for model in ("alpha", "beta", "shared"):
        assert content_of(chat(routed, model)) == "w0 w1 w2 "
    assert [exchange.body["model"] for exchange in a.chats] == ["alpha", "shared"]  # the shared one: the first
    assert [exchange.body["model"] for exchange in b.chats] == ["beta"]
    assert content_of(chat(routed, None)) == "w0 w1 w2 "  # no model named: the first upstream's first
    assert a.chats[-1].body["model"] == "alpha"
    unknown = requests.post(routed.url + "/v1/chat/completions", timeout=10,
                            json={"model": "gamma", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    lines = routed.end_lines(count=5)  # the four answers and the unknown model's 404
    assert sum("upstream=a " in line for line in lines) == 3 and sum("upstream=b " in line for line in lines) == 1
    routed.assert_log_clean()


@pytest.mark.live
def test_each_key_goes_to_its_own_upstream_only_and_never_to_the_log(routed, pair):
    a, b = pair
    requests.get(routed.url + "/v1/models", timeout=10)
    chat(routed, "alpha")
    chat(routed, "beta")
    assert {exchange.headers.get("authorization") for exchange in a.exchanges} == {f"Bearer {KEY_A}"}
    assert {exchange.headers.get("authorization") for exchange in b.exchanges} == {f"Bearer {KEY_B}"}
    assert KEY_A not in routed.log() + routed.stderr_path.read_text()
    assert KEY_B not in routed.log() + routed.stderr_path.read_text()


FAILURES = {
    "refused": None,
    "503": Scenario(status=503, error_body={"error": {"message": "loading", "type": "server_error",
                                                      "param": None, "code": None}}),
    "429": Scenario(status=429, error_body={"error": {"message": "slow down", "type": "rate_limit_error",
                                                      "param": None, "code": None}}),
    "silent before headers": Scenario(headers_delay=60),
}


def test_a_stopped_upstream_refuses_at_once_as_the_refused_case_needs():
    """The premise of the "refused" case below: FakeUpstream.stop() closed its listener under the thread
    blocked accepting on it, which Linux does not wake, so the port went on accepting, and a request made
    after the stop could be taken (seen once at half speed). Its open connections are cut too."""
    import socket

    upstream = FakeUpstream()
    kept = socket.create_connection(("127.0.0.1", upstream.port), timeout=5)
    wait_until(lambda: upstream.connections == 1, 5, lambda: "the connection was never accepted")
    upstream.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", upstream.port), timeout=5)
    assert kept.recv(1) == b""  # cut: the peer sees its end
    kept.close()


@pytest.mark.live
@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_the_next_upstream_answers_unseen_when_the_first_fails_before_its_first_byte(own_routed, own_pair,
                                                                                    failure):
    routed, (a, b) = own_routed, own_pair
    requests.get(routed.url + "/v1/models", timeout=10)  # both lists known
    if failure is None:
        a.stop()
    else:
        a.scenario = failure
    events = chat(routed, "shared")
    assert content_of(events) == "w0 w1 w2 " and events[-1][0] == "done"
    assert not any("error" in data for data in data_of(events))
    assert [exchange.body["model"] for exchange in b.chats] == ["shared"]
    if failure is not None and failure.headers_delay:
        a.wait_until_ended(a.chats[0], timeout=5)  # the abandoned request was closed, not left waiting
        assert a.chats[0].closed_at is not None
    log = routed.wait_for_log("trying b")
    trace_id = re.search(r"\[([0-9a-f]{32})\] upstream a failed before answering", log).group(1)
    assert f"[{trace_id}]" in "\n".join(routed.end_lines(count=1))  # the failed try is logged under the stream's id
    tried = len(a.chats)
    assert content_of(chat(routed, "shared")) == "w0 w1 w2 "  # the failed one rests: not tried again
    assert len(a.chats) == tried and len(b.chats) == 2
    health = requests.get(routed.url + "/healthz", timeout=5).json()
    assert [(upstream["name"], upstream["state"]) for upstream in health["upstreams"]] == \
        [("a", "cooling_down"), ("b", "up")]
    assert len(a.chats) == tried  # /healthz answers from memory
    routed.assert_log_clean()


@pytest.mark.live
def test_after_the_first_byte_there_is_no_failover(routed, pair):
    a, b = pair
    events = chat(routed, "shared", {"tokens": 10, "reset_after": 3, "interval": 0.05})
    assert content_of(events) == "w0 w1 w2 "
    assert data_of(events)[-1]["error"]["code"] == "upstream_disconnected" and events[-1][0] == "done"
    assert b.chats == []
    routed.assert_log_clean()


@pytest.mark.live
def test_a_dead_upstream_never_slows_the_model_list_beyond_its_timeout_and_is_left_out(start_jarvis, tmp_path):
    good, dead = FakeUpstream(("alpha",)), FakeUpstream(("gamma",))
    dead.scenario = Scenario(models="silent")  # accepts the connection, never answers
    try:
        path = write_upstreams(tmp_path, f'[[upstream]]\nname = "dead"\nurl = "{dead.url}"\n\n'
                                         f'[[upstream]]\nname = "good"\nurl = "{good.url}"\n')
        jarvis = start_jarvis({"JARVIS_UPSTREAMS_FILE": path, "JARVIS_UPSTREAM_MODELS_SECONDS": "1"})
        timings = []
        for _ in range(3):
            started = time.monotonic()
            models = requests.get(jarvis.url + "/v1/models", timeout=10).json()["data"]
            timings.append(time.monotonic() - started)
            assert [model["id"] for model in models] == ["alpha"]
        print(f"/v1/models with one dead upstream (timeout 1 s): first {timings[0] * 1000:.0f} ms, "
              f"then {timings[1] * 1000:.1f} ms, {timings[2] * 1000:.1f} ms")
        assert timings[0] < 1.0 + 1.0  # its timeout plus room for a busy machine; without it: forever
        assert jarvis.log().count("upstream dead left out of /v1/models") == 1
        health = requests.get(jarvis.url + "/healthz", timeout=5).json()
        assert [(upstream["name"], upstream["state"]) for upstream in health["upstreams"]] == \
            [("dead", "unreachable"), ("good", "up")]
        jarvis.assert_log_clean()
    finally:
        good.stop()
        dead.stop()


# -- the rest of the OpenAI surface --------------------------------------------------------------


@pytest.fixture
def sdk(routed):
    with openai.OpenAI(base_url=routed.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


@pytest.mark.live
def test_sdk_streams_a_text_completion_from_the_upstream_that_has_the_model(sdk, pair):
    a, b = pair
    stream = sdk.completions.create(model="beta", prompt="Once upon", stream=True,
                                    extra_body={"x_fault": {"tokens": 4}})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == "w0 w1 w2 w3 "
    whole = sdk.completions.create(model="alpha", prompt="Once upon", extra_body={"x_fault": {"tokens": 2}})
    assert whole.choices[0].text == "w0 w1 "
    assert [exchange.body["prompt"] for exchange in b.to("/completions")] == ["Once upon"]
    assert len(a.to("/completions")) == 1 and a.chats == [] and b.chats == []


@pytest.mark.live
def test_sdk_embeddings_with_failover(own_routed, own_pair):
    a, b = own_pair
    a.scenario = FAILURES["503"]
    with openai.OpenAI(base_url=own_routed.url + "/v1", api_key="unused", max_retries=0) as sdk:
        result = sdk.embeddings.create(model="shared", input=["one", "three"])
    assert [item.embedding[0] for item in result.data] == [3.0, 5.0]
    assert len(a.to("/embeddings")) == 1 and len(b.to("/embeddings")) == 1


@pytest.mark.live
def test_sdk_streams_a_responses_api_answer_with_its_event_names(sdk, pair, routed):
    a, b = pair
    with sdk.responses.create(model="beta", input="hi", stream=True,
                              extra_body={"x_fault": {"tokens": 3}}) as stream:
        events = list(stream)
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(event.delta for event in events if event.type == "response.output_text.delta") == "w0 w1 w2 "
    assert events[-1].response.output_text == "w0 w1 w2 "
    whole = sdk.responses.create(model="alpha", input="hi", extra_body={"x_fault": {"tokens": 2}})
    assert whole.output_text == "w0 w1 "
    raw = requests.post(routed.url + "/v1/responses", stream=True, timeout=10,
                        json={"model": "beta", "input": "hi", "stream": True, "x_fault": {"tokens": 1}}).content
    assert b"event: response.output_text.delta\ndata: {" in raw and b"[DONE]" not in raw
    routed.assert_log_clean()


@pytest.mark.live
def test_a_responses_stream_ends_with_the_upstreams_error_event_or_one_of_jarvis_that_the_sdk_raises(sdk):
    events = list(sdk.responses.create(model="beta", input="hi", stream=True,
                                       extra_body={"x_fault": {"tokens": 5, "error_event_after": 2}}))
    assert (events[-1].type, events[-1].message) == ("error", "the model crashed")  # relayed as it came
    with pytest.raises(openai.APIError, match="connection broke mid-stream"):
        list(sdk.responses.create(model="beta", input="hi", stream=True,
                                  extra_body={"x_fault": {"tokens": 5, "reset_after": 2, "interval": 0.05}}))


@pytest.mark.live
def test_input_for_the_new_endpoints_is_checked_before_any_upstream_is_asked(routed, pair):
    for path, body, param in [("/v1/completions", {"model": "alpha"}, "prompt"),
                              ("/v1/embeddings", {"model": "alpha", "input": 3}, "input"),
                              ("/v1/embeddings", {"model": "alpha", "input": "x", "stream": True}, "stream"),
                              ("/v1/responses", {"model": "alpha", "input": ""}, "input")]:
        response = requests.post(routed.url + path, json=body, timeout=10)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (path, response.text)
    assert all(exchange.path.endswith("/models") for exchange in pair[0].exchanges + pair[1].exchanges)


@pytest.mark.live
def test_a_client_leaving_while_waiting_for_embeddings_cancels_the_upstream_request(routed, pair):
    a, _ = pair
    client = RawClient(routed.port)
    client.send(chat_request({"model": "alpha", "input": "x", "x_fault": {"headers_delay": 30}},
                             path="/v1/embeddings"))
    exchange = wait_until(lambda: a.to("/embeddings") and a.to("/embeddings")[0], 10, lambda: a.exchanges)
    client.close_fin()
    a.wait_until_ended(exchange, timeout=5)
    client.close()
    assert exchange.closed_at is not None
    routed.wait_for_log("outcome=client_stop")


@pytest.mark.live
@pytest.mark.serial
def test_sdk_stop_on_a_streamed_completion_closes_the_upstream_within_100_ms(sdk, pair):
    a, _ = pair
    delays = []
    for run in range(10):
        stream = sdk.completions.create(model="alpha", prompt="count", stream=True,
                                        extra_body={"x_fault": {"tokens": 1000, "interval": 0.02}})
        next(stream), next(stream), next(stream)  # three chunks in, the client stops
        closed = time.monotonic()
        stream.close()
        exchange = a.wait_until_ended(a.to("/completions")[run], timeout=5)
        assert exchange.closed_at is not None and exchange.tokens_sent < 1000
        delays.append(exchange.closed_at - closed)
    print(f"completions stop: max {max(delays) * 1000:.1f} ms")
    assert max(delays) < 0.1, delays


# -- the router's bookkeeping, in process ------------------------------------------------------------


class _Lists:
    """Stands in for an upstream's backend: answers /models from a list, or fails."""

    def __init__(self, models):
        self.answer = models

    def models(self):
        if isinstance(self.answer, Exception):
            raise self.answer
        return {"object": "list", "data": [{"id": model} for model in self.answer]}

    def status(self):
        return None


def test_an_unreachable_upstream_is_logged_once_and_once_more_when_it_is_back(tmp_path, caplog):
    from jarvis.backends.router import RouterBackend

    path = write_upstreams(tmp_path, "[[upstream]]\nname = 'a'\nurl = 'http://127.0.0.1:1/v1'\n"
                                     "[[upstream]]\nname = 'b'\nurl = 'http://127.0.0.1:2/v1'\n")
    router = RouterBackend(Settings.from_env({"JARVIS_UPSTREAMS_FILE": path}))
    a, b = router.upstreams
    a.backend, b.backend = _Lists(ApiError(502, "refused", code="upstream_unreachable")), _Lists(["x", "y"])
    caplog.set_level("INFO", logger="jarvis")
    for _ in range(3):
        router._fetch_lists()
        assert [model["id"] for model in router.models()["data"]] == ["x", "y"]
    a.backend.answer = ["y", "z"]
    router._fetch_lists()
    assert [(model["id"], model["owned_by"]) for model in router.models()["data"]] == \
        [("y", "a"), ("z", "a"), ("x", "b")]
    messages = [record.getMessage() for record in caplog.records]
    assert sum("upstream a left out" in message for message in messages) == 1
    assert sum("upstream a answers /models again" in message for message in messages) == 1


# -- the page ---------------------------------------------------------------------------------------


@pytest.mark.live
@pytest.mark.browser
def test_the_page_groups_models_by_upstream_and_says_which_one_answered(routed, pair, context):
    from tests.browser import last_answer, open_page, send, wait_status

    a, b = pair
    page, problems = open_page(context, routed.url)
    page.wait_for_selector("#model optgroup", state="attached")
    groups = page.eval_on_selector_all("#model optgroup", "groups => groups.map(group => "
                                       "[group.label, [...group.querySelectorAll('option')].map(o => o.value)])")
    assert groups == [["a", ["alpha", "shared"]], ["b", ["beta"]]]
    page.select_option("#model", "beta")
    send(page, "hi")
    wait_status(page, "complete")
    assert [exchange.body["model"] for exchange in b.chats] == ["beta"] and a.chats == []
    assert last_answer(page).locator(".stats").inner_text().startswith("via b")
    page.reload()
    wait_status(page, "complete")
    assert last_answer(page).locator(".stats").inner_text().startswith("via b")  # kept with the message
    problems.assert_clean()


class _Refusing:
    """An upstream's backend that cannot be connected to, then can."""

    name = "upstream"

    def __init__(self):
        self.refusing = True

    def open(self, request):
        if self.refusing:
            raise ApiError(502, "Connection refused", type_="upstream_error", code="upstream_unreachable")
        return type("Generation", (), {"interruptible": True, "upstream": None, "finished": False})()

    def status(self):
        return None


def test_an_upstream_with_listed_models_that_refuses_connections_is_unreachable_until_one_works(tmp_path,
                                                                                               monkeypatch):
    from jarvis.backends import ChatRequest
    from jarvis.backends import router as router_module

    path = write_upstreams(tmp_path, "[[upstream]]\nname = 'fixed'\nurl = 'http://127.0.0.1:1/v1'\nmodels = ['m']\n")
    router = router_module.RouterBackend(Settings.from_env({"JARVIS_UPSTREAMS_FILE": path}))
    (fixed,) = router.upstreams
    fixed.backend = _Refusing()

    def ask():
        return router.open(ChatRequest(body={"model": "m"}, raw=b"{}", stream=True, trace_id="t"))

    with pytest.raises(ApiError):
        ask()
    assert router.status()["upstreams"][0]["state"] == "unreachable"
    from prometheus_client import REGISTRY  # down from its requests, though its model list is fixed
    assert REGISTRY.get_sample_value("jarvis_upstream_up", {"upstream": "fixed"}) == 0
    monkeypatch.setattr(router_module, "COOL_DOWN_SECONDS", 0.0)  # its rest over: still unreachable, not up
    assert router.status()["upstreams"][0]["state"] == "unreachable"
    assert [model["id"] for model in router.models()["data"]] == ["m"]  # still listed: requests are its news
    fixed.backend.refusing = False
    ask()
    assert router.status()["upstreams"][0]["state"] == "up"
