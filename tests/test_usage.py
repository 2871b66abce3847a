"""Usage and limits (in-process): what each request used, per account, key, model and day; tokens per day
and streams at once (jarvis.usage); the admin's page API (jarvis.admin)."""

from __future__ import annotations

import json

import pytest

from jarvis import state, usage
from jarvis.usage import Tally
from tests.clients import content_of, sse
from tests.fake_backend import STALL, content_chunk, settle
from tests.test_accounts import PASSWORDS, add_key, add_user, signed_in

HELLO = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
USAGE_CHUNK = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000,
               "model": "fake-model", "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 17,
                                                               "total_tokens": 48}}


@pytest.fixture
def app(make_app):
    return make_app()


def payloads(*chunks) -> list[bytes]:
    return [json.dumps(chunk, separators=(",", ":")).encode() if isinstance(chunk, dict) else chunk
            for chunk in chunks]


# -- the tally --------------------------------------------------------------------------------------------


def test_the_tally_takes_the_upstreams_usage_when_it_sends_one_and_counts_events_with_text_when_not():
    counted = Tally()
    counted.feed(payloads(content_chunk("a", role=True), content_chunk(""), content_chunk("b"),
                          {"choices": [{"index": 0, "delta": {"reasoning_content": "hm"}}]},
                          content_chunk(None, finish_reason="stop")))
    assert counted.tokens() == (0, 3)  # "a", "b" and the thinking: an empty delta and the end are no token
    reported = Tally()
    reported.feed(payloads(content_chunk("a"), {**content_chunk("b"), "usage": None}, USAGE_CHUNK))
    assert reported.tokens() == (31, 17)
    llama = Tally()  # llama.cpp's server: timings in the last chunk
    llama.feed(payloads(content_chunk("a"), {**content_chunk(None, finish_reason="stop"),
                                              "timings": {"prompt_n": 12, "predicted_n": 40}}))
    assert llama.tokens() == (12, 40)
    llama.feed(payloads({"choices": [], "timings": {"prompt_n": 12}}))  # a later report lacking a count
    assert llama.tokens() == (12, 40)
    long = Tally()  # OpenAI's chunks once usage is asked for, when it never comes: every one says null
    long.feed(payloads({**content_chunk(None, role=True), "usage": None}))
    for number in range(50):
        long.feed(payloads({**content_chunk(f"t{number}"), "usage": None}))
    long.feed(payloads({**content_chunk(None, finish_reason="stop"), "usage": None}))
    assert long.tokens() == (0, 50)
    responses = Tally(each_event=True)  # the Responses API, relayed as whole events, looked at one by one
    responses.feed([b'event: response.created\ndata: {"type":"response.created"}',
                    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"x"}',
                    b'event: response.output_text.done\ndata: {"type":"response.output_text.done","text":"x"}'])
    assert responses.tokens() == (0, 1)
    responses.feed([b'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
                    b'{"input_tokens":5,"output_tokens":9}}}'])
    assert responses.tokens() == (5, 9)
    whole = Tally()
    whole.whole(json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode())
    assert whole.tokens() == (3, 4)


def test_a_hostile_usage_is_not_believed_and_text_that_quotes_json_is_one_token():
    tally = Tally()
    tally.feed(payloads({"usage": {"prompt_tokens": 10**15, "completion_tokens": -5}},
                        content_chunk('"content": "x"'), b'{"usage": {not json', b"[1, 2]"))
    assert tally.tokens() == (0, 1)


# -- counted per account, key, model and day ----------------------------------------------------------------


def test_a_keys_tokens_are_counted_to_its_account_and_key_as_the_upstream_reports_them_or_as_counted(app, backend):
    add_user(app, "alice")
    add_user(app, "bob")
    key_id, key = add_key(app, "alice", "laptop")
    client = app.test_client()
    backend.enqueue(["one ", "two ", USAGE_CHUNK], ["a ", "b ", "c "])
    for model in ("big-model", "small-model"):
        response = client.post("/v1/chat/completions", json={**HELLO, "model": model},
                               headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        response.get_data()
    alice, bob = signed_in(app, "alice"), signed_in(app, "bob")
    conversation_id = alice.post("/api/conversations", json={}).json["id"]
    alice.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hello"}).get_data()  # w0 w1 w2
    mine = alice.get("/api/usage").json
    assert mine["total"] == {"requests": 3, "prompt_tokens": 31, "completion_tokens": 17 + 3 + 3}
    [today] = mine["days"]
    assert today["day"] == usage.today()
    assert today["models"]["big-model"] == {"requests": 1, "prompt_tokens": 31, "completion_tokens": 17}
    assert today["models"]["small-model"] == {"requests": 1, "prompt_tokens": 0, "completion_tokens": 3}
    assert today["keys"][key_id]["requests"] == 2 and today["keys"]["page"]["requests"] == 1
    assert bob.get("/api/usage").json["total"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    assert alice.get("/api/usage?since=2999-01-01").json["days"] == []
    assert alice.get("/api/usage?since=yesterday").status_code == 400


def test_without_accounts_everything_is_counted_to_everyone_and_to_the_token_counter(make_app, backend):
    from prometheus_client import REGISTRY

    def tokens(direction):
        return REGISTRY.get_sample_value("jarvis_tokens_total", {"direction": direction}) or 0

    app = make_app()
    client = app.test_client()
    before = tokens("prompt"), tokens("completion")
    backend.enqueue(["x ", USAGE_CHUNK])
    client.post("/v1/chat/completions", json=HELLO).get_data()
    assert client.get("/api/usage").json["total"] == {"requests": 1, "prompt_tokens": 31, "completion_tokens": 17}
    assert (tokens("prompt") - before[0], tokens("completion") - before[1]) == (31, 17)


def test_a_refused_request_counts_nothing_and_a_whole_answer_counts_its_usage(app, backend):
    add_user(app, "alice")
    _, key = add_key(app, "alice")
    client = app.test_client()
    assert client.post("/v1/chat/completions", json={"messages": []}, headers={"x-api-key": key}).status_code == 400
    response = client.post("/v1/chat/completions", json={**HELLO, "stream": False}, headers={"x-api-key": key})
    assert response.status_code == 200
    total = signed_in(app, "alice").get("/api/usage").json["total"]
    assert total["requests"] == 1  # the fake's whole answer reports no usage: counted as a request


# -- limits ---------------------------------------------------------------------------------------------


def set_limits(app, name: str, tokens_per_day=None, max_streams=None) -> None:
    with app.app_context():
        assert state.store().set_limits(name, tokens_per_day, max_streams)


def alice_limited_and_bob(app, **limits) -> tuple[str, str]:
    """alice held to `limits`, bob to none; a key of each."""
    add_user(app, "alice")
    add_user(app, "bob")
    set_limits(app, "alice", **limits)
    return add_key(app, "alice")[1], add_key(app, "bob")[1]


def test_over_its_tokens_of_the_day_an_account_gets_429_on_v1_and_in_the_page_and_others_do_not(app, backend):
    key, bobs = alice_limited_and_bob(app, tokens_per_day=40)
    client = app.test_client()
    backend.enqueue(["x ", USAGE_CHUNK])  # 48 tokens: over 40, which the next request sees
    first = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key})
    assert first.status_code == 200
    first.get_data()
    refused = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key})
    assert refused.status_code == 429 and refused.json["error"]["code"] == "daily_token_limit"
    assert 0 < int(refused.headers["Retry-After"]) <= 86401 and refused.headers["x-should-retry"] == "false"
    alice = signed_in(app, "alice")
    conversation_id = alice.post("/api/conversations", json={}).json["id"]
    in_page = alice.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hello"})
    assert in_page.status_code == 429 and in_page.json["error"]["code"] == "daily_token_limit"
    assert alice.get(f"/api/conversations/{conversation_id}").json["messages"] == []  # nothing saved
    assert client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": bobs}).get_data()
    set_limits(app, "alice", tokens_per_day=1000)  # raised: at once
    assert client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key}).status_code == 200


def test_at_its_stream_limit_an_account_gets_429_on_v1_and_in_the_page_until_one_ends(app, backend):
    key, bobs = alice_limited_and_bob(app, max_streams=1)
    alice = signed_in(app, "alice")
    conversation_id = alice.post("/api/conversations", json={}).json["id"]
    backend.enqueue(["thinking hard ", STALL])
    running = alice.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hello"},
                         buffered=False)
    assert running.status_code == 200  # a page answer: it runs on without its page
    running.close()
    client = app.test_client()
    refused = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key})
    assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_streams"
    assert refused.headers["Retry-After"]
    other = alice.post("/api/conversations", json={}).json["id"]
    in_page = alice.post(f"/api/conversations/{other}/messages", json={"content": "and this"})
    assert in_page.status_code == 429 and in_page.json["error"]["code"] == "too_many_streams"
    bobs_stream = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": bobs})
    assert bobs_stream.status_code == 200
    bobs_stream.close()  # (left to the garbage collector, its relay's close would switch greenlets in a finalizer)
    assert alice.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    settle(lambda: not state_runs(app), describe=lambda: "the stopped answer's end")
    held = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key}, buffered=False)
    assert held.status_code == 200  # now a /v1 stream holds her one stream...
    in_page = alice.post(f"/api/conversations/{other}/messages", json={"content": "and this"})
    assert in_page.status_code == 429
    assert content_of(sse(b"".join(held.response))) == "w0 w1 w2 "
    held.close()  # ...until it ends: given back before its last bytes went out
    after = client.post("/v1/chat/completions", json=HELLO, headers={"x-api-key": key})
    assert after.status_code == 200
    after.close()


def state_runs(app) -> list:
    with app.app_context():
        return [run for run in state.runs().by_message.values() if not run.final_saved.is_set()]


# -- the admin's page API ----------------------------------------------------------------------------------


def test_an_admin_adds_limits_resets_and_removes_accounts_and_reads_everyones_usage(app, backend):
    add_user(app, "root", admin=True)
    add_user(app, "alice")
    root, alice = signed_in(app, "root"), signed_in(app, "alice")
    assert alice.get("/api/admin/users").status_code == 403
    assert alice.post("/api/admin/users", json={"username": "eve", "password": "x" * 12}).status_code == 403
    made = root.post("/api/admin/users", json={"username": "bob", "password": PASSWORDS["bob"]})
    assert made.status_code == 201 and made.json["name"] == "bob" and made.json["admin"] is False
    assert root.post("/api/admin/users", json={"username": "BOB", "password": "x" * 12}).status_code == 409
    for bad in ({"username": "no spaces", "password": "x" * 12}, {"username": "carol", "password": "short"},
                {"username": "carol", "password": "x" * 12, "admin": "yes"}):
        assert root.post("/api/admin/users", json=bad).status_code == 400, bad
    bob = signed_in(app, "bob")
    changed = root.patch("/api/admin/users/bob", json={"tokens_per_day": 5000, "max_streams": 2})
    assert (changed.json["tokens_per_day"], changed.json["max_streams"]) == (5000, 2)
    assert root.patch("/api/admin/users/bob", json={"max_streams": None}).json["tokens_per_day"] == 5000
    assert root.patch("/api/admin/users/bob", json={"max_streams": 0}).status_code == 400
    assert root.patch("/api/admin/users/nobody", json={"max_streams": 1}).status_code == 404
    assert root.patch("/api/admin/users/bob", json={"password": "bob's new password"}).status_code == 200
    assert bob.get("/api/conversations").status_code == 401  # his sessions ended with the old password
    bob = app.test_client()
    assert bob.post("/api/session", json={"username": "bob", "password": "bob's new password"}).status_code == 204
    conversation_id = alice.post("/api/conversations", json={}).json["id"]
    alice.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hello"}).get_data()
    listed = {user["name"]: user for user in root.get("/api/admin/users").json["data"]}
    assert set(listed) == {"root", "alice", "bob"} and listed["alice"]["usage"]["completion_tokens"] == 3
    assert "password_hash" not in json.dumps(listed)
    everyone = root.get("/api/admin/usage").json
    assert [(user["name"], user["total"]["requests"]) for user in everyone["users"]] == [("alice", 1)]
    assert "hello" not in json.dumps(everyone)  # usage, never what was said
    assert root.delete("/api/admin/users/root").status_code == 400  # not oneself
    assert root.delete("/api/admin/users/bob").status_code == 204
    assert bob.get("/api/conversations").status_code == 401
    assert root.delete("/api/admin/users/bob").status_code == 404


def test_without_accounts_there_is_no_admin_api(client):
    refused = client.get("/api/admin/users")
    assert refused.status_code == 404 and refused.json["error"]["code"] == "no_accounts"


# -- the operator's command ---------------------------------------------------------------------------------


def test_the_command_sets_and_lifts_limits_and_prints_usage(app, backend, monkeypatch, capsys, tmp_path):
    from jarvis import users

    monkeypatch.setenv("JARVIS_DATA_DIR", str(tmp_path / "data"))
    add_user(app, "alice")
    assert users.main(["limit", "alice", "--tokens-per-day", "100"]) == 0
    assert users.main(["limit", "alice", "--max-streams", "3"]) == 0  # the other limit stays
    with app.app_context():
        user = state.store().user("alice")
    assert (user["tokens_per_day"], user["max_streams"]) == (100, 3)
    assert users.main(["limit", "alice", "--tokens-per-day", "none"]) == 0
    with app.app_context():
        assert state.store().user("alice")["tokens_per_day"] is None
    with pytest.raises(SystemExit):
        users.main(["limit", "alice", "--max-streams", "0"])
    assert users.main(["limit", "nobody", "--max-streams", "1"]) == 1
    alice = signed_in(app, "alice")
    conversation_id = alice.post("/api/conversations", json={}).json["id"]
    alice.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hello"}).get_data()
    alice.get("/api/usage")  # (written now rather than within a second)
    capsys.readouterr()
    assert users.main(["usage", "alice"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == [f"alice\t{usage.today()}\t1\t0\t3", "alice\ttotal\t1\t0\t3"]


def test_counts_the_store_refuses_wait_in_the_worker_and_are_written_whole_when_it_answers():
    from jarvis.stores import StoreUnavailable

    class Store:
        def __init__(self):
            self.away, self.rows = True, []

        def add_usage(self, rows):
            if self.away:
                raise StoreUnavailable("the database is away")
            self.rows += rows

    store = Store()
    meter = usage.Meter(store)
    meter.add((7, "key_a"), "m", 10, 5)
    assert not meter.flush()
    meter.add((7, "key_a"), "m", 1, 2)  # the same row meanwhile: added to what waits
    meter.add(None, "m", 100, 100)  # Jarvis's own probe: the token counter only
    assert meter.pending_tokens(7, usage.today()) == 18
    store.away = False
    assert meter.flush() and store.rows == [(7, usage.today(), "key_a", "m", 2, 11, 7)]
    assert meter.pending == {} and meter.flush()
    if meter.flusher is not None:
        meter.flusher.kill()
