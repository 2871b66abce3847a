"""The page API: conversations kept by the server, replies saved as they stream."""

import pytest
import requests

from tests.clients import page_text
from tests.live import content_of, sse_events, wait_until

pytestmark = pytest.mark.live


def create(jarvis) -> str:
    response = requests.post(jarvis.url + "/api/conversations", json={})
    assert response.status_code == 201
    return response.json()["id"]


def send(jarvis, conversation_id, **body):
    return requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", json=body, stream=True,
                         timeout=30)


def read(jarvis, conversation_id):
    return requests.get(f"{jarvis.url}/api/conversations/{conversation_id}").json()


def wait_for_status(jarvis, conversation_id, status) -> dict:
    """The last message, once the server has saved it with `status` (a bounded poll)."""
    def saved():
        last = read(jarvis, conversation_id)["messages"][-1]
        return last if last["status"] == status else None

    return wait_until(saved, 5, lambda: f"the answer never became {status}")


def test_list_create_read_rename_delete(jarvis):
    conversation_id = create(jarvis)
    assert [c["id"] for c in requests.get(jarvis.url + "/api/conversations").json()["data"]] == [conversation_id]
    renamed = requests.put(f"{jarvis.url}/api/conversations/{conversation_id}", json={"title": "Plans"})
    assert renamed.json()["title"] == "Plans"
    assert requests.delete(f"{jarvis.url}/api/conversations/{conversation_id}").status_code == 204
    assert requests.get(f"{jarvis.url}/api/conversations/{conversation_id}").status_code == 404
    assert requests.get(jarvis.url + "/api/conversations").json()["data"] == []


def test_unknown_conversation_is_404_everywhere(jarvis):
    for method in ("get", "put", "delete"):
        response = requests.request(method, f"{jarvis.url}/api/conversations/nope", json={"title": "x"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "conversation_not_found"
    assert send(jarvis, "nope", content="hi").status_code == 404


def test_reply_streams_in_openai_format_and_is_saved_complete(jarvis, upstream):
    conversation_id = create(jarvis)
    response = send(jarvis, conversation_id, content="Hello there\nsecond line")
    events = list(sse_events(response))
    assert content_of(events) == "w0 w1 w2 w3 w4 " and events[-1][0] == "done"
    conversation = read(jarvis, conversation_id)
    assert conversation["title"] == "Hello there"
    assert [(m["role"], m["content"], m["status"]) for m in conversation["messages"]] == [
        ("user", "Hello there\nsecond line", "complete"), ("assistant", "w0 w1 w2 w3 w4 ", "complete")]
    assert upstream.chats[0].body["messages"] == [{"role": "user", "content": "Hello there\nsecond line"}]


def test_reply_is_saved_while_it_streams(jarvis, upstream):
    upstream.scenario.tokens, upstream.scenario.interval = 40, 0.05
    conversation_id = create(jarvis)
    events = sse_events(send(jarvis, conversation_id, content="hi"))
    received = [event for event, _ in zip(events, range(25), strict=False)]
    assert content_of(received)
    wait_until(lambda: read(jarvis, conversation_id)["messages"][-1]["content"], 2, lambda: "never saved")
    assistant = read(jarvis, conversation_id)["messages"][-1]
    assert assistant["status"] == "streaming" and content_of(received).startswith(assistant["content"])


def test_client_leaving_saves_the_partial_answer_as_stopped(jarvis, upstream):
    upstream.scenario.tokens, upstream.scenario.interval = 200, 0.02
    conversation_id = create(jarvis)
    response = send(jarvis, conversation_id, content="hi")
    events = sse_events(response)
    received = [next(events) for _ in range(6)]
    response.close()
    upstream.wait_until_ended(upstream.chats[0])
    jarvis.wait_for_log("outcome=client_stop")
    assistant = wait_for_status(jarvis, conversation_id, "stopped")
    assert assistant["content"].startswith(content_of(received))
    assert upstream.chats[0].closed_at is not None


def test_upstream_error_is_saved_with_its_message(jarvis, upstream):
    upstream.scenario.error_event_after = 2
    conversation_id = create(jarvis)
    list(sse_events(send(jarvis, conversation_id, content="hi")))
    assistant = wait_for_status(jarvis, conversation_id, "error")
    assert (assistant["content"], assistant["error"]) == ("w0 w1 ", "the model crashed")


def test_regenerate_replaces_the_last_answer(jarvis, upstream):
    conversation_id = create(jarvis)
    list(sse_events(send(jarvis, conversation_id, content="first")))
    upstream.scenario.tokens = 2
    list(sse_events(send(jarvis, conversation_id, regenerate=True)))
    messages = read(jarvis, conversation_id)["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [("user", "first"), ("assistant", "w0 w1 ")]
    assert upstream.chats[1].body["messages"] == [{"role": "user", "content": "first"}]


def test_edit_and_resend_drops_what_followed(jarvis, upstream):
    conversation_id = create(jarvis)
    list(sse_events(send(jarvis, conversation_id, content="one")))
    list(sse_events(send(jarvis, conversation_id, content="two")))
    second_user = read(jarvis, conversation_id)["messages"][2]["id"]
    list(sse_events(send(jarvis, conversation_id, content="TWO", edit=second_user)))
    messages = read(jarvis, conversation_id)["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "TWO"]
    assert len(messages) == 4
    assert [m["content"] for m in upstream.chats[2].body["messages"]] == ["one", "w0 w1 w2 w3 w4 ", "TWO"]


def test_deleting_a_conversation_while_it_streams_stops_the_stream(jarvis, upstream):
    upstream.scenario.tokens, upstream.scenario.interval = 500, 0.02
    conversation_id = create(jarvis)
    events = sse_events(send(jarvis, conversation_id, content="hi"))
    next(event for event in events if event[0] == "data")
    assert requests.delete(f"{jarvis.url}/api/conversations/{conversation_id}").status_code == 204
    rest = list(events)
    assert rest[-1][0] == "done" and rest[-2][1]["error"]["code"] == "conversation_deleted"
    assert upstream.wait_until_ended(upstream.chats[0]).closed_at is not None


def test_bad_page_requests_are_4xx(jarvis):
    conversation_id = create(jarvis)
    assert send(jarvis, conversation_id, content="").status_code == 400
    assert send(jarvis, conversation_id, regenerate=True).status_code == 400
    assert send(jarvis, conversation_id, content="x", edit=12345).status_code == 400
    bad = requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", data="x",
                        headers={"Content-Type": "text/plain"})
    assert bad.status_code == 415
    assert "[ERROR]" not in jarvis.log()


# -- thinking models and stats -------------------------------------------------------

EXPECTED_TOKEN_SOURCE = {"plain": "usage", "llamacpp": "usage", "vllm": "usage", "ollama": "usage",
                         "deepseek": "usage", "openai": "usage", "think": "usage", "think_close": "usage"}


@pytest.mark.parametrize("shape", list(EXPECTED_TOKEN_SOURCE))
def test_each_real_upstreams_thinking_is_saved_apart_from_the_answer(jarvis, upstream, shape):
    upstream.scenario.shape, upstream.scenario.reasoning_tokens, upstream.scenario.tokens = shape, 4, 3
    conversation_id = create(jarvis)
    events = list(sse_events(send(jarvis, conversation_id, content="think first")))
    assert events[-1][0] == "done"
    assert page_text([value for kind, value, _ in events if kind == "data"]) == ("r0 r1 r2 r3 ", "w0 w1 w2 ")
    assert "usage" not in {key for kind, value, _ in events if kind == "data" for key in value}
    assistant = wait_for_status(jarvis, conversation_id, "complete")
    assert (assistant["reasoning"], assistant["content"]) == ("r0 r1 r2 r3 ", "w0 w1 w2 ")
    stats = assistant["stats"]
    assert (stats["completion_tokens"], stats["tokens_source"]) == (7, EXPECTED_TOKEN_SOURCE[shape])
    assert stats["ttft_ms"] is not None and stats["thinking_ms"] is not None
    in_band = [value["stats"] for kind, value, _ in events if kind == "data" and "stats" in value]
    assert len(in_band) == 1 and in_band[0]["completion_tokens"] == 7  # sent just before [DONE]
    assert upstream.chats[0].body["stream_options"] == {"include_usage": True}


def test_the_next_turn_sends_the_answer_but_not_its_reasoning(jarvis, upstream):
    upstream.scenario.reasoning_tokens, upstream.scenario.tokens = 3, 2
    conversation_id = create(jarvis)
    list(sse_events(send(jarvis, conversation_id, content="one")))
    list(sse_events(send(jarvis, conversation_id, content="two")))
    assert upstream.chats[1].body["messages"] == [{"role": "user", "content": "one"},
                                                  {"role": "assistant", "content": "w0 w1 "},
                                                  {"role": "user", "content": "two"}]


def test_stats_are_counted_from_the_stream_when_the_upstream_sends_no_usage(jarvis, upstream):
    upstream.scenario.tokens, upstream.scenario.interval = 6, 0.02
    upstream.scenario.ignores_usage = True  # like llama-cpp-python's server
    conversation_id = create(jarvis)
    list(sse_events(send(jarvis, conversation_id, content="hi")))
    stats = wait_for_status(jarvis, conversation_id, "complete")["stats"]
    assert (stats["completion_tokens"], stats["tokens_source"]) == (6, "stream")
    assert 10 < stats["tokens_per_second"] < 60  # 5 intervals of 20 ms: 50 tokens/s
