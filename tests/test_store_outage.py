"""The database goes away under a running Jarvis (PostgreSQL stopped, its connections cut, as in an
outage): the page API says so with 503 within JARVIS_STORE_TIMEOUT_SECONDS, what needs no database
keeps answering, the first request after the database is back works, and an answer streaming through
the outage is saved whole once it is back (within JARVIS_STORE_RETRY_SECONDS)."""

from __future__ import annotations

import time

import pytest
import requests

from tests.clients import chat_body, content_of
from tests.live import LiveServer, sse_events, wait_until
from tests.postgres import PostgresCluster

pytestmark = pytest.mark.live

STORE_TIMEOUT = 2.0


@pytest.fixture
def cluster():
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


def timed(method, url: str, **kwargs) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.request(method, url, timeout=30, **kwargs)
    return response, time.monotonic() - started


@pytest.mark.long(14)
def test_with_postgresql_stopped_the_page_api_answers_503_in_time_v1_and_healthz_keep_serving_and_then_it_recovers(
        cluster, upstream, tmp_path):
    url = cluster.new_database()
    jarvis = LiveServer(tmp_path, {"JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_DATABASE_URL": url,
                                   "JARVIS_STORE_TIMEOUT_SECONDS": str(STORE_TIMEOUT)}).start()
    try:
        created = requests.post(jarvis.url + "/api/conversations", json={"title": "kept"}, timeout=10)
        conversation_id = created.json()["id"]
        cluster.pause()

        # The first request finds its pooled connection cut; later ones wait for a new one, up to the timeout.
        for method, path, body in [("GET", "/api/conversations", None),
                                   ("GET", f"/api/conversations/{conversation_id}", None),
                                   ("POST", f"/api/conversations/{conversation_id}/messages", {"content": "hi"}),
                                   ("GET", "/api/conversations", None)]:
            response, seconds = timed(method, jarvis.url + path, json=body)
            print(f"{method} {path} with the database down: {response.status_code} in {seconds:.2f} s")
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "store_unavailable"
            assert response.headers["Retry-After"] == "1"
            assert seconds < STORE_TIMEOUT * 2 + 1  # the timeout, and not the old 10 s (slack for a slow machine)

        health, seconds = timed("GET", jarvis.url + "/healthz")
        assert health.status_code == 200 and seconds < STORE_TIMEOUT
        answer = requests.post(jarvis.url + "/v1/chat/completions", json=chat_body({"tokens": 3}), stream=True,
                               timeout=30)
        assert answer.status_code == 200 and answer.content.endswith(b"data: [DONE]\n\n")

        cluster.resume()
        kept = wait_until(lambda: (response := requests.get(f"{jarvis.url}/api/conversations/{conversation_id}",
                                                            timeout=30)).status_code == 200 and response.json(), 30,
                          lambda: "the page API did not recover within 30 s of the database coming back")
        assert kept["title"] == "kept"
        sent = requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", json={"content": "again"},
                             stream=True, timeout=30)
        assert sent.status_code == 200 and b"data: [DONE]" in sent.content
        listed = requests.get(jarvis.url + "/api/conversations", timeout=10).json()["data"]
        assert [conversation["id"] for conversation in listed] == [conversation_id]
        saved = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=10).json()["messages"]
        assert [message["role"] for message in saved] == ["user", "assistant"]
        jarvis.assert_log_clean()
        assert "the conversation store failed on GET /api/conversations" in jarvis.log()
    finally:
        jarvis.stop()


def last_message(jarvis, conversation_id: str) -> dict | None:
    """The conversation's last message as saved; None while the page API cannot answer (503)."""
    response = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=30)
    return response.json()["messages"][-1] if response.status_code == 200 else None


def page_answer(jarvis, conversation_id: str):
    response = requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", json={"content": "hi"},
                             stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return int(response.headers["X-Message-Id"]), sse_events(response)


@pytest.mark.long(40)
def test_an_answer_outlives_a_30_s_database_outage_on_two_workers_and_two_nodes(cluster, upstream, tmp_path):
    """PostgreSQL away for 30 s (600 tokens at the upstream's pace; the lease is 6 s) in the middle of a page
    answer on node A (two workers), with node B on the same database: the client gets every token, and
    once the database is back the saved answer is complete and whole — whether node B or A's other worker
    marked it interrupted first or not. Not serial: it mostly waits, beside other tests."""
    upstream.scenario.tokens, upstream.scenario.interval = 700, 0.05
    database = cluster.new_database()
    a = LiveServer(tmp_path, {"JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_DATABASE_URL": database,
                                    "JARVIS_STORE_TIMEOUT_SECONDS": "1"}, args=["-w", "2"]).start()
    b = LiveServer(tmp_path, {"JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_DATABASE_URL": database,
                                    "JARVIS_STORE_TIMEOUT_SECONDS": "1"}).start()
    try:
        conversation_id = requests.post(a.url + "/api/conversations", json={}, timeout=10).json()["id"]
        message_id, events = page_answer(a, conversation_id)
        received = [next(events) for _ in range(30)]
        cluster.pause()
        paused = time.monotonic()
        received += [next(events) for _ in range(600)]
        outage = time.monotonic() - paused
        cluster.resume()
        for node in (b, a, a):  # pages listing conversations: whoever answers looks for dead runs
            requests.get(node.url + "/api/conversations", timeout=30)
        received += list(events)
        assert received[-1][0] == "done" and received[-2][1].get("status") == "complete", received[-3:]
        sent = content_of(received)
        assert sent == "".join(f"w{index} " for index in range(700))

        message = wait_until(lambda: (saved := last_message(b, conversation_id)) and saved["status"] == "complete"
                             and saved, 30, lambda: f"the answer was never saved complete:\n{a.log()[-3000:]}")
        assert message["id"] == message_id and message["content"] == sent
        print(f"the database was away {outage:.1f} s in the middle of the answer: saved complete, "
              f"{len(sent)} characters")
        assert outage > 25
        a.assert_log_clean()
        b.assert_log_clean()
    finally:
        a.stop()
        b.stop()


@pytest.mark.long(13)
def test_past_the_retry_limit_the_client_is_told_and_the_loss_is_logged_naming_the_answer(cluster, upstream,
                                                                                          tmp_path):
    upstream.scenario.tokens, upstream.scenario.interval = 400, 0.02
    jarvis = LiveServer(tmp_path, {"JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_DATABASE_URL": cluster.new_database(),
                                   "JARVIS_STORE_TIMEOUT_SECONDS": "1", "JARVIS_STORE_RETRY_SECONDS": "2"}).start()
    try:
        conversation_id = requests.post(jarvis.url + "/api/conversations", json={}, timeout=10).json()["id"]
        message_id, events = page_answer(jarvis, conversation_id)
        received = [next(events) for _ in range(40)]  # 0.8 s: saved at least once
        cluster.pause()
        received += list(events)
        assert received[-1][0] == "done" and received[-2][1]["error"]["code"] == "answer_not_saved"  # told in-band
        line = jarvis.wait_for_log(f"the answer {message_id} could not be saved", timeout=30)
        assert "[ERROR]" in next(text for text in line.splitlines() if f"the answer {message_id} could" in text)
        cluster.resume()

        message = wait_until(lambda: (saved := last_message(jarvis, conversation_id)) and saved["status"] != "streaming"
                             and saved, 30, lambda: "the answer never ended in the store")
        assert message["status"] == "interrupted"  # what the store last accepted, found dead once its lease expired
        assert content_of(received).startswith(message["content"]) and message["content"]
    finally:
        jarvis.stop()
