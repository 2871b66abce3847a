"""Per-conversation settings, search, export and import, through the page's API in process (both stores
where the store does the work)."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from jarvis.exchange import FORMAT
from tests.clients import sse
from tests.fake_backend import settle

OPEN_WEBUI = [{
    "id": "9b1c", "user_id": "u1", "title": "Rust lifetimes", "created_at": 1718000000, "updated_at": 1718000100,
    "chat": {"id": "", "title": "Rust lifetimes", "models": ["llama3"], "params": {"system": "Be brief."},
             "history": {"currentId": "m3", "messages": {
                 "m1": {"id": "m1", "parentId": None, "childrenIds": ["m2", "m2b"], "role": "user",
                        "content": "What is a lifetime?", "timestamp": 1718000000},
                 "m2b": {"id": "m2b", "parentId": "m1", "childrenIds": [], "role": "assistant",
                         "content": "An abandoned branch", "timestamp": 1718000001},
                 "m2": {"id": "m2", "parentId": "m1", "childrenIds": ["m3"], "role": "assistant",
                        "content": "A scope for which a reference is valid.", "timestamp": 1718000002,
                        "model": "llama3"},
                 "m3": {"id": "m3", "parentId": "m2", "childrenIds": [], "role": "user",
                        "content": "Thanks", "timestamp": 1718000003}}},
             "messages": []}}]


@pytest.fixture(params=["sqlite", "postgresql"])
def page(request, make_app, tmp_path):
    """The page's API on either store."""
    if request.param == "sqlite":
        yield make_app().test_client()
        return
    from jarvis import create_app
    from jarvis.settings import Settings
    from jarvis.stores.postgres import PostgresStore

    store = PostgresStore(request.getfixturevalue("database_url"))
    app = create_app(Settings(data_dir=str(tmp_path / "pg"), titles=False), backend=request.getfixturevalue("backend"),
                     store=store)
    yield app.test_client()
    store.close()


def answer(client, conversation_id: str, content: str | None):
    """Send (None: regenerate), read the whole answer, and wait (gevent's hub runs the queued last save)
    until it is saved."""
    response = client.post(f"/api/conversations/{conversation_id}/messages",
                           json={"content": content} if content is not None else {"regenerate": True})
    assert response.status_code == 200, response.get_data(as_text=True)
    events = sse(response.get_data())
    settle(lambda: not any(message["status"] == "streaming" for message in
                           client.get(f"/api/conversations/{conversation_id}").json["messages"]),
           10, lambda: "the answer's last save never landed")
    return events


def test_a_conversation_has_its_own_settings_sent_with_every_request(make_client, backend):
    client = make_client(system_prompt="You are terse.", temperature=0.3)
    conversation = client.post("/api/conversations", json={}).json
    assert conversation["settings"] == {"system_prompt": "You are terse.", "temperature": 0.3, "top_p": None,
                                        "max_tokens": None}
    answer(client, conversation["id"], "hi")
    first = backend.requests[-1].body
    assert first["messages"][0] == {"role": "system", "content": "You are terse."}
    assert first["temperature"] == 0.3 and "top_p" not in first and "max_tokens" not in first
    changed = client.put(f"/api/conversations/{conversation['id']}", json={"settings": {
        "system_prompt": "Answer in French.", "temperature": 1.2, "top_p": 0.9, "max_tokens": 64}})
    assert changed.status_code == 200 and changed.json["settings"]["top_p"] == 0.9
    answer(client, conversation["id"], "again")
    second = backend.requests[-1].body
    assert second["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert (second["temperature"], second["top_p"], second["max_tokens"]) == (1.2, 0.9, 64)
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]


@pytest.mark.parametrize("settings, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": -0.1}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"temperature": True}, "temperature"), ({"system_prompt": 5},
                                                                                   "system_prompt"),
    ({"seed": 1}, "settings"), ("warm", "settings")])
def test_bad_settings_are_refused_and_change_nothing(client, settings, param):
    conversation = client.post("/api/conversations", json={}).json
    response = client.put(f"/api/conversations/{conversation['id']}", json={"settings": settings})
    assert response.status_code == 400 and response.json["error"]["param"] == param
    assert client.get(f"/api/conversations/{conversation['id']}").json["settings"] == conversation["settings"]


def test_search_finds_words_in_titles_and_ended_messages(page):
    ids = []
    for number in range(3):
        conversation = page.post("/api/conversations", json={"title": f"Chat {number}"}).json
        ids.append(conversation["id"])
        answer(page, conversation["id"], f"first question {number}")
        answer(page, conversation["id"], "second question about zebras" if number == 1 else "something else")
    results = page.get("/api/conversations/search?q=zebra").json["data"]
    assert [(r["conversation_id"], r["message_id"] is not None) for r in results] == [(ids[1], True)]
    assert "\ue000zebras\ue001" in results[0]["snippet"]
    conversation = page.get(f"/api/conversations/{ids[1]}").json
    found = next(m for m in conversation["messages"] if m["id"] == results[0]["message_id"])
    assert found["content"] == "second question about zebras"  # the 3rd message: opened there
    assert page.get("/api/conversations/search?q=chat 2").json["data"][0] == {
        "conversation_id": ids[2], "title": "Chat 2", "message_id": None, "snippet": "\ue000Chat\ue001 \ue0002\ue001"}
    assert page.get('/api/conversations/search?q=" OR * NEAR(').json["data"] == []  # no query syntax gets in
    # A conversation whose title and messages all match is one result: its best message.
    titled = page.post("/api/conversations", json={"title": "Giraffes and more"}).json["id"]
    answer(page, titled, "giraffes are tall")
    answer(page, titled, "how tall are giraffes")
    results = page.get("/api/conversations/search?q=giraffes").json["data"]
    assert [r["conversation_id"] for r in results] == [titled] and results[0]["message_id"] is not None
    assert page.get("/api/conversations/search?q=").json["data"] == []


def test_export_then_import_gives_the_same_conversation(page, backend):
    from jarvis.errors import StreamError
    from tests.fake_backend import STALL  # noqa: F401 (the fake's vocabulary)

    conversation = page.post("/api/conversations", json={"title": "Round trip"}).json
    page.put(f"/api/conversations/{conversation['id']}", json={"settings": {"system_prompt": "Be kind.",
                                                                            "temperature": 0.5}})
    backend.enqueue([{"choices": [{"index": 0, "delta": {"reasoning_content": "Let me think."}}]}, "Four."])
    answer(page, conversation["id"], "2+2?")
    backend.enqueue(["Also four."])
    answer(page, conversation["id"], None)  # a second version of the first answer
    first = page.get(f"/api/conversations/{conversation['id']}?all=1").json["messages"]
    page.put(f"/api/conversations/{conversation['id']}", json={"leaf": first[1]["id"]})  # back to the first
    backend.enqueue(["partial", StreamError("model_crash", "the model crashed")])
    answer(page, conversation["id"], "and then?")
    exported = page.get(f"/api/conversations/{conversation['id']}/export").get_json()
    assert exported["format"] == FORMAT and exported["version"] == 1
    imported = page.post("/api/conversations/import", json=exported)
    assert imported.status_code == 201
    new_id = imported.json["data"][0]
    assert new_id != conversation["id"]
    again = page.get(f"/api/conversations/{new_id}/export").get_json()
    assert tree_of(again["conversations"][0]) == tree_of(exported["conversations"][0])  # ids are the store's own
    assert [m["content"] for m in page.get(f"/api/conversations/{new_id}").json["messages"]] == \
        ["2+2?", "Four.", "and then?", "partial"]  # the branch that was shown
    statuses = [m["status"] for m in again["conversations"][0]["messages"]]
    assert statuses == ["complete", "complete", "complete", "complete", "error"]
    assert again["conversations"][0]["messages"][1]["reasoning"] == "Let me think."
    markdown = page.get(f"/api/conversations/{new_id}/export?format=markdown").get_data(as_text=True)
    assert markdown.startswith("# Round trip\n") and "## Assistant" in markdown and "Let me think." in markdown
    assert "*(error — the model crashed)*" in markdown


def tree_of(conversation: dict) -> tuple:
    """A conversation with its store's ids replaced by positions: what an export and an import keep."""
    position = {message["id"]: index for index, message in enumerate(conversation["messages"])}
    messages = [{**message, "id": position[message["id"]],
                 "parent_id": None if message["parent_id"] is None else position[message["parent_id"]]}
                for message in conversation["messages"]]
    return {**conversation, "leaf_id": position[conversation["leaf_id"]], "messages": messages}


def test_an_open_webui_export_imports_its_whole_tree_showing_its_current_thread(page):
    response = page.post("/api/conversations/import", json=OPEN_WEBUI)
    assert response.status_code == 201, response.get_data(as_text=True)
    conversation = page.get(f"/api/conversations/{response.json['data'][0]}").json
    assert conversation["title"] == "Rust lifetimes"
    assert [(m["role"], m["content"]) for m in conversation["messages"]] == [
        ("user", "What is a lifetime?"), ("assistant", "A scope for which a reference is valid."),
        ("user", "Thanks")]
    assert len(conversation["messages"][1]["versions"]) == 2  # the other branch came too
    every = page.get(f"/api/conversations/{response.json['data'][0]}?all=1").json["messages"]
    assert sorted(m["content"] for m in every) == sorted(["What is a lifetime?", "An abandoned branch",
                                                          "A scope for which a reference is valid.", "Thanks"])
    page.put(f"/api/conversations/{conversation['id']}", json={"leaf": conversation["messages"][1]["versions"][0]})
    shown = page.get(f"/api/conversations/{conversation['id']}").json["messages"]
    assert [m["content"] for m in shown] == ["What is a lifetime?", "An abandoned branch"]
    assert conversation["settings"]["system_prompt"] == "Be brief."
    assert conversation["messages"][1]["model"] == "llama3"


def good_file() -> dict:
    return {"format": FORMAT, "version": 1, "conversations": [
        {"title": "ok", "messages": [{"role": "user", "content": "hi"}]},
        {"title": "second", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]}


def broken(path: str, value):
    document = good_file()
    target = document
    keys = path.split(".")
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    target[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return document


@pytest.mark.parametrize("document, where", [
    (broken("conversations.1.messages.1.role", "system"), "conversations[1].messages[1].role"),
    (broken("conversations.1.messages.0.content", 42), "conversations[1].messages[0].content"),
    (broken("conversations.1.title", ""), "conversations[1].title"),
    (broken("conversations.1.messages.1.status", "streaming"), "conversations[1].messages[1].status"),
    (broken("conversations.1.messages.1.created_at", "yesterday"), "conversations[1].messages[1].created_at"),
    (broken("conversations.1.settings", {"temperature": 9}), "conversations[1].settings"),
    (broken("version", 2), "version"),
    ({"hello": "world"}, None),
    ([{"chat": {"history": {"currentId": "a", "messages": {"a": {"parentId": "a", "role": "user",
                                                                 "content": "loop"}}}}}], "[0].chat.history"),
])
def test_a_bad_file_is_refused_naming_the_place_and_nothing_is_imported(page, document, where):
    before = page.get("/api/conversations").json["data"]
    response = page.post("/api/conversations/import", json=document)
    assert response.status_code == 400
    error = response.json["error"]
    if where is None:
        assert error["code"] == "unknown_import_format"
    else:
        assert error["code"] == "invalid_import" and where in error["message"], error
    assert page.get("/api/conversations").json["data"] == before  # the good first conversation is not there


def test_import_never_trusts_ids_and_keeps_html_as_text(client):
    document = good_file()
    document["conversations"][0]["id"] = "chosen-id"
    document["conversations"][0]["messages"][0].update(id=1, conversation_id="someone-else")
    document["conversations"][0]["title"] = "<img src=x onerror=alert(1)>"
    response = client.post("/api/conversations/import", json=document)
    new_id = response.json["data"][0]
    assert new_id != "chosen-id"
    assert client.get(f"/api/conversations/{new_id}").json["title"] == "<img src=x onerror=alert(1)>"


def test_a_file_over_the_import_limit_is_413(make_client):
    client = make_client(max_import_bytes=2048)
    response = client.post("/api/conversations/import", data=json.dumps(good_file()) + " " * 4096,
                           content_type="application/json")
    assert response.status_code == 413


def test_a_send_the_instant_the_last_answer_ended_is_not_refused_as_busy(page):
    """The last save of an answer is queued when [DONE] goes out; the next send waits for it, not 409."""
    conversation = page.post("/api/conversations", json={}).json
    for number in range(5):
        response = page.post(f"/api/conversations/{conversation['id']}/messages", json={"content": f"q{number}"})
        assert response.status_code == 200, response.get_data(as_text=True)
        assert sse(response.get_data())[-1][0] == "done"


def tiny_conversations(count: int, messages: int = 1, text: str = "x") -> bytes:
    return json.dumps({"format": "jarvis.conversations", "version": 1, "conversations": [
        {"title": "t", "created_at": 1.0, "updated_at": 1.0, "settings": None,
         "messages": [{"role": "user", "content": text, "status": "complete", "created_at": 1.0}] * messages}
        for _ in range(count)]}, separators=(",", ":")).encode()


@pytest.mark.live
@pytest.mark.serial  # measures /healthz's latency while the worker imports
def test_the_largest_imports_never_stall_the_worker(start_jarvis):
    """32 MB of 220,000 tiny conversations (refused: too many) and a valid 10,000-conversation file:
    /healthz keeps answering meanwhile. Before, the first held the hub 5.6 s, the second 1.5 s."""
    import threading

    import requests

    jarvis = start_jarvis()
    # Both files made before the polling starts: json.dumps holds this process's GIL, and the poller's
    # figures must be the server's.
    huge = tiny_conversations(220_000)  # 31.7 MB, just under the 32 MiB limit
    valid = tiny_conversations(10_000, messages=5, text="y" * 100)
    latencies, done = [], threading.Event()

    def poll():
        with requests.Session() as session:
            while not done.is_set():
                started = time.monotonic()
                assert session.get(jarvis.url + "/healthz", timeout=30).ok
                latencies.append(time.monotonic() - started)
                done.wait(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        refused = requests.post(jarvis.url + "/api/conversations/import", data=huge,
                                headers={"Content-Type": "application/json"}, timeout=120)
        assert refused.status_code == 400 and "at most 10000" in refused.json()["error"]["message"]
        accepted = requests.post(jarvis.url + "/api/conversations/import", data=valid,
                                 headers={"Content-Type": "application/json"}, timeout=120)
        assert accepted.status_code == 201 and len(accepted.json()["data"]) == 10_000
    finally:
        done.set()
        poller.join()
    print(f"\n{len(huge) / 1e6:.0f} MB refused, {len(valid) / 1e6:.1f} MB imported: /healthz p50 "
          f"{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
          f"over {len(latencies)} polls")
    # Limit far from both: a worker blocked by the parse answered after 1.5-5.6 s; one parsing in slices, in
    # tens of milliseconds.
    assert max(latencies) < 0.5


@pytest.mark.parametrize("messages, place", [
    ([{"id": 1, "parent_id": None}, {"id": 2, "parent_id": 3}], "conversations[0].messages[1].parent_id"),
    ([{"id": 1, "parent_id": 2}, {"id": 2, "parent_id": None}], "conversations[0].messages[0].parent_id"),
    ([{"id": 1, "parent_id": None}, {"id": 1, "parent_id": 1}], "conversations[0].messages[1].id"),
    ([{"id": [1], "parent_id": None}], "conversations[0].messages[0].id"),
])
def test_a_tree_whose_parents_do_not_come_first_is_refused_naming_the_place(page, messages, place):
    document = {"format": FORMAT, "version": 1, "conversations": [
        {"title": "t", "messages": [{"role": "user", "content": "x", **message} for message in messages]}]}
    response = page.post("/api/conversations/import", json=document)
    assert response.status_code == 400 and place in response.json["error"]["message"], response.json
    assert page.get("/api/conversations").json["data"] == []
