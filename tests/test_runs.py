"""Runs, in-process: what a re-attaching page gets, Stop, nobody watching, one answer per conversation."""

import itertools
import sqlite3
import time

import gevent
import gevent.event
import pytest

from jarvis.errors import ApiError
from jarvis.runs import missing_text
from tests.clients import content_of, sse
from tests.fake_backend import QUEUED, STALL, Pause
from tests.test_conversations import settle


@pytest.mark.parametrize("content, reasoning, moved, after, reasoning_after, delta, offsets", [
    ("abcdef", "", False, 0, 0, {"content": "abcdef"}, (6, 0)),
    ("abcdef", "", False, 4, 0, {"content": "ef"}, (6, 0)),
    ("abcdef", "xyz", False, 6, 1, {"reasoning_content": "yz"}, (6, 3)),
    ("abc", "", False, 5, 0, {}, (5, 0)),  # the page saw more than was saved before its worker died: it keeps it
    # a lone </think> moved the content the page shows into the reasoning, since the page last looked:
    ("", "hmm, okay", True, 4, 0, {"content_was_reasoning": True, "reasoning_content": " okay"}, (0, 9)),
    ("It is", "hmm.", True, 4, 0, {"content_was_reasoning": True, "content": "It is"}, (5, 4)),
    ("It is 4.", "hmm.", True, 5, 4, {"content": " 4."}, (8, 4)),  # the page had seen the move already
    ("I 😀 it", "", False, 4, 0, {"content": " it"}, (7, 0)),  # offsets count UTF-16 units, as JavaScript does
    ("I \ud83d", "", False, 2, 0, {"content": "\ud83d"}, (3, 0)),  # half a pair, as it arrived
])
def test_a_re_attaching_page_gets_exactly_what_it_lacks(content, reasoning, moved, after, reasoning_after, delta,
                                                         offsets):
    assert missing_text(content, reasoning, moved, after, reasoning_after) == (delta, *offsets)


# -- in-process: the run's life through the page API -------------------------------------------

def start(client, backend, answer, content="hi"):
    backend.enqueue(answer)
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": content})
    return conversation_id, int(response.headers["X-Message-Id"]), response


def read_some(response, count: int) -> bytes:
    """The next `count` chunks of a streamed response (and not one more)."""
    return b"".join(itertools.islice(response.response, count))


def saved(client, conversation_id) -> dict:
    return client.get(f"/api/conversations/{conversation_id}").json["messages"][-1]


def test_stop_stops_the_answer_at_its_source_and_is_idempotent(client, backend):
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    events = sse(response.get_data())
    assert events[-1][0] == "done" and events[-2][1]["status"] == "stopped"
    assert backend.generations[0].closed
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 200  # nothing runs now
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "stopped" and m)
    assert message["content"] == "w0 "
    assert client.post("/api/conversations/nope/stop").status_code == 404



def _opening_slowly(backend, monkeypatch) -> gevent.event.Event:
    """The backend has not answered yet (an upstream still loading a model): open() waits for an answer
    that never comes, as a socket read would, until the relay interrupts it (a Stop). Returns the Event set
    once open() is waiting."""
    waiting, answered, real_open = gevent.event.Event(), gevent.event.Event(), backend.open

    def open_slowly(request):
        waiting.set()
        if not answered.wait(30):  # never set: only the relay's interruption ends this wait in time
            raise AssertionError("the Stop never interrupted the backend's open()")
        return real_open(request)

    monkeypatch.setattr(backend, "open", open_slowly)
    return waiting


@pytest.mark.parametrize("kind", ["send", "regenerate"])
def test_a_stop_before_the_backend_answered_is_a_stopped_answer_and_names_its_messages(client, backend, monkeypatch,
                                                                                        kind):
    # The page is still waiting for this response when its Stop comes: it learns the new messages' ids from
    # it (a page that never learned them showed a second copy of them later), and the answer ended as any
    # stopped one does: 200, status "stopped", kept (a regenerate's version too), not a 499.
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    sse(client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "first"}).get_data())
    waiting = _opening_slowly(backend, monkeypatch)
    body = {"content": "hi"} if kind == "send" else {"regenerate": True}
    sending = gevent.spawn(client.post, f"/api/conversations/{conversation_id}/messages", json=body)
    assert waiting.wait(5)
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    response = sending.get(timeout=5)
    assert response.status_code == 200
    events = sse(response.get_data())
    assert events[-1][0] == "done" and events[-2][1]["status"] == "stopped" and content_of(events) == ""
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "stopped" and m)
    assert message["id"] == int(response.headers["X-Message-Id"]) and message["content"] == ""
    messages = client.get(f"/api/conversations/{conversation_id}").json["messages"]
    if kind == "send":
        assert messages[-2]["id"] == int(response.headers["X-User-Message-Id"]) and messages[-2]["content"] == "hi"
    else:
        assert len(messages) == 2 and len(message["versions"]) == 2
    assert not client.get(f"/api/conversations/{conversation_id}").json["running"]


def test_a_send_the_backend_refused_names_the_messages_it_kept(client, backend):
    # Not a regenerate or an edit (those leave the tree as it was): the question and the failed answer stay,
    # and the page that shows them learns their ids from the refusal itself.
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    backend.fail_next(ApiError(400, "This model's maximum context length is 8192 tokens",
                               code="context_length_exceeded"))
    refused = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "too long"})
    assert refused.status_code == 400 and refused.json["error"]["code"] == "context_length_exceeded"
    settle(lambda: not client.get(f"/api/conversations/{conversation_id}").json["running"])
    messages = client.get(f"/api/conversations/{conversation_id}").json["messages"]
    named = [int(refused.headers["X-User-Message-Id"]), int(refused.headers["X-Message-Id"])]
    assert [message["id"] for message in messages] == named
    assert messages[0]["content"] == "too long" and messages[1]["status"] == "error"

def test_a_page_leaving_does_not_stop_the_answer(client, backend):
    conversation_id, message_id, response = start(client, backend, ["w0 ", Pause(0.2), "w1 ", "w2 "])
    read_some(response, 2)
    response.close()  # the page went away (reload, closed tab, lost network)
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "complete" and m)
    assert message["content"] == "w0 w1 w2 " and not backend.generations[0].aborted.is_set()


def test_a_page_re_attaching_on_the_same_worker_gets_the_rest(client, backend):
    conversation_id, message_id, response = start(client, backend, ["w0 ", "w1 ", Pause(0.3), "w2 ", "w3 "])
    first = sse(read_some(response, 4))
    response.close()
    shown = content_of(first)
    again = client.get(f"/api/conversations/{conversation_id}/messages/{message_id}/stream?after={len(shown)}")
    events = sse(again.get_data())
    assert shown + content_of(events) == "w0 w1 w2 w3 " and events[-2][1]["status"] == "complete"


def test_two_watchers_both_see_every_token_and_one_stop_ends_both(client, backend):
    conversation_id, message_id, first = start(client, backend, ["w0 ", Pause(0.1), "w1 ", STALL])
    second = client.get(f"/api/conversations/{conversation_id}/messages/{message_id}/stream")
    read_some(second, 1)
    read_some(first, 2)
    client.post(f"/api/conversations/{conversation_id}/stop")
    for response in (first, second):
        events = sse(response.get_data())
        assert events[-1][0] == "done" and events[-2][1]["status"] == "stopped"


def test_nobody_watching_stops_the_answer_after_detached_seconds(make_client, backend):
    client = make_client(detached_seconds=0.3)
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    response.close()
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "stopped" and m)
    assert "Nobody was watching for 0.3 s (JARVIS_DETACHED_SECONDS)" in message["error"]
    assert backend.generations[0].closed


def test_detached_seconds_0_stops_when_the_page_leaves(make_client, backend):
    client = make_client(detached_seconds=0)
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    response.close()
    assert backend.generations[0].aborted.wait(1)
    assert settle(lambda: saved(client, conversation_id)["status"] == "stopped")


def test_a_second_send_while_an_answer_runs_is_409_and_logs_no_traceback(client, backend, capfd, caplog):
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    busy = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "again"})
    assert busy.status_code == 409 and busy.json["error"]["code"] == "conversation_busy"
    assert client.get("/api/conversations").json["data"][0]["running"] is True
    client.post(f"/api/conversations/{conversation_id}/stop")
    response.get_data()
    assert "Traceback" not in capfd.readouterr().err  # an expected refusal, not an error
    assert not [record for record in caplog.records if record.exc_info]


def test_re_attach_needs_a_real_answer_and_whole_offsets(client, backend):
    conversation_id, message_id, response = start(client, backend, ["w0 "])
    response.get_data()
    assert client.get(f"/api/conversations/{conversation_id}/messages/99999/stream").status_code == 404
    for offset in ["-1", "²", "１", "1e3", " 1", "9" * 40]:  # a superscript and a full-width digit pass isdigit()
        response = client.get(f"/api/conversations/{conversation_id}/messages/{message_id}/stream",
                              query_string={"after": offset})
        assert response.status_code == 400 and response.json["error"]["param"] == "after", offset
        response = client.get(f"/api/conversations/{conversation_id}/messages/{message_id}/stream",
                              query_string={"reasoning_after": offset})
        assert response.status_code == 400 and response.json["error"]["param"] == "reasoning_after", offset


# -- two apps on one database: a page on one worker, the answer on another ----------------------------

@pytest.fixture
def elsewhere(tmp_path, backend):
    """A second app on the same data directory: another worker, as far as runs are concerned."""
    from jarvis import create_app, state
    from jarvis.settings import Settings

    app = create_app(Settings(data_dir=str(tmp_path / "data"), heartbeat_seconds=0.2), backend=backend)
    yield app.test_client()
    with app.app_context():
        state.runs().close()
        state.store().close()


def test_a_page_on_another_worker_follows_the_answer_to_its_end(client, elsewhere, backend):
    conversation_id, message_id, response = start(client, backend, ["w0 ", "w1 ", Pause(0.5), "w2 "])
    follower = elsewhere.get(f"/api/conversations/{conversation_id}/messages/{message_id}/stream")
    gevent.spawn(response.get_data)  # the owner's own page reads on meanwhile
    events = sse(follower.get_data())
    assert content_of(events) == "w0 w1 w2 " and events[-2][1]["status"] == "complete" and events[-1][0] == "done"


def test_stop_on_another_worker_reaches_the_owner_within_a_tick(client, elsewhere, backend):
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    asked = time.monotonic()
    assert elsewhere.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    assert backend.generations[0].aborted.wait(2)
    assert time.monotonic() - asked < 0.5
    assert sse(response.get_data())[-2][1]["status"] == "stopped"


def test_delete_on_another_worker_ends_the_answer(client, elsewhere, backend):
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    assert elsewhere.delete(f"/api/conversations/{conversation_id}").status_code == 204
    events = sse(response.get_data())
    assert events[-2][1]["error"]["code"] == "conversation_deleted" and backend.generations[0].closed


def test_an_answer_queued_behind_another_names_it_so_the_page_can_stop_it(client, backend):
    first_id, _, first = start(client, backend, ["w0 ", STALL])
    read_some(first, 2)
    second_id, _, second = start(client, backend, [QUEUED, "w0 "])
    waiting = [value for kind, value in sse(read_some(second, 2)) if kind == "data"]
    assert waiting[0]["waiting"] == {"for": [first_id]}
    client.post(f"/api/conversations/{first_id}/stop")
    assert content_of(sse(second.get_data())) == "w0 "
    first.get_data()


def test_an_answer_past_its_size_cap_is_stopped_at_the_source_and_kept_as_far_as_it_went(make_client, backend):
    client = make_client(max_answer_chars=1000)
    conversation_id, _, response = start(client, backend, ["x" * 600, "y" * 600, STALL])
    events = sse(response.get_data())
    assert events[-2][1]["error"]["code"] == "answer_too_long" and events[-1][0] == "done"
    assert backend.generations[0].aborted.is_set() or backend.generations[0].closed
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "error" and m)
    assert message["content"] == "x" * 600 + "y" * 400 and "JARVIS_MAX_ANSWER_CHARS" in message["error"]


# -- a store that refuses writes: nothing is lost silently ------------------------------------------------

@pytest.fixture
def locked(tmp_path):
    """Another process's write lock on Jarvis's database, taken and released by the test."""
    from jarvis.stores.sqlite import database_path

    class Lock:
        connection = None

        def take(self):  # after the app made the database
            self.connection = sqlite3.connect(database_path(str(tmp_path / "data")), isolation_level=None)
            self.connection.execute("BEGIN IMMEDIATE")

        def release(self):
            self.connection.execute("ROLLBACK")

    lock = Lock()
    yield lock
    if lock.connection is not None:
        lock.connection.close()


def test_saves_that_keep_failing_end_the_answer_with_an_error_and_it_is_saved_once_they_work(make_client, backend,
                                                                                               locked):
    client = make_client(store_busy_seconds=0.2, store_retry_seconds=0.5)
    conversation_id, _, response = start(client, backend, [item for index in range(200)
                                                          for item in (f"t{index} ", Pause(0.05))])
    first = sse(read_some(response, 4))
    locked.take()
    events = first + sse(response.get_data())
    assert events[-2][1]["error"]["code"] == "answer_not_saved" and events[-1][0] == "done"
    assert "could not be saved" in events[-2][1]["error"]["message"]
    assert backend.generations[0].closed  # stopped at the source, not left running unsaved
    locked.release()
    message = settle(lambda: (m := saved(client, conversation_id))["status"] == "error" and m, timeout=5)
    assert content_of(events).startswith(message["content"]) and "could not be saved" in message["error"]
    backend.enqueue(["again"])
    assert content_of(sse(client.post(f"/api/conversations/{conversation_id}/messages",
                                      json={"content": "and now?"}).get_data())) == "again"


def test_a_store_that_refuses_writes_is_a_clear_503_and_changes_nothing(make_client, backend, locked, jarvis_log,
                                                                        capfd):
    client = make_client(store_busy_seconds=0.2)
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    locked.take()
    for response in (client.post("/api/conversations", json={}),
                     client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hi"})):
        assert response.status_code == 503 and response.json["error"]["code"] == "store_unavailable"
        assert "database is locked" in response.json["error"]["message"]
    locked.release()
    assert backend.requests == [] and client.get(f"/api/conversations/{conversation_id}").json["messages"] == []
    assert not [record for record in jarvis_log.records if record.exc_info]  # one line each, no traceback
    assert "Traceback" not in capfd.readouterr().err  # nor one printed by gevent for the store's thread


def test_a_bug_while_handling_an_answer_ends_it_with_an_error_event_not_a_cut(client, backend, monkeypatch, jarvis_log):
    from jarvis.answer import Answer

    def broken(self, chunk, now=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Answer, "add", broken)
    conversation_id, _, response = start(client, backend, ["w0 ", "w1 "])
    events = sse(response.get_data())
    assert events[-2][1]["error"]["code"] == "internal_error" and events[-1][0] == "done"
    assert settle(lambda: saved(client, conversation_id)["status"] == "error")


def start_from(client, backend, address: str, forwarded: str | None = None):
    """A page answer that keeps running (it stalls), asked from `address` (and through a proxy's
    X-Forwarded-For when given)."""
    backend.enqueue(["w0 ", STALL])
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    response = client.post(f"/api/conversations/{conversation_id}/messages", json={"content": "hi"},
                           headers=headers, environ_base={"REMOTE_ADDR": address})
    return conversation_id, response


def test_a_client_with_four_answers_running_gets_429_for_a_fifth_and_other_clients_do_not(client, backend):
    running = [start_from(client, backend, "192.0.2.1") for _ in range(4)]
    assert [response.status_code for _, response in running] == [200] * 4
    conversation_id, refused = start_from(client, backend, "192.0.2.1")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "5"
    assert refused.json["error"]["code"] == "too_many_runs"
    assert "JARVIS_MAX_RUNS_PER_CLIENT=4" in refused.json["error"]["message"]
    assert client.get(f"/api/conversations/{conversation_id}").json["messages"] == []  # nothing was added
    assert start_from(client, backend, "192.0.2.2")[1].status_code == 200  # another client
    # Behind a proxy on loopback, the client is the address the proxy saw; elsewhere the header counts for nothing.
    assert start_from(client, backend, "127.0.0.1", forwarded="10.9.9.9, 192.0.2.1")[1].status_code == 429
    assert start_from(client, backend, "127.0.0.1", forwarded="192.0.2.3")[1].status_code == 200
    assert start_from(client, backend, "192.0.2.1", forwarded="192.0.2.4")[1].status_code == 429
    # An answer stopped frees its place at once.
    assert client.post(f"/api/conversations/{running[0][0]}/stop").status_code == 202
    running[0][1].get_data()
    settle(lambda: start_from(client, backend, "192.0.2.1")[1].status_code == 200)


def test_an_answer_that_starts_while_the_tick_asks_the_store_is_not_taken_for_deleted(app, client, backend):
    # The tick asks the store about the runs it holds; an answer started while the store answers is not
    # in that answer, and must not be stopped as if its run were gone.
    from jarvis import state

    with app.app_context():
        store = state.store()
    tick_runs = store.tick_runs
    answered = gevent.event.Event()

    def slow_answer(*args, **kwargs):
        states = tick_runs(*args, **kwargs)
        answered.set()
        gevent.sleep(0.3)  # the store's answer on its way back: meanwhile another answer starts
        return states

    store.tick_runs = slow_answer
    first, _, first_response = start(client, backend, ["w0 ", STALL])
    read_some(first_response, 2)
    assert answered.wait(5)
    answered.clear()
    assert answered.wait(5)  # a tick is on its way back now
    second, _, second_response = start(client, backend, ["v0 ", Pause(0.6), "v1 "])
    events = sse(second_response.get_data())
    assert content_of(events) == "v0 v1 " and events[-2][1]["status"] == "complete", events[-3:]
    assert client.post(f"/api/conversations/{first}/stop").status_code == 202
    first_response.close()


def test_the_list_never_shows_an_answer_running_a_moment_after_it_ended_or_was_stopped(client, backend, monkeypatch):
    # The run's row goes with its last save, queued to the store's thread: here a slow one.
    from jarvis.stores import sql

    finish = sql._finish_answer

    def slowly(*args):
        time.sleep(0.3)
        return finish(*args)

    monkeypatch.setattr(sql, "_finish_answer", slowly)

    def running(conversation_id):
        return next(c["running"] for c in client.get("/api/conversations").json["data"] if c["id"] == conversation_id)

    conversation_id, _, response = start(client, backend, ["w0 ", "w1 "])
    response.get_data()  # [DONE] read: the page refreshes its list at once
    assert running(conversation_id) is False
    conversation_id, _, response = start(client, backend, ["w0 ", STALL])
    read_some(response, 2)
    assert running(conversation_id) is True
    assert client.post(f"/api/conversations/{conversation_id}/stop").status_code == 202
    assert running(conversation_id) is False  # the Stop answered, the list asked at once
    response.close()


def test_an_answer_whose_backend_takes_longer_than_a_lease_to_open_is_never_seen_interrupted(client, backend,
                                                                                           monkeypatch):
    # A tool loop starting its MCP servers on a busy machine opened in 4.5 s, nearly a lease (6 s): its lease
    # must be renewed while it opens. Here a lease of 0.3 s and an open of 1 s.
    from jarvis import leases

    monkeypatch.setattr(leases, "LEASE_SECONDS", 0.3)
    monkeypatch.setattr(leases, "RENEW_SECONDS", 0.1)
    opened = backend.open

    def slowly(request):
        gevent.sleep(1.0)
        return opened(request)

    monkeypatch.setattr(backend, "open", slowly)
    backend.enqueue(["w0 ", "w1 "])
    conversation_id = client.post("/api/conversations", json={}).json["id"]
    sending = gevent.spawn(client.post, f"/api/conversations/{conversation_id}/messages", json={"content": "hi"})
    seen = []
    with gevent.Timeout(10, AssertionError("the answer never started")):
        while not sending.ready():  # (read as a page would, every 0.1 s, until the send returns)
            gevent.sleep(0.1)
            messages = client.get(f"/api/conversations/{conversation_id}").json["messages"]
            seen += [m["status"] for m in messages if m["role"] == "assistant"]
    assert sending.get().status_code == 200
    assert "streaming" in seen and "interrupted" not in seen, seen  # a reader while it opened never marked it dead
