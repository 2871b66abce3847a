"""The page API: conversations kept by the server, replies saved as they stream (in-process)."""

import itertools
import json

import pytest

from jarvis.errors import ApiError, StreamError
from tests.clients import content_of, page_text, sse
from tests.fake_backend import STALL, Pause, settle, upstream_like_chunks


def create(client) -> str:
    response = client.post("/api/conversations", json={})
    assert response.status_code == 201
    return response.json["id"]


def send(client, conversation_id, **body):
    return client.post(f"/api/conversations/{conversation_id}/messages", json=body)


def reply(client, conversation_id, **body) -> list:
    """Send, read the whole streamed reply, return its events."""
    return sse(send(client, conversation_id, **body).get_data())


def read(client, conversation_id) -> dict:
    return client.get(f"/api/conversations/{conversation_id}").json


def test_list_create_read_rename_delete(client):
    conversation_id = create(client)
    assert client.get("/api/conversations").json["data"] == []  # listed once something is sent in it
    reply(client, conversation_id, content="hi")
    assert [c["id"] for c in client.get("/api/conversations").json["data"]] == [conversation_id]
    assert client.put(f"/api/conversations/{conversation_id}", json={"title": "Plans"}).json["title"] == "Plans"
    assert client.delete(f"/api/conversations/{conversation_id}").status_code == 204
    assert client.get(f"/api/conversations/{conversation_id}").status_code == 404
    assert client.get("/api/conversations").json["data"] == []


def test_unknown_conversation_is_404_everywhere(client):
    for method in ("GET", "PUT", "DELETE"):
        response = client.open("/api/conversations/nope", method=method, json={"title": "x"})
        assert response.status_code == 404 and response.json["error"]["code"] == "conversation_not_found"
    assert send(client, "nope", content="hi").status_code == 404


def test_reply_streams_in_openai_format_and_is_saved_complete(client, backend):
    conversation_id = create(client)
    events = reply(client, conversation_id, content="Hello there\nsecond line")
    assert content_of(events) == "w0 w1 w2 " and events[-1][0] == "done"
    conversation = read(client, conversation_id)
    assert conversation["title"] == "Hello there"
    assert [(m["role"], m["content"], m["status"]) for m in conversation["messages"]] == [
        ("user", "Hello there\nsecond line", "complete"), ("assistant", "w0 w1 w2 ", "complete")]
    assert backend.requests[0].body["messages"] == [{"role": "user", "content": "Hello there\nsecond line"}]


def test_reply_is_saved_while_it_streams(client, backend):
    backend.enqueue([*[item for index in range(40) for item in (f"t{index} ", Pause(0.05))]])
    conversation_id = create(client)
    response = send(client, conversation_id, content="hi")
    received = b"".join(itertools.islice(response.response, 12))
    saved = settle(lambda: read(client, conversation_id)["messages"][-1]["content"], describe=lambda: "a save")
    assert read(client, conversation_id)["messages"][-1]["status"] == "streaming"
    assert content_of(sse(received)).startswith(saved)
    response.close()


def test_upstream_error_is_saved_with_its_message(client, backend):
    backend.enqueue(["w0 ", "w1 ", StreamError("model_crash", "the model crashed", "server_error")])
    conversation_id = create(client)
    events = reply(client, conversation_id, content="hi")
    assert events[-1][0] == "done" and events[-2][1]["error"]["message"] == "the model crashed"
    assistant = read(client, conversation_id)["messages"][-1]
    assert (assistant["content"], assistant["status"], assistant["error"]) == ("w0 w1 ", "error", "the model crashed")


def test_regenerate_twice_keeps_three_versions_and_any_can_be_shown_again(client, backend):
    conversation_id = create(client)
    reply(client, conversation_id, content="first")  # the fake's default answer: w0 w1 w2
    backend.enqueue(["a0 ", "a1 "])
    reply(client, conversation_id, regenerate=True)
    backend.enqueue(["b0 "])
    reply(client, conversation_id, regenerate=True)
    conversation = read(client, conversation_id)
    user, answer = conversation["messages"]
    assert (user["content"], answer["content"]) == ("first", "b0 ")  # the newest version is shown
    assert len(answer["versions"]) == 3 and answer["id"] == answer["versions"][-1] == conversation["leaf_id"]
    assert user["versions"] == [user["id"]] and answer["parent_id"] == user["id"]
    # Each request asked for an answer to the same history; nothing of an earlier version reached it.
    assert all(request.body["messages"] == [{"role": "user", "content": "first"}] for request in backend.requests)
    texts = []
    for version in answer["versions"]:  # show each version in turn
        assert client.put(f"/api/conversations/{conversation_id}", json={"leaf": version}).status_code == 200
        shown = read(client, conversation_id)["messages"]
        assert shown[-1]["id"] == version and shown[-1]["versions"] == answer["versions"]
        texts.append(shown[-1]["content"])
    assert texts == ["w0 w1 w2 ", "a0 a1 ", "b0 "]
    every = read_all(client, conversation_id)
    assert [m["content"] for m in every] == ["first", "w0 w1 w2 ", "a0 a1 ", "b0 "]


def read_all(client, conversation_id) -> list[dict]:
    return client.get(f"/api/conversations/{conversation_id}?all=1").json["messages"]


def test_an_edit_is_a_new_version_answered_on_its_own_branch_and_the_old_branch_stays(client, backend):
    conversation_id = create(client)
    reply(client, conversation_id, content="one")
    reply(client, conversation_id, content="two")
    old_branch = read(client, conversation_id)["messages"]
    reply(client, conversation_id, content="TWO", edit=old_branch[2]["id"])
    messages = read(client, conversation_id)["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["one", "TWO"] and len(messages) == 4
    assert messages[2]["versions"] == [old_branch[2]["id"], messages[2]["id"]]
    assert [m["content"] for m in backend.requests[2].body["messages"]] == ["one", "w0 w1 w2 ", "TWO"]
    # Back to the first version of the second question: its answer comes with it, untouched.
    assert client.put(f"/api/conversations/{conversation_id}", json={"leaf": old_branch[2]["id"]}).status_code == 200
    assert [(m["id"], m["content"]) for m in read(client, conversation_id)["messages"]] == \
        [(m["id"], m["content"]) for m in old_branch]
    assert len(read_all(client, conversation_id)) == 6  # nothing was deleted
    # A message from elsewhere, or none, cannot be made current.
    other = create(client)
    reply(client, other, content="elsewhere")
    foreign = read(client, other)["messages"][0]["id"]
    for leaf in (foreign, 10**9):
        assert client.put(f"/api/conversations/{conversation_id}", json={"leaf": leaf}).status_code == 404
    assert client.put(f"/api/conversations/{conversation_id}", json={"leaf": "1"}).status_code == 400


def test_deleting_a_conversation_while_it_streams_stops_the_stream(client, backend):
    backend.enqueue(["w0 ", STALL])
    conversation_id = create(client)
    response = send(client, conversation_id, content="hi")
    assert client.delete(f"/api/conversations/{conversation_id}").status_code == 204
    events = sse(response.get_data())
    assert events[-1][0] == "done" and events[-2][1]["error"]["code"] == "conversation_deleted"
    assert backend.generations[0].closed


def test_a_second_send_while_answering_is_409(client, backend):
    backend.enqueue(["w0 ", STALL])
    conversation_id = create(client)
    answering = send(client, conversation_id, content="hi")
    busy = send(client, conversation_id, content="again")
    assert busy.status_code == 409 and busy.json["error"]["code"] == "conversation_busy"
    answering.close()


def test_bad_page_requests_are_4xx(client, jarvis_log):
    conversation_id = create(client)
    assert send(client, conversation_id, content="").status_code == 400
    assert send(client, conversation_id, regenerate=True).status_code == 400
    assert send(client, conversation_id, content="x", edit=12345).status_code == 400
    bad = client.post(f"/api/conversations/{conversation_id}/messages", data="x", content_type="text/plain")
    assert bad.status_code == 415
    jarvis_log.assert_clean()


# -- thinking models and stats -------------------------------------------------------

SHAPES = ["plain", "llamacpp", "vllm", "ollama", "deepseek", "openai", "think", "think_close"]


@pytest.mark.parametrize("shape", SHAPES)
def test_each_real_upstreams_thinking_is_saved_apart_from_the_answer(client, backend, shape):
    backend.enqueue(upstream_like_chunks(shape, reasoning_tokens=4, tokens=3, asked_usage=True))
    conversation_id = create(client)
    events = reply(client, conversation_id, content="think first")
    assert events[-1][0] == "done"
    assert page_text([value for kind, value in events if kind == "data"]) == ("r0 r1 r2 r3 ", "w0 w1 w2 ")
    assert "usage" not in {key for kind, value in events if kind == "data" for key in value}
    assistant = read(client, conversation_id)["messages"][-1]
    assert (assistant["reasoning"], assistant["content"], assistant["status"]) == \
        ("r0 r1 r2 r3 ", "w0 w1 w2 ", "complete")
    stats = assistant["stats"]
    assert (stats["completion_tokens"], stats["tokens_source"]) == (7, "usage")
    assert stats["ttft_ms"] is not None and stats["thinking_ms"] is not None
    in_band = [value["stats"] for kind, value in events if kind == "data" and "stats" in value]
    assert len(in_band) == 1 and in_band[0]["completion_tokens"] == 7  # sent just before [DONE]
    assert backend.requests[0].body["stream_options"] == {"include_usage": True}


def test_the_next_turn_sends_the_answer_but_not_its_reasoning(client, backend):
    backend.enqueue(upstream_like_chunks("deepseek", reasoning_tokens=3, tokens=2))
    conversation_id = create(client)
    reply(client, conversation_id, content="one")
    reply(client, conversation_id, content="two")
    assert backend.requests[1].body["messages"] == [{"role": "user", "content": "one"},
                                                    {"role": "assistant", "content": "w0 w1 "},
                                                    {"role": "user", "content": "two"}]


def test_stats_are_counted_from_the_stream_when_the_upstream_sends_no_usage(client, backend):
    backend.enqueue([item for index in range(6) for item in ([Pause(0.02)] if index else []) + [f"w{index} "]])
    conversation_id = create(client)
    reply(client, conversation_id, content="hi")
    stats = read(client, conversation_id)["messages"][-1]["stats"]
    assert (stats["completion_tokens"], stats["tokens_source"]) == (6, "stream")
    assert 10 < stats["tokens_per_second"] < 60  # 5 intervals of 20 ms: 50 tokens/s


def test_the_page_path_enforces_the_same_message_limits_as_v1(make_client, backend):
    client = make_client(max_messages=3, max_message_chars=50)
    conversation_id = create(client)
    reply(client, conversation_id, content="one")
    too_many = send(client, conversation_id, content="two")  # one, its answer, two: 3 are allowed...
    too_many.get_data()
    third = send(client, conversation_id, content="three")  # ...five are not
    assert third.status_code == 400 and third.json["error"]["code"] == "too_many_messages"
    too_long = send(client, create(client), content="x" * 51)
    assert too_long.status_code == 400 and too_long.json["error"]["code"] == "messages_too_long"
    assert len(read(client, conversation_id)["messages"]) == 4  # nothing was added by the refused sends


@pytest.mark.parametrize("refusal", [
    ApiError(502, "The upstream at http://gpu-box/v1 is unreachable", type_="upstream_error",
             code="upstream_unreachable"),
    ApiError(400, "This model's context is too small", type_="invalid_request_error", code="context_length_exceeded"),
    ApiError(500, "The upstream failed", type_="upstream_error", code="upstream_error"),
])
@pytest.mark.parametrize("kind", ["regenerate", "edit"])
def test_a_regenerate_or_an_edit_the_upstream_refuses_leaves_the_tree_as_it_was(client, backend, refusal, kind):
    conversation_id = create(client)
    reply(client, conversation_id, content="first")
    reply(client, conversation_id, content="second")
    before, tree_before = read(client, conversation_id), read_all(client, conversation_id)
    backend.fail_next(refusal)
    body = {"regenerate": True} if kind == "regenerate" else {"content": "SECOND", "edit": before["messages"][2]["id"]}
    refused = send(client, conversation_id, **body)
    assert refused.status_code == refusal.status
    settle(lambda: not read(client, conversation_id)["running"])
    after = read(client, conversation_id)
    assert after["messages"] == before["messages"] and after["leaf_id"] == before["leaf_id"]
    assert read_all(client, conversation_id) == tree_before


def test_an_edit_and_a_regenerate_that_are_invalid_change_nothing(client, backend):
    conversation_id = create(client)
    reply(client, conversation_id, content="one")
    reply(client, conversation_id, content="two")
    before = read(client, conversation_id)["messages"]
    assert send(client, conversation_id, content="", edit=before[2]["id"]).status_code == 400
    assert send(client, conversation_id, content="x", edit=before[1]["id"]).status_code == 400  # not a user message
    assert read(client, conversation_id)["messages"] == before


def test_continue_after_stop_appends_to_the_same_answer_and_asks_with_its_text_as_the_prefix(client, backend):
    conversation_id = create(client)
    backend.enqueue(["w0 ", "w1 ", STALL])
    response = send(client, conversation_id, content="tell me")
    answer_id = int(response.headers["X-Message-Id"])
    next(chunk for chunk in response.response if b"w1" in chunk)
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    response.get_data()
    settle(lambda: read(client, conversation_id)["messages"][-1]["status"] == "stopped")
    backend.enqueue(["w2 ", "w3"])
    # The page stopped reading at Stop: it shows "w0 " and gets what it lacks of the saved text first.
    continued = send(client, conversation_id, **{"continue": answer_id, "after": 3})
    assert continued.status_code == 200 and int(continued.headers["X-Message-Id"]) == answer_id
    events = sse(continued.get_data())
    assert content_of(events) == "w1 w2 w3"
    assert backend.requests[-1].body["messages"] == [{"role": "user", "content": "tell me"},
                                                     {"role": "assistant", "content": "w0 w1 "}]
    saved = settle(lambda: (m := read(client, conversation_id)["messages"])[-1]["status"] == "complete" and m)
    assert [(m["id"], m["content"]) for m in saved] == [(saved[0]["id"], "tell me"), (answer_id, "w0 w1 w2 w3")]
    # A complete answer cannot be continued, nor one that something follows, nor a question.
    for target in (answer_id, saved[0]["id"], "x"):
        refused = send(client, conversation_id, **{"continue": target})
        assert refused.status_code == 400 and refused.json["error"]["param"] == "continue"


def test_continue_after_max_tokens_and_after_an_error_with_text(client, backend):
    conversation_id = create(client)
    backend.enqueue([{"choices": [{"index": 0, "delta": {"content": "cut "}, "finish_reason": "length"}]}])
    reply(client, conversation_id, content="long please")
    answer = settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] == "complete" and m)
    assert answer["stats"]["finish_reason"] == "length"
    backend.enqueue(["short"])
    assert content_of(reply(client, conversation_id, **{"continue": answer["id"]})) == "short"
    assert settle(lambda: read(client, conversation_id)["messages"][-1]["content"] == "cut short")
    # An error after some text: continued, and the error is gone with the new end.
    conversation_id = create(client)
    backend.enqueue(["half", StreamError("model_crash", "the model crashed", "server_error")])
    reply(client, conversation_id, content="go")
    failed = settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] == "error" and m)
    backend.enqueue([" whole"])
    reply(client, conversation_id, **{"continue": failed["id"]})
    done = settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] == "complete" and m)
    assert (done["id"], done["content"], done["error"]) == (failed["id"], "half whole", None)


def _stopped_answer(client, backend, content="tell me") -> tuple[str, dict]:
    """A conversation whose answer ("w0 w1 ") was stopped: its id and the answer as saved."""
    conversation_id = create(client)
    backend.enqueue(["w0 ", "w1 ", STALL])
    response = send(client, conversation_id, content=content)
    next(chunk for chunk in response.response if b"w1" in chunk)
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    response.get_data()
    return conversation_id, settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] ==
                                   "stopped" and m)


@pytest.mark.parametrize("server", ["no", "refuses_fields"])
def test_a_server_that_cannot_continue_is_found_out_before_anything_changes_and_asked_once(client, backend,
                                                                                         server):
    # llama-cpp-python's server opens a new turn after a final assistant message (it answers afresh); so does
    # OpenAI's API, which also refuses vLLM's continue_final_message with a 400.
    backend.continues = server
    conversation_id, before = _stopped_answer(client, backend)
    answers = len(backend.generations)
    refused = send(client, conversation_id, **{"continue": before["id"]})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "cannot_continue"
    assert "cannot continue" in refused.json["error"]["message"]
    assert len(backend.probes) == 2  # asked plainly, then with vLLM's fields
    assert backend.probes[1].body["continue_final_message"] is True
    assert backend.probes[1].body["add_generation_prompt"] is False
    assert len(backend.generations) == answers  # the model was never asked to continue the answer itself
    after = read(client, conversation_id)
    assert (after["messages"][-1], after["running"]) == (before, False)
    # Remembered: the next try is refused without asking again, and a new question still works.
    assert send(client, conversation_id, **{"continue": before["id"]}).json["error"]["code"] == "cannot_continue"
    assert len(backend.probes) == 2
    assert content_of(reply(client, conversation_id, content="again")) == "w0 w1 w2 "


@pytest.mark.parametrize("server, fields", [("yes", {}), ("with_fields", {"continue_final_message": True,
                                                                           "add_generation_prompt": False})])
def test_a_continuation_asks_the_way_its_server_continues(client, backend, server, fields):
    backend.continues = server
    conversation_id, before = _stopped_answer(client, backend)
    backend.enqueue(["w2"])
    assert content_of(reply(client, conversation_id, **{"continue": before["id"]})) == "w2"
    request = backend.requests[-1].body
    assert request["messages"][-1] == {"role": "assistant", "content": "w0 w1 "}
    assert {name: request[name] for name in ("continue_final_message", "add_generation_prompt")
            if name in request} == fields
    assert settle(lambda: read(client, conversation_id)["messages"][-1]["content"] == "w0 w1 w2")
    # The verdict is kept: the next continuation of this model asks no probe.
    probes = len(backend.probes)
    conversation_id, before = _stopped_answer(client, backend)
    backend.enqueue(["w2"])
    reply(client, conversation_id, **{"continue": before["id"]})
    assert len(backend.probes) == probes


@pytest.mark.parametrize("refusal", [
    ApiError(502, "The upstream at http://gpu-box/v1 is unreachable", type_="upstream_error",
             code="upstream_unreachable"),
    ApiError(500, "The upstream failed", type_="upstream_error", code="upstream_error"),
])
def test_a_continuation_the_upstream_refuses_leaves_the_answer_as_it_had_ended(client, backend, refusal):
    conversation_id, before = _stopped_answer(client, backend)
    backend.fail_next(refusal)
    refused = send(client, conversation_id, **{"continue": before["id"]})
    assert refused.status_code == refusal.status
    settle(lambda: not read(client, conversation_id)["running"])
    after = read(client, conversation_id)["messages"][-1]  # stopped, its text, note and stats as they were
    changed = {name for name in before if after[name] != before[name]}
    assert changed <= {"trace_id", "updated_at"}, (before, after)  # (the trace id names the refused attempt)
    backend.enqueue(["w2"])  # and it can still be continued
    assert content_of(reply(client, conversation_id, **{"continue": before["id"]})) == "w2"


@pytest.mark.parametrize("again, ends", [
    (["w0 ", "w1 ", "w2 ", "w3 ", "w4 ", "w5 ", "w6 ", STALL], "mid-stream"),  # held back, then cancelled
    (["w0 w1"], "at its end"),  # too short to hold back for long: judged at the end
])
def test_a_server_that_answers_afresh_instead_of_continuing_leaves_the_answer_as_it_was(client, backend, again,
                                                                                        ends, jarvis_log):
    conversation_id = create(client)
    backend.enqueue(["w0 ", "w1 ", "w2 ", "w3 ", "w4 ", "w5 ", STALL])
    response = send(client, conversation_id, content="count")
    answer_id = int(response.headers["X-Message-Id"])
    next(chunk for chunk in response.response if b"w5" in chunk)
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    response.get_data()
    before = settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] == "stopped" and m)
    backend.enqueue(again)
    events = sse(send(client, conversation_id, **{"continue": answer_id}).get_data())
    assert content_of(events) == ""  # nothing of the fresh answer reached the page
    told = [e[1] for e in events if e[0] == "data" and ("error" in e[1] or e[1].get("note"))]
    assert told and "cannot continue" in json.dumps(told[-1]), events
    after = settle(lambda: (m := read(client, conversation_id)["messages"][-1])["status"] != "streaming" and m)
    assert (after["id"], after["content"], after["status"]) == (answer_id, before["content"], "stopped")
    assert "cannot continue" in after["error"]
    # One record of how it ended, the same in the log as in the store: an upstream error, not a completion.
    endings = [m for m in jarvis_log.messages() if m.startswith("stream end outcome=")]
    assert endings[-1].startswith("stream end outcome=upstream_error") and "error=cannot_continue" in endings[-1]
    if ends == "mid-stream":
        assert backend.generations[-1].closed  # cancelled at its source
