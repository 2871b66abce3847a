"""The conversation store: WAL mode, status transitions, recovery after a crash, consistency after kill -9."""

import os
import signal
import sqlite3
import time

import pytest
import requests

from jarvis.store import SQLiteStore, database_path, recover_interrupted
from tests.live import LiveServer, sse_events


@pytest.fixture
def store(tmp_path):
    return SQLiteStore(str(tmp_path))


def test_database_is_in_wal_mode(store):
    assert store.journal_mode() == "wal"


def test_status_transitions(store):
    conversation = store.create_conversation("t")
    message = store.add_message(conversation["id"], "assistant", "", "streaming")
    assert store.update_message(message, "partial", "streaming")
    assert store.update_message(message, "partial answer", "stopped")
    saved = store.get_conversation(conversation["id"])["messages"][0]
    assert (saved["content"], saved["status"], saved["error"]) == ("partial answer", "stopped", None)
    assert store.update_message(message, "x", "error", "the model crashed")
    assert store.get_conversation(conversation["id"])["messages"][0]["error"] == "the model crashed"


def test_deleting_a_conversation_deletes_its_messages(store):
    conversation = store.create_conversation("t")
    message = store.add_message(conversation["id"], "user", "hi")
    assert store.delete_conversation(conversation["id"])
    assert store.get_conversation(conversation["id"]) is None
    assert not store.update_message(message, "late write", "complete")


def test_ids_are_unguessable(store):
    ids = {store.create_conversation("t")["id"] for _ in range(20)}
    assert len(ids) == 20 and all(len(conversation_id) >= 20 for conversation_id in ids)


def test_start_up_recovery_marks_streaming_rows_interrupted(tmp_path, store):
    conversation = store.create_conversation("t")
    streaming = store.add_message(conversation["id"], "assistant", "half an ans", "streaming")
    complete = store.add_message(conversation["id"], "assistant", "done", "complete")
    assert recover_interrupted(str(tmp_path)) == 1
    statuses = {m["id"]: m["status"] for m in store.get_conversation(conversation["id"])["messages"]}
    assert statuses == {streaming: "interrupted", complete: "complete"}


@pytest.mark.live
@pytest.mark.timeout(90)
def test_kill_9_mid_stream_leaves_a_consistent_database_that_lags_by_at_most_the_flush_interval(tmp_path,
                                                                                               upstream):
    upstream.scenario.tokens, upstream.scenario.interval = 200, 0.05
    data_dir = tmp_path / "data"
    env = {"JARVIS_UPSTREAM_URL": upstream.url, "JARVIS_DATA_DIR": str(data_dir)}
    jarvis = LiveServer(tmp_path, env).start()
    try:
        conversation = requests.post(jarvis.url + "/api/conversations", json={}).json()
        response = requests.post(f"{jarvis.url}/api/conversations/{conversation['id']}/messages",
                                 json={"content": "count"}, stream=True, timeout=30)
        arrivals = []  # (arrival time, text so far)
        text = ""
        for kind, value, arrived in sse_events(response):
            if kind == "data" and value.get("choices"):
                text += value["choices"][0]["delta"].get("content") or ""
                arrivals.append((arrived, text))
                if len(arrivals) == 30:
                    break
        killed_at = time.monotonic()
        os.kill(jarvis.worker().pid, signal.SIGKILL)
        response.close()
        # Let the replacement worker finish booting: a worker signalled mid-boot ignores the stop.
        jarvis.wait_for_log("Booting worker", count=2)
        requests.get(jarvis.url + "/healthz", timeout=10)
    finally:
        jarvis.stop()

    connection = sqlite3.connect(database_path(str(data_dir)))
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        content, status = connection.execute(
            "SELECT content, status FROM messages WHERE role = 'assistant'").fetchone()
    finally:
        connection.close()
    assert status == "streaming"  # nobody recorded an end: the worker died
    assert text.startswith(content)  # never more than was streamed
    settled = [so_far for arrived, so_far in arrivals if arrived <= killed_at - 0.5 - 0.1]
    assert settled and content.startswith(settled[-1]), (content, settled[-1])

    restarted = LiveServer(tmp_path, env).start()  # the next start marks it interrupted
    try:
        saved = requests.get(f"{restarted.url}/api/conversations/{conversation['id']}").json()
        assert saved["messages"][-1]["status"] == "interrupted"
        assert saved["messages"][-1]["content"] == content
    finally:
        restarted.stop()
