"""A conversation's title: its first words at once, then a few words from the same model after its first answer
(JARVIS_TITLES), never over a title the user gave it, never an answer or a run (in-process)."""

import pytest

from jarvis.errors import ApiError
from jarvis.runs import TITLE_PROMPT, clean_title
from tests.clients import sse
from tests.fake_backend import settle


def first_answer(client, backend, title_answer, *, content="How do lifetimes work in Rust?"):
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    backend.enqueue(["They bound how long a reference lives."])
    backend.enqueue(title_answer)
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content})
    sse(response.get_data())
    return conversation_id


def title_of(client, conversation_id):
    return client.get(f"/api/conversations/{conversation_id}").json["title"]


def test_after_the_first_answer_the_model_names_the_conversation(make_client, backend):
    client = make_client(titles=True)
    conversation_id = first_answer(client, backend, ['"Rust lifetimes explained."\nMore text'])
    assert settle(lambda: title_of(client, conversation_id) == "Rust lifetimes explained")
    asked = backend.requests[-1]
    assert asked.stream is False and asked.body["max_tokens"] == 16
    assert asked.body["messages"][0] == {"role": "system", "content": TITLE_PROMPT}
    assert "How do lifetimes work in Rust?" in asked.body["messages"][1]["content"]
    # Not an answer, not a run: the conversation holds the question and its answer only, and is not running.
    conversation = client.get(f"/api/conversations/{conversation_id}").json
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"] and not conversation["running"]
    # Only the first answer: the second asks for no title.
    backend.enqueue(["More."])
    sse(client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "and then?"}).get_data())
    settle(lambda: client.get(f"/api/conversations/{conversation_id}").json["messages"][-1]["status"] == "complete")
    assert len(backend.requests) == 3


def test_with_titles_off_or_a_failing_model_the_first_words_stay(make_client, backend):
    client = make_client(titles=False)
    conversation_id = first_answer(client, backend, ["Never asked"])
    settle(lambda: client.get(f"/api/conversations/{conversation_id}").json["messages"][-1]["status"] == "complete")
    assert title_of(client, conversation_id) == "How do lifetimes work in Rust?" and len(backend.requests) == 1
    backend.generations.clear()

    client = make_client(titles=True)
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    backend.enqueue(["An answer."])
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "first words here"})
    backend.fail_next(ApiError(502, "The upstream is unreachable", type_="upstream_error", code="upstream_unreachable"))
    sse(response.get_data())
    settle(lambda: client.get(f"/api/conversations/{conversation_id}").json["messages"][-1]["status"] == "complete")
    settle(lambda: not backend.failures)  # the title request was refused
    assert title_of(client, conversation_id) == "first words here"


def test_a_title_the_user_gave_meanwhile_is_never_replaced(make_client, backend):
    client = make_client(titles=True)
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    backend.enqueue(["An answer."])
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "first words"})
    client.put(f"/api/conversations/{conversation_id}", json={"title": "Mine"})
    backend.enqueue(["Model title"])
    sse(response.get_data())
    settle(lambda: len(backend.requests) == 2)
    settle(lambda: client.get(f"/api/conversations/{conversation_id}").json["messages"][-1]["status"] == "complete")
    assert title_of(client, conversation_id) == "Mine"


@pytest.mark.parametrize("raw, title", [
    ("Title: Rust lifetimes", "Rust lifetimes"),
    ("<think>hmm</think>\n\n**Weekend plans**", "Weekend plans"),
    ("  \n'Quotes'.", "Quotes"),
    ("x" * 200, "x" * 60),
    ("\u202eevil\u0000", "evil"),
    ("   ", None),
    (None, None),
])
def test_a_models_title_is_cleaned(raw, title):
    assert clean_title(raw) == title
