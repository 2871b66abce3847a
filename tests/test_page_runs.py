"""The answer belongs to the server (Chromium and live gunicorn): reloads, closed tabs, two tabs, lost
networks and dead workers never stop it; Stop always does, from any tab and any worker."""

import concurrent.futures
import os
import signal
import statistics
import threading
import time

import pytest
import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from jarvis import leases
from jarvis.runs import FOLLOW_SECONDS, TICK_SECONDS, WATCHED_FLUSH_SECONDS
from tests.browser import POLL_MS, answer_text, last_answer, open_page, send, wait_status, wait_text_longer
from tests.clients import data_of, page_text
from tests.fake_upstream import Scenario
from tests.live import LiveServer, sse_events, wait_until
from tests.proxy import CuttableProxy

# Stop (or a closed tab) -> the upstream's connection closed. A Stop that never reached the upstream leaves
# it running for the whole answer (seconds: 400-1,000 tokens at 20 ms); a Stop that works closes it in
# milliseconds -- up to ~0.1 s through Chromium on a slow machine. 1 s is far from both; the promise itself
# (milliseconds) is measured by bench/run.py and quoted in the README.
STOP_LIMIT = 1.0
# The same, asked on another worker: its tick (TICK_SECONDS) turns the flag in the store into the cancel.
STOP_ELSEWHERE_LIMIT = TICK_SECONDS + STOP_LIMIT

pytestmark = [pytest.mark.live, pytest.mark.shared_servers]

# A six-second answer, as a slow model writes one (every token costs the page, Jarvis and the fake
# upstream CPU; the tests below wait on time, not on tokens, so fewer of them at a slower pace check the
# same things for a third of the work).
SLOW_ANSWER = Scenario(tokens=100, interval=0.06)
ALL_100 = " ".join(f"w{i}" for i in range(100))


def message_id(page) -> str:
    page.wait_for_function("() => [...document.querySelectorAll('[data-role=assistant]')].at(-1)?.dataset.id")
    return last_answer(page).get_attribute("data-id")


def never_cancelled(upstream, exchange):
    upstream.wait_until_ended(exchange, timeout=15)
    assert exchange.closed_at is None and exchange.finished_at is not None, "the upstream was closed early"


@pytest.mark.long
@pytest.mark.browser
def test_a_reload_mid_answer_finds_it_still_streaming_to_the_last_token(jarvis, upstream, context):
    upstream.scenario = SLOW_ANSWER
    page, problems = open_page(context, jarvis.url)
    send(page, "a hundred words please")
    exchange = upstream.wait_for_exchange()
    before = message_id(page)
    upstream.wait_for_tokens(exchange, 25)  # 1.5 s in
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "streaming")
    assert message_id(page) == before
    shown = len(answer_text(page))
    wait_text_longer(page, shown + 20)  # it keeps growing in the page
    wait_status(page, "complete", timeout=15)
    assert answer_text(page).strip() == ALL_100
    never_cancelled(upstream, exchange)
    problems.assert_clean()


@pytest.mark.long
@pytest.mark.browser
def test_a_tab_closed_and_reopened_3_s_later_finds_the_answer_still_streaming(jarvis, upstream, context):
    upstream.scenario = SLOW_ANSWER
    page, _ = open_page(context, jarvis.url)
    send(page, "a hundred words please")
    wait_text_longer(page, 20)
    page.close()
    time.sleep(3)  # the moment of reopening: 3 s later
    exchange = upstream.wait_for_exchange()
    assert not exchange.ended
    reopened, problems = open_page(context, jarvis.url)
    wait_status(reopened, "complete", timeout=15)
    assert answer_text(reopened).strip() == ALL_100
    never_cancelled(upstream, exchange)
    problems.assert_clean()


@pytest.mark.browser
def test_two_tabs_both_see_the_answer_grow_and_stop_in_one_stops_both(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    first, first_problems = open_page(context, jarvis.url)
    send(first, "one answer, two tabs")
    wait_text_longer(first, 10)
    second, second_problems = open_page(context, jarvis.url)  # the same conversation (the last one open)
    wait_status(second, "streaming")
    for page in (first, second):
        wait_text_longer(page, len(answer_text(page)) + 15)
    exchange = upstream.wait_for_exchange()
    second.get_by_role("button", name="Stop", exact=True).click()
    for page in (first, second):
        wait_status(page, "stopped")
    assert upstream.wait_until_ended(exchange, timeout=2).closed_at is not None
    assert answer_text(first).strip() and answer_text(second).strip()
    first_problems.assert_clean()
    second_problems.assert_clean()


@pytest.mark.serial
@pytest.mark.browser
def test_stop_after_a_reload_closes_the_upstream_within_250_ms(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    page, problems = open_page(context, jarvis.url)
    send(page, "long answer")
    wait_text_longer(page, 20)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "streaming")
    wait_text_longer(page, len(answer_text(page)) + 5)
    exchange = upstream.wait_for_exchange()
    clicked = time.monotonic()
    page.evaluate("document.querySelector('#stop').click()")
    upstream.wait_until_ended(exchange, timeout=2)
    assert exchange.closed_at is not None and exchange.closed_at - clicked < STOP_LIMIT
    wait_status(page, "stopped")
    shown = answer_text(page).strip()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "stopped")
    assert shown and answer_text(page).strip().startswith(shown[:20])
    problems.assert_clean()


@pytest.mark.serial
@pytest.mark.browser
def test_nobody_watching_for_detached_seconds_stops_the_answer(start_jarvis, upstream, context):
    jarvis = start_jarvis({"JARVIS_DETACHED_SECONDS": "1"})
    upstream.scenario = Scenario(tokens=1000, interval=0.02)
    page, _ = open_page(context, jarvis.url)
    send(page, "long answer")
    wait_text_longer(page, 20)
    conversation_id = page.evaluate("localStorage.getItem('jarvis.conversation')")
    closed = time.monotonic()
    page.close()
    exchange = upstream.wait_until_ended(upstream.wait_for_exchange(), timeout=5)
    assert exchange.closed_at is not None and 1.0 <= exchange.closed_at - closed < 1.0 + STOP_LIMIT, \
        exchange.closed_at - closed
    print(f"\ndetached: upstream closed {exchange.closed_at - closed:.2f} s after the last tab closed")
    jarvis.wait_for_log("outcome=detached")
    saved = wait_until(lambda: (m := requests.get(f"{jarvis.url}/api/conversations/{conversation_id}").json()
                                ["messages"][-1])["status"] == "stopped" and m, 5, lambda: "never saved stopped")
    assert "Nobody was watching" in saved["error"] and saved["content"]


@pytest.mark.serial
@pytest.mark.browser
def test_with_detached_seconds_0_closing_the_tab_cancels_within_100_ms(start_jarvis, upstream, context):
    jarvis = start_jarvis({"JARVIS_DETACHED_SECONDS": "0"})
    upstream.scenario = Scenario(tokens=1000, interval=0.02)
    page, _ = open_page(context, jarvis.url)
    send(page, "long answer")
    wait_text_longer(page, 20)
    closed = time.monotonic()
    page.close()
    exchange = upstream.wait_until_ended(upstream.wait_for_exchange(), timeout=5)
    assert exchange.closed_at is not None and exchange.closed_at - closed < STOP_LIMIT
    jarvis.wait_for_log("outcome=client_stop")
    reopened, problems = open_page(context, jarvis.url)  # the answer kept as far as it went, stopped
    wait_status(reopened, "stopped")
    assert len(answer_text(reopened)) > 20
    problems.assert_clean()


@pytest.mark.browser
def test_a_lost_network_reconnects_and_ends_with_the_whole_answer(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=150, interval=0.02)
    proxy = CuttableProxy(jarvis.port)
    try:
        page, problems = open_page(context, proxy.url)
        send(page, "a hundred and fifty words please")
        wait_text_longer(page, 30)
        assert proxy.cut() >= 1  # the network drops, no Stop
        page.wait_for_function("() => [...document.querySelectorAll('[data-role=assistant] .error')].at(-1)"
                               "?.textContent.includes('Reconnecting')")
        wait_status(page, "complete", timeout=20)
        assert answer_text(page).strip() == " ".join(f"w{i}" for i in range(150))
        never_cancelled(upstream, upstream.wait_for_exchange())
        # Chromium reports the cut itself ("Failed to load resource: net::ERR_..."): that is the network failing.
        assert [m for m in problems.console_errors if not m.startswith("Failed to load resource: net::")] == []
        assert problems.page_errors == [] and problems.rejections() == []
    finally:
        proxy.stop()


@pytest.mark.browser
def test_a_worker_killed_mid_answer_leaves_it_interrupted_and_a_new_prompt_works(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=1000, interval=0.02)
    page, problems = open_page(context, jarvis.url)
    send(page, "long answer")
    wait_text_longer(page, 20)
    conversation_id = page.evaluate("localStorage.getItem('jarvis.conversation')")
    wait_until(lambda: requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=2).json()[
        "messages"][-1]["content"], 5, lambda: "nothing saved")  # (else there is nothing to continue)
    killed = time.monotonic()
    os.kill(jarvis.worker().pid, signal.SIGKILL)

    def interrupted():
        try:
            return requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=2).json()[
                "messages"][-1]["status"] == "interrupted"
        except requests.RequestException:
            return False  # the master is still replacing the worker

    wait_until(interrupted, leases.LEASE_SECONDS + 1, lambda: "not interrupted within the lease time + 1 s")
    print(f"worker killed -> answer interrupted: {time.monotonic() - killed:.2f} s")
    wait_status(page, "interrupted", timeout=15)  # the page re-attached to the new worker and was told
    assert answer_text(page).strip()
    saved = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=5).json()["messages"][-1]
    upstream.scenario = Scenario(content="and the rest.")
    last_answer(page).get_by_role("button", name="Continue").click()  # the interrupted answer goes on
    wait_status(page, "complete")
    assert upstream.chats[-1].body["messages"][-1] == {"role": "assistant", "content": saved["content"]}
    assert answer_text(page) == (saved["content"] + "and the rest.").strip()
    again = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=5).json()["messages"][-1]
    assert again["id"] == saved["id"]  # the same message, grown
    upstream.scenario = Scenario(tokens=3)
    send(page, "still there?")
    wait_status(page, "complete")
    assert answer_text(page).strip() == "w0 w1 w2"
    assert problems.page_errors == [] and problems.rejections() == []


# -- two workers: a page on one, the answer on the other ----------------------------------------------------

def sessions_by_worker(jarvis, wanted: list[int]) -> list[list[requests.Session]]:
    """Keep-alive sessions pinned to distinct workers (a connection stays with the worker that accepted
    it): `wanted[i]` sessions on the i-th worker found. Bounded in time (see raw_client_on)."""
    pinned: dict[int, list[requests.Session]] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        session = requests.Session()
        worker = session.get(jarvis.url + "/healthz", timeout=5).json()["worker"]
        pinned.setdefault(worker, []).append(session)
        ranked = sorted(pinned.values(), key=len, reverse=True)
        if len(ranked) >= len(wanted) and all(len(ranked[i]) >= count for i, count in enumerate(sorted(
                wanted, reverse=True))):
            chosen = [ranked[i][:count] for i, count in enumerate(sorted(wanted, reverse=True))]
            _close_all_but(pinned, chosen)
            return chosen
    _close_all_but(pinned, [])
    raise AssertionError(f"reached only workers {list(pinned)}")


def _close_all_but(pinned: dict[int, list[requests.Session]], chosen: list[list[requests.Session]]) -> None:
    """Close the sessions not handed out: left to the garbage collector, their sockets would be found
    unclosed in whichever later test it runs in."""
    kept = {id(session) for group in chosen for session in group}
    for sessions in pinned.values():
        for session in sessions:
            if id(session) not in kept:
                session.close()


def follow_lags(session, url: str, count: int) -> list[float]:
    """Seconds from the upstream sending each stamped token to its arrival at a page that attaches now,
    for `count` tokens sent after it attached (what came before arrives at once, as catch-up)."""
    attached = time.monotonic()
    response = session.get(url, stream=True, timeout=30)
    lags = []
    for kind, value, arrived in sse_events(response):
        if kind == "data" and value.get("choices"):
            stamps = [float(stamp) for stamp in value["choices"][0]["delta"].get("content", "").split("|") if stamp]
            lags.extend(arrived - stamp for stamp in stamps if stamp > attached)
            if len(lags) >= count:
                break
    response.close()
    return lags


@pytest.mark.serial
def test_a_stop_and_a_page_on_another_worker_reach_the_answer(start_jarvis, upstream):
    jarvis = start_jarvis(args=["-w", "2"])
    (owner, beside), (other,) = sessions_by_worker(jarvis, [2, 1])
    upstream.scenario = Scenario(tokens=1000, interval=0.02, stamp=True)
    conversation_id = owner.post(jarvis.url + "/api/conversations", json={}).json()["id"]
    answer = owner.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages", json={"content": "go"},
                        stream=True, timeout=30)
    message = answer.headers["X-Message-Id"]
    events = sse_events(answer)
    seen = [next(event for event in events if event[0] == "data")]

    # A second page on the same worker gets the live events; one on the other worker follows the store.
    stream_path = f"{jarvis.url}/api/conversations/{conversation_id}/messages/{message}/stream"
    with concurrent.futures.ThreadPoolExecutor(2) as followers:  # both pages at once
        same, elsewhere = followers.map(lambda session: follow_lags(session, stream_path, 100), (beside, other))
    for where, lags in (("the same worker", same), ("another worker", elsewhere)):
        print(f"re-attach on {where}: lag p50 {statistics.median(lags) * 1000:.1f} ms, "
              f"max {max(lags) * 1000:.1f} ms over {len(lags)} tokens")
    # Medians, against the intervals that make them: on the same worker the live events (a few ms; read
    # from the store they would lag by FOLLOW_SECONDS on average); elsewhere the store, flushed every
    # WATCHED_FLUSH_SECONDS while followed and read every FOLLOW_SECONDS (at the unwatched FLUSH_SECONDS
    # the median would be above their sum). A slow machine moves the tail, not these.
    assert statistics.median(same) < FOLLOW_SECONDS / 2, same
    assert statistics.median(elsewhere) < WATCHED_FLUSH_SECONDS + FOLLOW_SECONDS, elsewhere

    exchange = upstream.wait_for_exchange()
    asked = time.monotonic()
    assert other.post(f"{jarvis.url}/api/conversations/{conversation_id}/stop").status_code == 202
    upstream.wait_until_ended(exchange, timeout=2)
    print(f"Stop on another worker -> upstream closed: {(exchange.closed_at - asked) * 1000:.0f} ms")
    assert exchange.closed_at is not None and exchange.closed_at - asked < STOP_ELSEWHERE_LIMIT
    seen += list(events)
    assert seen[-1][0] == "done" and seen[-2][1]["status"] == "stopped"
    shown = page_text(data_of(seen))[1]
    assert shown.count("|") >= 100  # the tokens the other pages followed went to the owner too
    saved = wait_until(lambda: (m := owner.get(f"{jarvis.url}/api/conversations/{conversation_id}").json()[
        "messages"][-1])["status"] == "stopped" and m, 5, lambda: "the stopped answer was never saved")
    assert saved["content"] == shown  # what the page showed is what was kept
    for session in (owner, beside, other):
        session.close()


@pytest.mark.browser  # no timing judged (its waits are generous): it runs in the parallel phase
@pytest.mark.model
def test_a_prompt_queued_behind_a_detached_answer_says_so_and_can_stop_it(tmp_path, context):
    """The embedded model with one slot writes one answer at a time: the page names the one ahead and offers to
    stop it."""
    jarvis = LiveServer(tmp_path, {"JARVIS_HEARTBEAT_SECONDS": "0.25", "JARVIS_LOCAL_SLOTS": "1",
                                   "JARVIS_LOCAL_MAX_TOKENS": "64"}).start()
    try:
        # The first answer must still be running when Stop is clicked: at the default 512 tokens it lasted
        # ~7 s, and once (a fresh clone's parallel phase) had ended on its own by then. Its conversation's
        # own max_tokens, 3,000 (~40 s), outlasts the test's steps on any machine; it is stopped long before.
        # The second answer gets the server's default, 64 here (JARVIS_LOCAL_MAX_TOKENS): at the built-in 512
        # a rambling one outlasted the 30 s wait for its end at half speed in the parallel phase. Temperature
        # 0: the first answer is the same every run (a long line of digits). An empty conversation is not
        # listed, so the page opens one imported with a first exchange.
        conversation = {"title": "Count from 1 to 400", "settings": {"max_tokens": 3000, "temperature": 0},
                        "messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]}
        first = requests.post(f"{jarvis.url}/api/conversations/import", timeout=10, json={
            "format": "jarvis.conversations", "version": 1, "conversations": [conversation]}).json()["data"][0]
        page, problems = open_page(context, jarvis.url)
        page.evaluate("id => localStorage.setItem('jarvis.conversation', id)", first)
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        send(page, "Count from 1 to 400, separated by commas.")
        wait_text_longer(page, 20)
        assert page.evaluate("localStorage.getItem('jarvis.conversation')") == first
        page.get_by_role("button", name="+ New chat").click()  # the first answer runs on, unwatched
        page.wait_for_function(f"() => localStorage.getItem('jarvis.conversation') !== {first!r}")
        send(page, "Say hello.")
        page.get_by_text("Waiting for another answer to finish").wait_for(timeout=5000)
        # The other conversation, marked running (this one is listed and running too: it waits for the model).
        assert page.locator("nav li.running", has_text="Count from 1 to 400").count() == 1
        # The waiting note comes again with every heartbeat (0.25 s here). Its button must stay the same node:
        # replaced each time, a click whose press and release straddled the swap was lost (the answer ahead
        # then ran to its end). A build that replaces it does so within one heartbeat; four are allowed (1 s,
        # during which the model writes the answer ahead: at 0.5 s and 2 s the test cost 6.8 CPU-s).
        stop_it = last_answer(page).get_by_role("button", name="Stop it")
        stop_it.evaluate("button => { button.dataset.shown = 'first'; }")
        with pytest.raises(PlaywrightTimeout):
            page.wait_for_function("() => !document.querySelector('[data-shown=first]')", timeout=1000,
                                   polling=POLL_MS)
        stop_it.click()
        wait_status(page, "complete", timeout=30)
        assert answer_text(page).strip()
        saved = requests.get(f"{jarvis.url}/api/conversations/{first}").json()["messages"][-1]
        assert saved["status"] == "stopped" and saved["content"]
        problems.assert_clean()
    finally:
        jarvis.stop()


@pytest.mark.parametrize("workers", [1, 2])
def test_two_sends_to_one_conversation_at_the_same_instant_start_one_answer(start_jarvis, upstream, workers):
    jarvis = start_jarvis(args=["-w", str(workers)])
    first, second = [group[0] for group in sessions_by_worker(jarvis, [1, 1])] if workers == 2 else \
        sessions_by_worker(jarvis, [2])[0]
    # The answer holds after two tokens until the test stops it: on a slow hour the second send arrived after
    # a 0.16 s answer had ended, and was rightly answered (1 failure in 766 tests with one core kept busy).
    upstream.scenario = Scenario(tokens=8, stall_after=2)
    outcomes = []

    def send_now(session, url, together, statuses):
        together.wait()
        response = session.post(url, json={"content": "at once"}, stream=True, timeout=30)
        statuses.append(response.status_code)
        response.content  # noqa: B018 (read it to the end)

    for _ in range(20):
        conversation_id = first.post(jarvis.url + "/api/conversations", json={}).json()["id"]
        url = f"{jarvis.url}/api/conversations/{conversation_id}/messages"
        together, statuses = threading.Barrier(2), []
        threads = [threading.Thread(target=send_now, args=(session, url, together, statuses))
                   for session in (first, second)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(statuses) == 2, 10, lambda: f"only {statuses} answered")  # noqa: B023
        first.post(f"{jarvis.url}/api/conversations/{conversation_id}/stop", timeout=10)
        for thread in threads:
            thread.join(30)
        outcomes.append(sorted(statuses))
        messages = first.get(f"{jarvis.url}/api/conversations/{conversation_id}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]
    assert outcomes == [[200, 409]] * 20
    first.close()
    second.close()
