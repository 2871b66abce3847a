"""What operators see: every open stream (/debug/streams, the USR1 dump), and the streaming doctor that
tells Jarvis's own delays from a proxy's buffering."""

from __future__ import annotations

import re
import signal
import statistics
import sys
import time
import uuid

import pytest
import requests

from jarvis.doctor import check
from tests.browser import open_page
from tests.buffering_proxy import BufferingProxy
from tests.clients import RawClient, chat_body, chat_request, raw_client_on
from tests.live import wait_until

pytestmark = [pytest.mark.live, pytest.mark.shared_servers]

KEY = "debug-key-0123456789abcdef"
PHASES = {
    "waiting for headers": {"headers_delay": 30},
    "waiting for first token": {"first_token_delay": 30},
    "thinking": {"shape": "llamacpp", "reasoning_tokens": 3000, "tokens": 1, "interval": 0.05},
    "answering": {"tokens": 3000, "interval": 0.05},
}


def trace() -> str:
    return uuid.uuid4().hex


def open_v1_stream(jarvis, fault: dict, trace_id: str, worker: int | None = None) -> RawClient:
    client = RawClient(jarvis.port) if worker is None else raw_client_on(jarvis.port, worker)
    client.send(chat_request(chat_body(fault), extra_headers=f"X-Request-Id: {trace_id}\r\n"))
    return client


def open_detached_answer(jarvis, trace_id: str, worker: int | None = None) -> str:
    """A page's answer whose page has gone: it runs on, nobody watching."""
    conversation_id = requests.post(jarvis.url + "/api/conversations", json={}, timeout=5).json()["id"]
    client = RawClient(jarvis.port) if worker is None else raw_client_on(jarvis.port, worker)
    client.send(chat_request({"content": "go"}, path=f"/api/conversations/{conversation_id}/messages",
                             extra_headers=f"X-Request-Id: {trace_id}\r\n"))
    client.read_until(b'"content": "')
    client.close_fin()
    client.close()
    return conversation_id


def listing(jarvis) -> tuple[list[dict], float]:
    started = time.monotonic()
    body = requests.get(jarvis.url + "/debug/streams", timeout=5).json()
    return body["data"], time.monotonic() - started


@pytest.mark.serial  # measures the listing's latency with 50 streams open
def test_debug_streams_lists_every_open_stream_of_both_workers_with_its_phase(start_jarvis, upstream):
    from tests.fake_upstream import Scenario

    # Every page answer here comes from this one (loopback) client: let it run them all.
    jarvis = start_jarvis({"JARVIS_MAX_RUNS_PER_CLIENT": "100"}, args=["-w", "2"])
    workers = sorted(process.pid for process in jarvis.workers())
    expected, clients, conversations = {}, [], []
    for phase, fault in PHASES.items():
        for index in range(10):  # half on each worker
            trace_id = trace()
            clients.append(open_v1_stream(jarvis, fault, trace_id, workers[index % 2]))
            expected[trace_id] = phase
    upstream.scenario = Scenario(tokens=3000, interval=0.05)
    for index in range(10):
        trace_id = trace()
        conversations.append(open_detached_answer(jarvis, trace_id, workers[index % 2]))
        expected[trace_id] = "detached"
    upstream.wait_for(lambda up: len(up.exchanges) >= 50, timeout=15)

    def phases_reached():
        streams, _ = listing(jarvis)
        return len(streams) == 50 and {s["trace_id"]: s["phase"] for s in streams} == expected and streams

    streams = wait_until(phases_reached, 15, lambda: f"listed: {listing(jarvis)[0]}")
    for worker in workers:  # both workers' streams, each with its pid
        assert sum(stream["worker"] == worker for stream in streams) == 25
    assert all(stream["route"] == ("page" if expected[stream["trace_id"]] == "detached" else "/v1/chat/completions")
               for stream in streams)
    assert all(not stream["client_attached"] for stream in streams if stream["phase"] == "detached")
    timings = [listing(jarvis)[1] for _ in range(9)]
    print(f"/debug/streams with 50 streams on 2 workers: median {statistics.median(timings) * 1000:.1f} ms, "
          f"max {max(timings) * 1000:.1f} ms")
    assert statistics.median(timings) < 0.05

    for client in clients:
        client.close_rst()
        client.close()
    for conversation_id in conversations:
        requests.post(f"{jarvis.url}/api/conversations/{conversation_id}/stop", timeout=5)
    wait_until(lambda: listing(jarvis)[0] == [], 5, lambda: f"still listed: {listing(jarvis)[0]}")
    jarvis.wait_for_log("stream end", count=50)
    for line in jarvis.end_lines():  # the worker each stream was listed under is the one that ended it
        pid, trace_id = re.search(r"\] \[(\d+)\] \[INFO\] jarvis\.relay \[([0-9a-f]{32})\]", line).groups()
        listed = next((s for s in streams if s["trace_id"] == trace_id), None)
        assert listed is None or listed["worker"] == int(pid)


def test_a_usr1_dump_starts_with_one_line_per_open_stream(start_jarvis, upstream):
    jarvis = start_jarvis()
    ids = [trace() for _ in range(3)]
    clients = [open_v1_stream(jarvis, PHASES["answering"], trace_id) for trace_id in ids]
    for client in clients:
        client.read_until(b'"content": "')
    jarvis.send_signal(signal.SIGUSR1)
    log = jarvis.wait_for_log("==== end of jarvis stack dump")
    dump = log[log.index("==== jarvis stack dump"):].splitlines()
    assert dump[1] == "open streams: 3"
    summary = dump[2:5]
    assert sorted(re.search(r"stream ([0-9a-f]{32}) phase=answering age=", line).group(1) for line in summary) == \
        sorted(ids)
    for client in clients:
        client.close_rst()
        client.close()


@pytest.mark.long(6)
def test_the_doctor_tells_a_clean_path_from_a_buffering_and_a_gzipping_proxy(jarvis):
    as_sent, sentence, headers, arrivals = check(jarvis.url)
    print(f"direct: {sentence}")
    assert as_sent and "arrived as sent" in sentence and len(arrivals) == 10
    assert headers.get("X-Accel-Buffering") == "no" and "Content-Encoding" not in headers
    for compress in (False, True):
        proxy = BufferingProxy(jarvis.port, compress=compress)
        try:
            as_sent, sentence, headers, _ = check(proxy.url)
        finally:
            proxy.stop()
        print(f"{'gzip' if compress else 'buffering'} proxy: {sentence}")
        assert not as_sent and "arrived bunched" in sentence and headers.get("Via") == "1.1 buffering-proxy"
        assert ("Content-Encoding: gzip" in sentence) is compress


@pytest.mark.long
@pytest.mark.browser
def test_the_pages_check_streaming_gives_the_same_verdicts(jarvis, context):
    # A gzipping proxy bunches events as a buffering one does: the page gives the same verdict for both
    # (the doctor's test above tells them apart), so one proxy here.
    proxies = [BufferingProxy(jarvis.port)]
    try:
        for url, verdict in ((jarvis.url, "Events arrived as sent"), (proxies[0].url, "Events arrived bunched")):
            page, problems = open_page(context, url)
            page.get_by_role("button", name="Conversation settings").click()
            page.get_by_role("button", name="Check streaming").click()
            page.wait_for_function("() => /^(Events|Only)/.test(document.querySelector('#stream-check-result')"
                                   ".textContent)", timeout=15000)
            assert page.locator("#stream-check-result").inner_text().startswith(verdict), url
            problems.assert_clean()
            page.close()
    finally:
        for proxy in proxies:
            proxy.stop()


def test_debug_routes_need_the_key_when_one_is_set(start_jarvis):
    jarvis = start_jarvis({"JARVIS_API_KEY": KEY})
    for path in ("/debug/streams", "/debug/stream-check"):
        assert requests.get(jarvis.url + path, timeout=5).status_code == 401
    listed = requests.get(jarvis.url + "/debug/streams", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert listed.status_code == 200 and listed.json() == {"count": 0, "data": []}
    page = requests.get(jarvis.url + "/debug/streams?format=html", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=5)
    assert page.status_code == 200 and "Open streams: 0" in page.text
    as_sent, _, _, _ = check(jarvis.url, KEY)
    assert as_sent


@pytest.mark.long(8)
def test_the_doctor_names_nginx_and_its_fix_when_it_buffers_and_passes_the_readmes_config(jarvis, capsys):
    from jarvis.doctor import main
    from tests.nginx import BUFFERING_LOCATION, README_LOCATION, Nginx

    verdicts = {}
    for name, location in (("buffering", BUFFERING_LOCATION), ("the README's", README_LOCATION)):
        proxy = Nginx(jarvis.port, location).start()
        try:
            status = main([proxy.url, "--direct", jarvis.url])
        finally:
            proxy.stop()
        verdicts[name] = (status, capsys.readouterr().out)
        print(f"--- nginx, {name} config: exit {status}\n{verdicts[name][1]}", file=sys.stderr)  # (-s shows it)
    status, out = verdicts["buffering"]
    assert status == 1 and "PROBLEM: events arrived bunched" in out
    assert "nginx (Server: nginx/" in out and "is buffering this response; fix:" in out and "proxy_buffering off" in out
    assert "(as sent: the hop in between buffers)" in out
    status, out = verdicts["the README's"]
    assert status == 0 and "OK: events arrived as sent" in out and "fix:" not in out


@pytest.mark.parametrize(("accept", "html"), [
    ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8", True),  # Chromium
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),  # Firefox
    ("*/*", False), (None, False), ("application/json", False)])
def test_debug_streams_is_a_table_for_a_browser_and_json_for_everyone_else(client, backend, accept, html):
    response = client.get("/debug/streams", headers={"Accept": accept} if accept else {})
    assert response.status_code == 200
    if html:
        assert response.mimetype == "text/html" and b'http-equiv="refresh"' in response.data
        assert b"<script" not in response.data  # it refreshes itself with the CSP unchanged
    else:
        assert response.mimetype == "application/json" and response.json["count"] == 0


def test_debug_streams_names_the_model_a_request_without_one_is_answered_with(client, backend):
    from tests.fake_backend import STALL

    backend.model = "the-default-model"  # as JARVIS_MODEL is to an upstream (the embedded model: its file's name)
    backend.enqueue(["w0 ", STALL])
    stream = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "stream": True}, buffered=False)
    next(iter(stream.response))
    [listed] = client.get("/debug/streams").json["data"]
    assert listed["model"] == "the-default-model"
    stream.close()
