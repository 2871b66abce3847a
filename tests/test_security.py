"""Safe to expose, what only a real server shows: secrets kept out of logs, refused binds, redirects."""

import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.live import ROOT, sse_events
from tests.net import free_port

pytestmark = pytest.mark.live

UPSTREAM_CANARY = "sk-upstream-canary-5f1e0c9a7b"
CLIENT_CANARY = "client-canary-key-8d2b4a6c1e"


def test_non_loopback_bind_without_a_key_is_refused():
    env = {"PATH": "/usr/bin:/bin", "JARVIS_UPSTREAM_URL": "http://127.0.0.1:9/v1"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "--config", "gunicorn.conf.py", "--bind",
                             f"0.0.0.0:{free_port()}", "app:app"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0" in result.stderr and "JARVIS_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_canary_secrets_never_reach_the_logs(start_jarvis, upstream):
    jarvis = start_jarvis({"JARVIS_UPSTREAM_API_KEY": UPSTREAM_CANARY, "JARVIS_API_KEY": CLIENT_CANARY,
                           "JARVIS_LOG_LEVEL": "DEBUG"})
    good = {"Authorization": f"Bearer {CLIENT_CANARY}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    requests.get(jarvis.url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_CANARY}x"})
    requests.post(jarvis.url + "/v1/chat/completions", headers=good, json={"messages": "bad"})
    list(sse_events(requests.post(jarvis.url + "/v1/chat/completions", headers=good, stream=True,
                                  json={**body, "x_fault": {"error_event_after": 1}})))
    requests.post(jarvis.url + "/v1/chat/completions", headers=good, json={**body, "x_fault": {
        "status": 500, "error_body": {"error": {"message": "boom", "type": "x", "param": None, "code": None}}}})
    stopped = requests.post(jarvis.url + "/v1/chat/completions", headers=good, stream=True,
                            json={**body, "x_fault": {"tokens": 200, "interval": 0.02}})
    streaming = sse_events(stopped)  # kept: the stream stays open through the dump below
    next(streaming)
    with requests.Session() as browser:
        browser.post(jarvis.url + "/api/session", json={"key": CLIENT_CANARY})
        cookie = browser.cookies.get("jarvis_session")
        browser.get(jarvis.url + "/api/conversations")
    os.kill(jarvis.worker().pid, signal.SIGUSR1)
    stopped.close()
    jarvis.wait_for_log("==== end of jarvis stack dump")
    jarvis.wait_for_log("outcome=client_stop")
    assert upstream.chats[0].headers["authorization"] == f"Bearer {UPSTREAM_CANARY}"  # to the upstream only
    everything = jarvis.log() + jarvis.stderr_path.read_text()
    for secret in (UPSTREAM_CANARY, CLIENT_CANARY, cookie):
        assert secret and secret not in everything


def test_redirecting_upstream_is_not_followed(start_jarvis, upstream):
    jarvis = start_jarvis()
    response = jarvis.chat(fault={"status": 307, "error_body": {}})
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_redirect"
    assert len(upstream.exchanges) == 1
