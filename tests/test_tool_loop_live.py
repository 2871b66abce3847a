"""The tool loop on a real server: gunicorn (gevent worker) in front of the fake upstream playing a model that
calls tools (tests/fake_upstream.py: `tool_calls`, then "Tool said: <the last result>"), with real MCP servers:
mcp-server-time from PyPI and tests/mcp_test_server.py (the official SDK). The page in headless Chromium
watches the loop live, across a reload; Stop ends it while a tool runs; 20 loops at once never block the hub."""

from __future__ import annotations

import json
import sys
import threading
import time

import pytest
import requests

from tests.browser import answer_text, last_answer, open_page, send, wait_status
from tests.fake_upstream import Scenario
from tests.live import LiveServer, blocked_hub_reports, wait_until

pytestmark = pytest.mark.live


def tools_file(path, notes) -> str:
    servers = [("time", [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]),
               ("test", [sys.executable, "-m", "tests.mcp_test_server", str(notes)])]
    path.write_text("".join(f'[[mcp]]\nname = "{name}"\ncommand = {json.dumps(command)}\n\n'
                            for name, command in servers))
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, shared_upstream):
    """One Jarvis with the two tool servers for the module's tests (each has its own conversation)."""
    folder = tmp_path_factory.mktemp("tools")
    notes = folder / "notes"
    notes.touch()
    server = LiveServer(folder, {"JARVIS_UPSTREAM_URL": shared_upstream.url,
                                 "JARVIS_TOOLS_FILE": tools_file(folder / "tools.toml", notes)})
    server.notes = notes
    yield server.start()
    server.stop()


@pytest.fixture
def upstream(shared_upstream):
    return shared_upstream.reset()


def calls(name: str, **arguments) -> Scenario:
    return Scenario(tool_calls=[{"name": name, "arguments": json.dumps(arguments)}])


def notes_since(server, start: int) -> str:
    return server.notes.read_text()[start:]


@pytest.mark.long(13)
def test_the_page_shows_the_loop_live_through_a_reload_and_every_step_is_saved(served, upstream, context):
    upstream.scenario = calls("wait", seconds=2)
    page, problems = open_page(context, served.url)
    send(page, "Wait two seconds")
    running = last_answer(page).locator(".tool-call[data-state=running]")
    running.wait_for(timeout=30_000)
    assert "wait" in running.locator(".tool-name").inner_text()
    page.wait_for_function("() => /running… \\d+ of 20/.test(document.querySelector("
                           "'[data-role=assistant]:last-of-type .tool-status')?.textContent || '')", timeout=10_000)
    page.reload()  # mid-loop: the page re-attaches and gets the steps so far
    page.wait_for_selector("body[data-ready=true]")
    last_answer(page).locator(".tool-call").wait_for(timeout=10_000)
    try:
        wait_status(page, "complete", 30)
    except Exception as error:  # (once in five CI runs the page never showed the end: say what it showed)
        shown = page.evaluate("() => { const a = [...document.querySelectorAll('[data-role=assistant]')].at(-1);"
                              " return a && [a.dataset.status, a.querySelector('.error')?.textContent,"
                              " a.querySelector('.content')?.textContent.slice(-200)]; }")
        raise AssertionError(f"after the reload the answer showed {shown}; console errors "
                             f"{problems.console_errors}, page errors {problems.page_errors}; the server's log:\n"
                             f"{served.log()[-3000:]}") from error
    assert "Tool said: waited 2" in answer_text(page)
    done = last_answer(page).locator(".tool-call[data-state=done]")
    done.locator("summary").click()
    assert done.locator(".tool-result").inner_text().startswith("waited 2")
    # The model's second request: its call, then the tool's output under the call's id.
    first, second = upstream.chats[-2:]
    assert {"get_current_time", "convert_time", "wait", "stuck", "crash", "big", "learn"} == \
        {tool["function"]["name"] for tool in first.body["tools"]}
    assistant, tool = second.body["messages"][-2:]
    assert assistant["tool_calls"][0]["id"] == "call_fake_0001"
    assert assistant["tool_calls"][0]["function"]["name"] == "wait"
    assert (tool["role"], tool["tool_call_id"]) == ("tool", "call_fake_0001")
    assert tool["content"].startswith("waited 2")
    # Saved: a reload of the ended conversation shows the same block and answer.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    last_answer(page).locator(".tool-call[data-state=done]").wait_for(timeout=10_000)
    assert "Tool said: waited 2" in answer_text(page)
    # The settings list the tools with a switch each; one switched off is not offered any more.
    page.get_by_role("button", name="Conversation settings").click()
    page.locator("#setting-tools:not([hidden])").wait_for(timeout=30_000)
    page.get_by_label("wait", exact=True).uncheck()
    page.get_by_role("button", name="Save").click()
    page.locator("#settings-dialog").wait_for(state="hidden")  # (closed once the server has the settings)
    upstream.scenario = Scenario(tokens=2)
    send(page, "Thanks")
    wait_status(page, "complete", 30)
    offered = [tool["function"]["name"] for tool in upstream.chats[-1].body["tools"]]
    assert "wait" not in offered and "get_current_time" in offered
    problems.assert_clean()


def test_stop_while_a_tool_runs_ends_the_answer_and_the_server_hears_the_cancellation(served, upstream, context):
    upstream.scenario = calls("wait", seconds=60)
    start = len(served.notes.read_text())
    page, problems = open_page(context, served.url)
    page.get_by_role("button", name="+ New chat").click()  # (not the last test's conversation)
    send(page, "Wait a minute")
    last_answer(page).locator(".tool-call[data-state=running]").wait_for(timeout=30_000)
    wait_until(lambda: "started wait 60" in notes_since(served, start), 10, lambda: "the tool never started")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped", 10)
    wait_until(lambda: "cancelled wait" in notes_since(served, start), 10, lambda: "the server heard no cancellation")
    last_answer(page).locator(".tool-call[data-state=cancelled]").wait_for(timeout=5_000)
    upstream.scenario = calls("get_current_time", timezone="UTC")
    send(page, "What time is it?")
    wait_status(page, "complete", 30)
    assert '"timezone": "UTC"' in answer_text(page)  # the fake model quotes the real tool's answer
    problems.assert_clean()


def post_message(url: str, timeout: float = 60) -> tuple[list[dict], float]:
    conversation = requests.post(url + "/api/conversations", json={}, timeout=10).json()["id"]
    started = time.monotonic()
    response = requests.post(f"{url}/api/conversations/{conversation}/messages", json={"content": "Time?"},
                             timeout=timeout)
    events = [json.loads(line[6:]) for line in response.text.split("\n")
              if line.startswith("data: {")]
    return events, time.monotonic() - started


@pytest.mark.serial
def test_twenty_tool_loops_at_once_never_block_the_hub(tmp_path, upstream):
    notes = tmp_path / "notes"
    server = LiveServer(tmp_path, {"JARVIS_UPSTREAM_URL": upstream.url, "GEVENT_MAX_BLOCKING_TIME": "0.02",
                                   "JARVIS_MAX_RUNS_PER_CLIENT": "50",
                                   "JARVIS_TOOLS_FILE": tools_file(tmp_path / "tools.toml", notes)},
                        app="tests.every_report_app:app").start()
    try:
        upstream.scenario = calls("get_current_time", timezone="UTC")
        post_message(server.url)  # the servers start (a worker's first call)
        results = []
        threads = [threading.Thread(target=lambda: results.append(post_message(server.url))) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 20
        for events, _ in results:
            assert events[-1]["status"] == "complete"
            assert [e["tool_result"]["is_error"] for e in events if "tool_result" in e] == [False]
        # Every report printed (tests/every_report_app.py: not the first in 10 s), and those that caught the hub
        # in the tool client's code count: a wait there for the loop's thread that did not yield (the client
        # waiting with the real time.sleep: a report at each 20 ms check of the servers' start, and calls of
        # over 20 ms). Not the others: with one core kept busy, the worker not scheduled for 20 ms was
        # reported inside a call of microseconds (uuid4's os.urandom as a request began).
        reports = [report for report in blocked_hub_reports(server.log())
                   if "/jarvis/mcp_client.py" in report.split("Info:", 1)[0]]
        assert reports == [], f"{len(reports)} reports; the first:\n{reports[0][:3000]}"
    finally:
        server.stop()
