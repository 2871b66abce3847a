"""/metrics counts streams by outcome, summed across gunicorn workers."""

import os

import pytest
import requests

from jarvis import metrics
from tests.clients import RawClient, chat_body, chat_request, metric, raw_client_on
from tests.live import sse_events

pytestmark = pytest.mark.live

KEY = "metrics-key-0123456789abcdef"


def test_metrics_report_the_right_counts_across_two_workers(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_WORKERS": "2", "JARVIS_API_KEY": KEY})
    assert len(jarvis.workers()) == 2
    auth = {"x-api-key": KEY}
    assert requests.get(jarvis.url + "/metrics").status_code == 401
    # Three complete streams on each worker, on connections each worker is known to have accepted (the
    # kernel hands a connection to whichever worker accepts first; one idle worker can win every time).
    complete = 0
    for worker in jarvis.workers():
        for _ in range(3):
            client = raw_client_on(jarvis.port, worker.pid)
            client.send(chat_request(chat_body({"tokens": 3}), extra_headers=f"x-api-key: {KEY}\r\n"))
            client.read_until(b"data: [DONE]")
            client.close()
            complete += 1
            jarvis.wait_for_log("stream end outcome=", count=complete)
    for _ in range(3):  # failed mid-stream
        body = chat_body({"tokens": 5, "error_event_after": 1})
        list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", json=body, headers=auth, stream=True)))
    for index in range(4):  # stopped by the client
        client = RawClient(jarvis.port)
        client.send(chat_request(chat_body({"tokens": 500, "interval": 0.02}), extra_headers=f"x-api-key: {KEY}\r\n"))
        client.read_until(b'"content": "w1 "')
        client.close_rst()
        upstream.wait_until_ended(upstream.wait_for_exchange(complete + 3 + index + 1))
    jarvis.wait_for_log("stream end outcome=", count=complete + 7)
    text = requests.get(jarvis.url + "/metrics", headers=auth).text
    assert metric(text, "jarvis_streams_total", outcome="complete") == complete
    assert metric(text, "jarvis_streams_total", endpoint="chat/completions", upstream="upstream") == complete + 7
    assert metric(text, "jarvis_streams_total", outcome="upstream_error") == 3
    assert metric(text, "jarvis_streams_total", outcome="client_stop") == 4
    assert metric(text, "jarvis_upstream_errors_total", kind="upstream_error") == 3
    assert metric(text, "jarvis_active_streams") == 0
    assert metric(text, "jarvis_cancel_latency_seconds_count") == 4
    assert metric(text, "jarvis_time_to_first_token_seconds_count") == complete + 7
    assert metric(text, "jarvis_stream_duration_seconds_count") == complete + 7
    assert len(worker_pids(jarvis)) == 2


def worker_pids(jarvis) -> set[str]:
    """The pids of the workers that ended a stream, from the end lines' `[pid]` field."""
    return {line.split("] [")[1].split("]")[0] for line in jarvis.end_lines()}


def test_no_label_takes_a_value_from_a_request_or_an_upstream(app, client, backend):
    import re
    import secrets

    from jarvis.errors import ApiError, StreamError

    def requests_by_route(text: str) -> dict:
        return {(route, status): float(count) for route, status, count in re.findall(
            r'^jarvis_http_requests_total\{route="([^"]*)",status="([^"]*)"\} (\S+)', text, re.M)}

    # The counters are the process's: another test's app (one with a route of its own) may have counted first.
    before = requests_by_route(client.get("/metrics").get_data(as_text=True))
    hostile = "x" + secrets.token_hex(6)
    backend.fail_next(ApiError(502, "upstream error", body={"error": {"message": "no", "type": "x", "code": hostile}}))
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    backend.enqueue(["w0 ", StreamError(hostile + "2", "broken mid-stream", "upstream_error")])
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                              "stream": True}).get_data()
    client.get(f"/api/conversations/{hostile}")
    client.get(f"/api/files/{hostile}")
    client.get(f"/{hostile}/nothing/here")
    text = client.get("/metrics").get_data(as_text=True)
    assert hostile not in text
    routes = {rule.rule for rule in app.url_map.iter_rules()} | {"unmatched"}
    counted = [key for key, count in requests_by_route(text).items() if count > before.get(key, 0)]  # this test's
    assert ("/api/conversations/<conversation_id>", "404") in counted and ("unmatched", "404") in counted
    assert all(route in routes and status.isdigit() for route, status in counted), counted
    kinds = set(re.findall(r'^jarvis_upstream_errors_total\{kind="([^"]*)"', text, re.M))
    assert "upstream_error" in kinds and kinds <= metrics.ERROR_KINDS, kinds


def test_an_upstream_is_up_when_its_requests_get_answers_and_down_when_it_cannot_be_reached(client, backend):
    import re

    from jarvis.errors import ApiError

    def up() -> str:
        text = client.get("/metrics").get_data(as_text=True)
        return re.search(r'^jarvis_upstream_up\{upstream="fake"\} (\S+)$', text, re.M).group(1)

    chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    backend.fail_next(ApiError(502, "The upstream is unreachable", type_="upstream_error", code="upstream_unreachable"))
    assert client.post("/v1/chat/completions", json=chat).status_code == 502
    assert up() == "0.0"
    client.post("/v1/chat/completions", json=chat).get_data()
    assert up() == "1.0"


def test_a_metrics_directory_left_by_a_killed_master_is_removed_when_jarvis_starts_again(tmp_path, monkeypatch):
    """A master stopped by kill -9 (or a crash) never ran on_exit, so its metrics directory stayed in the
    temporary folder for good (285 of them after a day of this suite). The next start removes the ones
    whose master is gone, and only those."""
    import subprocess
    import tempfile

    from jarvis import server_config

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # unset, as without an operator's own
    monkeypatch.setattr(server_config, "_OWN_METRICS_DIR", [])
    gone = subprocess.Popen(["true"])
    gone.wait()  # its PID now runs nothing
    stale = tmp_path / f"jarvis-metrics-{gone.pid}-x1"
    stale.mkdir()
    (stale / "counter_1234.db").write_bytes(b"counts")
    running = tmp_path / f"jarvis-metrics-{os.getppid()}-x2"  # a master still running
    running.mkdir()
    # An earlier master's with this one's PID (PID 1 in a container, say): not this one's, made below.
    same_pid = tmp_path / f"jarvis-metrics-{os.getpid()}-x4"
    same_pid.mkdir()
    unnamed = tmp_path / "jarvis-metrics-x3"  # not named after a PID (as before this change): left alone
    unnamed.mkdir()

    server_config._prepare_metrics_directory()

    made = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert os.path.basename(made).startswith(f"jarvis-metrics-{os.getpid()}-") and os.path.isdir(made)
    assert not stale.exists() and not same_pid.exists() and running.is_dir() and unnamed.is_dir()
