"""Fixtures: the fault-injecting upstream and live gunicorn servers in front of it."""

from __future__ import annotations

import pytest

from tests.browser import browser, context  # noqa: F401 (fixtures for the browser tests)
from tests.fake_upstream import FakeUpstream
from tests.live import LiveServer


@pytest.fixture
def upstream():
    server = FakeUpstream()
    yield server
    server.stop()


@pytest.fixture
def start_jarvis(tmp_path, upstream):
    """Start gunicorn with the project's config in front of `upstream`; stopped after the test."""
    servers = []

    def start(env: dict | None = None, args: list[str] | None = None, app: str = "app:app",
              upstream_url: str | None = None) -> LiveServer:
        settings = {"JARVIS_UPSTREAM_URL": upstream_url or upstream.url}
        settings.update(env or {})
        server = LiveServer(tmp_path, settings, args, app)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def jarvis(start_jarvis):
    """Jarvis with default settings (heartbeat 5 s) in front of the fake upstream."""
    return start_jarvis()
