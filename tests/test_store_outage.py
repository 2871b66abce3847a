"""The database goes away under a running Jarvis (PostgreSQL stopped at once, as in a crash or an
outage): the page API says so with 503 within JARVIS_STORE_TIMEOUT_SECONDS, what needs no database
keeps answering, and the first request after the database is back works."""

from __future__ import annotations

import time

import pytest
import requests

from tests.clients import chat_body
from tests.live import LiveServer, wait_until
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
        listed = wait_until(lambda: (response := requests.get(jarvis.url + "/api/conversations", timeout=30))
                            .status_code == 200 and response.json()["data"], 30,
                            lambda: "the page API did not recover within 30 s of the database coming back")
        assert [conversation["id"] for conversation in listed] == [conversation_id]
        sent = requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", json={"content": "again"},
                             stream=True, timeout=30)
        assert sent.status_code == 200 and b"data: [DONE]" in sent.content
        saved = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=10).json()["messages"]
        assert [message["role"] for message in saved] == ["user", "assistant"]
        jarvis.assert_log_clean()
        assert "the conversation store failed on GET /api/conversations" in jarvis.log()
    finally:
        jarvis.stop()
