"""Accounts on a real server (two gevent workers): the operator's command while it runs, keys revoked on
every worker at once, and in Chromium one person's conversations nowhere in another's page."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from tests.browser import ASSISTANT, PageProblems, send, wait_status
from tests.clients import content_of
from tests.fake_upstream import Scenario
from tests.live import ROOT, sse_events, wait_until

pytestmark = [pytest.mark.live]


def users(server, *arguments: str, password: str | None = None) -> subprocess.CompletedProcess:
    """python -m jarvis.users with the server's own settings, as an operator runs it beside the server."""
    return subprocess.run([sys.executable, "-m", "jarvis.users", *arguments], cwd=ROOT, env=server.env,
                          input=None if password is None else password + "\n", capture_output=True, text=True,
                          timeout=60)


def test_the_first_account_turns_accounts_on_and_a_revoked_key_fails_on_every_worker(start_jarvis, upstream):
    server = start_jarvis(args=["-w", "2"])
    assert requests.get(server.url + "/api/conversations", timeout=5).status_code == 200  # no accounts: open
    added = users(server, "add", "alice", password="alice's password")
    assert added.returncode == 0, added.stderr
    # No restart: each worker asks once a second. Each request on a new connection, so both workers answer.
    wait_until(lambda: {requests.get(server.url + "/api/conversations", timeout=5).status_code
                        for _ in range(8)} == {401}, 5, lambda: "accounts mode never started on both workers")
    made = users(server, "key", "alice", "--label", "laptop")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = users(server, "keys", "alice").stdout.split()[0]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, headers=headers, stream=True,
                       timeout=30) as response:
        assert response.status_code == 200 and content_of(list(sse_events(response))) == "w0 w1 w2 w3 w4 "
    assert key not in users(server, "keys", "alice").stdout  # listed by id, never shown again
    assert users(server, "revoke", key_id).returncode == 0
    # Each request on a new connection: both workers answer some of them, and every one is refused.
    statuses = [requests.get(server.url + "/v1/models", headers=headers, timeout=5).status_code for _ in range(12)]
    assert statuses == [401] * 12
    assert key not in server.log()  # the key never reaches the log
    assert "alice's password" not in server.log()
    assert users(server, "remove", "nobody").returncode == 1


@pytest.mark.browser
def test_in_the_page_one_person_never_sees_anothers_conversations(start_jarvis, upstream, context):
    server = start_jarvis()
    for name in ("alice", "bob"):
        assert users(server, "add", name, password=f"{name}'s password").returncode == 0
    upstream.scenario = Scenario(tokens=3)
    page, problems = open_page_at_the_sign_in_form(context, server.url)
    sign_in(page, "alice")
    send(page, "alice's secret plans")
    wait_status(page, "complete")
    page.locator("#conversation-list li", has_text="alice's secret plans").wait_for()
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Name", exact=True).wait_for()
    sign_in(page, "bob")
    assert page.locator(ASSISTANT).count() == 0
    assert "secret plans" not in page.locator("body").inner_text()
    assert page.locator("#conversation-list li").count() == 0
    page.get_by_label("Search conversations").fill("secret")
    page.locator("#search-results li.none", has_text="Nothing found").wait_for()
    assert page.locator("#search-results li").count() == 1
    problems.assert_clean()


def open_page_at_the_sign_in_form(context, url: str):
    page = context.new_page()
    problems = PageProblems(page)
    page.goto(url)
    page.get_by_label("Name", exact=True).wait_for()
    return page, problems


def sign_in(page, name: str) -> None:
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_label("Password").fill(f"{name}'s password")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("body[data-ready=true]")
