"""Accounts (in-process): each person's own conversations, personal API keys, sign-in (jarvis.accounts)."""

from __future__ import annotations

import re

import pytest

from jarvis import accounts, passwords, state
from tests.clients import content_of, sse

PASSWORDS = {"alice": "alice's password", "bob": "bob's password", "root": "root's password"}


@pytest.fixture
def app(make_app):
    return make_app()


def add_user(app, name: str, *, admin: bool = False) -> dict:
    with app.app_context():
        user = state.store().add_user(name, passwords.hash_password(PASSWORDS[name]), admin=admin)
        accounts.forget()  # (a real server notices within a second)
    return user


def add_key(app, name: str, label: str = "") -> tuple[str, str]:
    key_id, key, kept = passwords.new_key()
    with app.app_context():
        assert state.store().add_key(name, key_id, kept, label)
    return key_id, key


def signed_in(app, name: str):
    client = app.test_client()
    response = client.post("/api/session", json={"username": name, "password": PASSWORDS[name]})
    assert response.status_code == 204, response.get_data(as_text=True)
    return client


def a_conversation_with_an_answer(client) -> tuple[str, int, int]:
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "my secret plans"})
    assert response.status_code == 200
    response.get_data()
    return conversation_id, int(response.headers["X-User-Message-Id"]), int(response.headers["X-Message-Id"])


def test_without_an_account_nothing_is_asked_and_the_first_account_turns_accounts_on(app):
    client = app.test_client()
    assert client.get("/api/conversations").status_code == 200
    assert client.get("/api/session").json == {"required": False, "accounts": False, "signed_in": True, "user": None}
    add_user(app, "alice")
    refused = client.get("/api/conversations")
    assert refused.status_code == 401 and refused.json["error"]["code"] == "sign_in_required"
    hello = {"messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=hello).status_code == 401
    assert client.get("/api/session").json == {"required": True, "accounts": True, "signed_in": False, "user": None}
    alice = signed_in(app, "alice")
    assert alice.get("/api/session").json["user"] == {"name": "alice", "admin": False}
    assert alice.get("/api/conversations").status_code == 200


def test_an_unknown_name_is_checked_against_a_hash_made_with_todays_argon2_settings():
    """The dummy hash is written in the source: were Argon2's settings raised, checking an unknown name would
    cost less than checking a real password, and tell the names apart by time."""
    assert not passwords.HASHER.check_needs_rehash(passwords._DUMMY)
    assert passwords.verify(None, "anything at all") is False


def test_an_unknown_name_and_a_wrong_password_get_the_same_answer_and_a_new_session_replaces_the_old(app):
    add_user(app, "alice")
    client = app.test_client()
    answers = [client.post("/api/session", json=body) for body in (
        {"username": "nobody", "password": "whatever it is"}, {"username": "alice", "password": "not hers at all"},
        {"username": "alice"}, {"username": 7, "password": []}, {"username": "a" * 1000, "password": "x"})]
    assert {(answer.status_code, answer.get_data()) for answer in answers} == {
        (401, answers[0].get_data())}  # one answer for all, naming neither
    assert answers[0].json["error"]["code"] == "invalid_credentials"
    assert client.post("/api/session", json={"username": "ALICE", "password": PASSWORDS["alice"]}).status_code == 204
    first = client.get_cookie("jarvis_session").value
    client.post("/api/session", json={"username": "alice", "password": PASSWORDS["alice"]})
    assert client.get_cookie("jarvis_session").value != first  # each sign-in a new session
    assert client.delete("/api/session").status_code == 204
    assert client.get("/api/conversations").status_code == 401


def _conversation_routes(app) -> list[tuple[str, str]]:
    """Every route of the page API that names a conversation, with each of its methods."""
    routes = []
    for rule in app.url_map.iter_rules():
        if "conversation_id" in rule.arguments:
            routes += [(method, rule.rule) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return routes


_BODIES = {"POST": {"content": "mine now", "regenerate": True}, "PUT": {"title": "mine now"}}


def test_another_accounts_conversation_is_404_on_every_route_that_names_one_and_stays_unchanged(app, backend):
    """Table-driven over the route map: a new route that names a conversation is in the table by itself."""
    add_user(app, "alice")
    add_user(app, "bob")
    alice, bob = signed_in(app, "alice"), signed_in(app, "bob")
    conversation_id, question_id, answer_id = a_conversation_with_an_answer(alice)
    before = alice.get(f"/api/conversations/{conversation_id}?all=1").json
    routes = _conversation_routes(app)
    assert len(routes) >= 7, routes  # read, rename, delete, send, stop, re-attach, export
    missing = {"id": "no-such-conversation"}
    for method, rule in routes:
        for target in (conversation_id, missing["id"]):
            path = rule.replace("<conversation_id>", target).replace("<int:message_id>", str(answer_id))
            path = re.sub(r"<[^>]+>", "1", path)
            response = bob.open(path, method=method, json=_BODIES.get(method))
            assert response.status_code == 404, (method, path, response.status_code)
            assert response.json["error"]["code"] == "conversation_not_found", (method, path)
        # Bob learns nothing from the answer: his and a missing one's are the same bytes.
    after = alice.get(f"/api/conversations/{conversation_id}?all=1").json
    assert after == before
    # Nor is it anywhere in his lists, his search or his export.
    assert bob.get("/api/conversations").json["data"] == []
    assert bob.get("/api/conversations/search?q=secret").json["data"] == []
    assert conversation_id not in bob.get("/api/conversations/export").get_data(as_text=True)
    assert [c["id"] for c in alice.get("/api/conversations").json["data"]] == [conversation_id]
    assert [r["conversation_id"] for r in alice.get("/api/conversations/search?q=secret").json["data"]] == \
        [conversation_id]


def test_an_import_is_the_importers_and_a_conversation_made_before_accounts_goes_to_the_first_admin(app):
    before = app.test_client().post("/api/conversations", json={}).json["id"]
    app.test_client().post(f"/api/conversations/{before}/messages", json={"content": "old"}).get_data()
    add_user(app, "bob")
    add_user(app, "root", admin=True)
    root, bob = signed_in(app, "root"), signed_in(app, "bob")
    assert [c["id"] for c in root.get("/api/conversations").json["data"]] == [before]
    assert bob.get(f"/api/conversations/{before}").status_code == 404
    document = root.get("/api/conversations/export").get_data()
    imported = bob.post("/api/conversations/import", data=document, content_type="application/json").json["data"]
    assert [c["id"] for c in bob.get("/api/conversations").json["data"]] == imported
    assert root.get(f"/api/conversations/{imported[0]}").status_code == 404


def test_a_personal_key_streams_from_v1_and_stops_working_when_revoked_or_its_account_removed(app):
    add_user(app, "alice")
    key_id, key = add_key(app, "alice", "laptop")
    _, other = add_key(app, "alice")
    client = app.test_client()
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    for headers in ({"Authorization": f"Bearer {key}"}, {"x-api-key": key},
                    {"Authorization": f"Bearer {key}", "x-api-key": other}):  # two of hers: still her
        response = client.post("/v1/chat/completions", json=request, headers=headers)
        assert response.status_code == 200 and content_of(sse(response.get_data())) == "w0 w1 w2 "
    for headers in ({"Authorization": f"Bearer {key}x"}, {"Authorization": f"Bearer {key}", "x-api-key": "nope"}):
        assert client.post("/v1/chat/completions", json=request, headers=headers).status_code == 401
    with app.app_context():
        assert state.store().revoke_key(key_id)
    refused = client.post("/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401 and refused.json["error"]["code"] == "invalid_api_key"
    assert key not in refused.get_data(as_text=True)
    assert client.get("/v1/models", headers={"x-api-key": other}).status_code == 200
    session = signed_in(app, "alice")
    with app.app_context():
        assert state.store().remove_user("alice")
    assert client.get("/v1/models", headers={"x-api-key": other}).status_code == 401
    assert session.get("/api/conversations").status_code == 401  # her sessions ended with her


def test_metrics_and_debug_are_for_admins_and_the_operators_key(make_app):
    app = make_app(api_key="the operator's key")
    add_user(app, "alice")
    add_user(app, "root", admin=True)
    alice, root = signed_in(app, "alice"), signed_in(app, "root")
    assert alice.get("/metrics").status_code == 403 and root.get("/metrics").status_code == 200
    assert app.test_client().get("/metrics", headers={"x-api-key": "the operator's key"}).status_code == 200
    assert app.test_client().get("/debug/streams", headers={"x-api-key": "the operator's key"}).status_code == 200
    # ...and nothing else: the operator's key is no account.
    assert app.test_client().get("/api/conversations", headers={"x-api-key": "the operator's key"}).status_code == 401
    assert app.test_client().get("/v1/models", headers={"x-api-key": "the operator's key"}).status_code == 401


def test_a_new_password_ends_the_accounts_sessions(app):
    add_user(app, "alice")
    session = signed_in(app, "alice")
    with app.app_context():
        assert state.store().set_password("alice", passwords.hash_password("a brand new password"))
    assert session.get("/api/conversations").status_code == 401


def test_ten_wrong_passwords_from_one_address_then_429_while_the_right_one_works_from_another(app):
    add_user(app, "alice")
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "192.0.2.66"
    wrong = {"username": "alice", "password": "a wrong guess"}
    assert [guesser.post("/api/session", json=wrong).status_code for _ in range(10)] == [401] * 10
    for body in (wrong, {"username": "alice", "password": PASSWORDS["alice"]}):  # even the right one, from there
        refused = guesser.post("/api/session", json=body)
        assert refused.status_code == 429 and refused.json["error"]["code"] == "too_many_sign_ins"
        assert 590 <= int(refused.headers["Retry-After"]) <= 601
    owner = app.test_client()
    owner.environ_base["REMOTE_ADDR"] = "198.51.100.7"
    assert owner.post("/api/session", json={"username": "alice", "password": PASSWORDS["alice"]}).status_code == 204
    # Many names from one address: limited too (an unknown name counts as a failure like any other).
    for number in range(30):
        assert guesser.post("/api/session", json={"username": f"n{number}", "password": "x" * 8}).status_code \
            in (401, 429)
    assert guesser.post("/api/session", json={"username": "someone", "password": "x" * 8}).status_code == 429


def test_failures_older_than_the_window_no_longer_count(app, monkeypatch):
    from jarvis import security

    add_user(app, "alice")
    client = app.test_client()
    for _ in range(10):
        client.post("/api/session", json={"username": "alice", "password": "a wrong guess"})
    assert client.post("/api/session", json={"username": "alice", "password": PASSWORDS["alice"]}).status_code == 429
    later = security.time.time() + security.FAILURE_WINDOW_SECONDS + 1
    monkeypatch.setattr(security.time, "time", lambda: later)
    assert client.post("/api/session", json={"username": "alice", "password": PASSWORDS["alice"]}).status_code == 204


def test_a_trusted_proxys_user_header_signs_in_and_makes_the_account_and_anyone_elses_is_ignored(make_app):
    app = make_app(trusted_user_header="X-Forwarded-User")
    proxy = app.test_client()  # the test client's peer is 127.0.0.1: gunicorn's default forwarded_allow_ips
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "192.0.2.9"
    assert proxy.get("/api/conversations").status_code == 401  # on at once: the proxy names the users
    header = {"X-Forwarded-User": "carol@example.org"}
    assert proxy.get("/api/session", headers=header).json["user"] == {"name": "carol@example.org", "admin": False}
    conversation_id = proxy.post("/api/conversations", json={}, headers=header).json["id"]
    proxy.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hi"}, headers=header).get_data()
    assert [c["id"] for c in proxy.get("/api/conversations", headers=header).json["data"]] == [conversation_id]
    refused = elsewhere.get("/api/conversations", headers=header)  # the same header, not from the proxy
    assert refused.status_code == 401 and refused.json["error"]["code"] == "sign_in_required"
    assert proxy.get(f"/api/conversations/{conversation_id}",
                     headers={"X-Forwarded-User": "mallory"}).status_code == 404
    assert proxy.get("/api/conversations", headers={"X-Forwarded-User": "no spaces allowed"}).status_code == 401
    with app.app_context():  # made on first sight, with no password that could ever match
        assert not passwords.verify(state.store().user("carol@example.org")["password_hash"], "!")
    assert proxy.post("/api/session", json={"username": "carol@example.org", "password": "!" * 8}).status_code == 401


def test_personal_keys_are_made_listed_and_revoked_in_the_page_api_and_only_by_their_owner(app):
    add_user(app, "alice")
    add_user(app, "bob")
    alice, bob = signed_in(app, "alice"), signed_in(app, "bob")
    made = alice.post("/api/account/keys", json={"label": "laptop"})
    assert made.status_code == 201 and made.json["key"].startswith("jv-") and made.json["label"] == "laptop"
    key_id, key = made.json["id"], made.json["key"]
    listed = alice.get("/api/account").json
    assert (listed["name"], listed["admin"], [k["id"] for k in listed["keys"]]) == ("alice", False, [key_id])
    assert key not in alice.get("/api/account").get_data(as_text=True)  # shown once, when made
    assert app.test_client().get("/v1/models", headers={"x-api-key": key}).status_code == 200
    assert bob.get("/api/account").json["keys"] == []
    refused = bob.delete(f"/api/account/keys/{key_id}")  # hers: as if it did not exist
    assert refused.status_code == 404 and refused.json["error"]["code"] == "key_not_found"
    assert app.test_client().get("/v1/models", headers={"x-api-key": key}).status_code == 200
    assert alice.delete(f"/api/account/keys/{key_id}").status_code == 204
    assert app.test_client().get("/v1/models", headers={"x-api-key": key}).status_code == 401
    assert alice.delete(f"/api/account/keys/{key_id}").status_code == 404


def test_without_accounts_the_account_routes_say_so(client):
    refused = client.get("/api/account")
    assert refused.status_code == 404 and refused.json["error"]["code"] == "no_accounts"


def test_removing_the_last_account_keeps_its_conversations_closed_to_anyone(app):
    add_user(app, "alice")
    alice = signed_in(app, "alice")
    conversation_id, _, _ = a_conversation_with_an_answer(alice)
    with app.app_context():
        assert state.store().remove_user("alice")
        accounts.forget()
    anyone = app.test_client()
    assert anyone.get("/api/conversations").status_code == 401  # still accounts mode: nothing opened
    assert anyone.get(f"/api/conversations/{conversation_id}").status_code == 401
    assert anyone.get("/v1/models").status_code == 401
