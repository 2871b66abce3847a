"""The page's everyday tools in Chromium: per-conversation settings, export and import, search, math, Copy,
shortcuts — and the hostile corpus, now with math and imported files, still inert."""

from __future__ import annotations

import json
import time

import pytest
import requests

from tests.browser import ASSISTANT, last_answer, open_page, send, wait_status
from tests.fake_upstream import Scenario
from tests.test_exchange import tree_of
from tests.test_page import _Canary
from tests.test_page import canary as canary  # noqa: F401 (the canary server, a fixture)

pytestmark = [pytest.mark.live, pytest.mark.browser, pytest.mark.shared_servers]


def test_a_system_prompt_and_temperature_set_in_the_page_reach_the_upstream(jarvis, upstream, context):
    page, problems = open_page(context, jarvis.url)
    page.get_by_role("button", name="Conversation settings").click()
    page.get_by_label("System prompt").fill("You are a pirate.")
    page.get_by_label("Temperature").fill("0.2")
    page.get_by_label("Max tokens").fill("50")
    page.get_by_role("button", name="Save").click()
    page.wait_for_selector("#settings-dialog:not([open])", state="attached")
    send(page, "hello")
    wait_status(page, "complete")
    body = upstream.chats[-1].body
    assert body["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert (body["temperature"], body["max_tokens"]) == (0.2, 50) and "top_p" not in body
    page.get_by_role("button", name="Conversation settings").click()
    page.get_by_label("Temperature").fill("7")
    page.get_by_role("button", name="Save").click()
    page.wait_for_selector("#settings-error:not([hidden])")
    assert "temperature" in page.locator("#settings-error").inner_text()
    assert [c for c in problems.console_errors if "400" not in c] == [] and problems.page_errors == []


def test_export_import_round_trip_and_a_malformed_file_imports_nothing(jarvis, upstream, context, tmp_path):
    page, problems = open_page(context, jarvis.url)
    upstream.scenario = Scenario(shape="llamacpp", reasoning_tokens=3, tokens=3)
    send(page, "think first")
    wait_status(page, "complete")
    upstream.scenario = Scenario(tokens=500, interval=0.02)
    send(page, "a long one")
    page.wait_for_function("() => document.querySelectorAll('[data-role=assistant] .content')[1]"
                           "?.textContent.length > 10")
    page.get_by_role("button", name="Stop", exact=True).click()
    wait_status(page, "stopped")
    upstream.scenario = Scenario(tokens=5, error_event_after=2)
    send(page, "and fail")
    wait_status(page, "error")
    page.get_by_role("button", name="Conversation settings").click()
    with page.expect_download() as download:
        page.get_by_role("link", name="Export JSON").click()
    exported_path = tmp_path / "export.json"
    download.value.save_as(exported_path)
    page.get_by_role("button", name="Cancel").click()
    exported = json.loads(exported_path.read_text())
    assert [m["status"] for m in exported["conversations"][0]["messages"]] == \
        ["complete", "complete", "complete", "stopped", "complete", "error"]

    original = page.evaluate("localStorage.getItem('jarvis.conversation')")
    page.set_input_files("#import-file", str(exported_path))
    page.wait_for_function("() => document.querySelector('#import-status').textContent.startsWith('Imported 1')")
    listed = requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"]
    assert len(listed) == 2
    new_id = next(c["id"] for c in listed if c["id"] != original)
    again = requests.get(f"{jarvis.url}/api/conversations/{new_id}/export", timeout=5).json()
    assert tree_of(again["conversations"][0]) == tree_of(exported["conversations"][0])  # ids are the store's own
    page.wait_for_function("id => localStorage.getItem('jarvis.conversation') === id", arg=new_id)  # opened
    assert page.locator(f"{ASSISTANT} .thinking-content").first.text_content().strip() == "r0 r1 r2"

    bad = tmp_path / "bad.json"
    broken = json.loads(exported_path.read_text())
    broken["conversations"].append({"title": "second", "messages": [{"role": "wizard", "content": "x"}]})
    bad.write_text(json.dumps(broken))
    page.set_input_files("#import-file", str(bad))
    page.wait_for_function("() => document.querySelector('#import-status').textContent.startsWith('Nothing')")
    assert "conversations[1].messages[0].role" in page.locator("#import-status").inner_text()
    assert len(requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"]) == 2
    assert [c for c in problems.console_errors if "400" not in c] == []


def test_search_finds_a_word_in_the_third_message_of_an_old_conversation_and_opens_it_there(jarvis, upstream,
                                                                                            context):
    upstream.scenario = Scenario(tokens=2)
    ids = []
    with requests.Session() as session:
        for number, words in enumerate([["apples", "pears"], ["a first question", "tell me about quokkas"],
                                        ["plums", "figs"]]):
            conversation_id = session.post(jarvis.url + "/api/conversations",
                                           json={"title": f"Old {number}"}).json()["id"]
            ids.append(conversation_id)
            for text in words:
                list(session.post(f"{jarvis.url}/api/conversations/{conversation_id}/messages",
                                  json={"content": text}, stream=True).iter_content(None))
    page, problems = open_page(context, jarvis.url)
    page.keyboard.press("/")
    page.keyboard.type("quokka")
    result = page.locator("#search-results button").first
    result.wait_for()
    assert page.locator("#search-results button").count() == 1
    assert result.locator("mark").inner_text().lower() == "quokkas"
    result.click()
    found = page.locator("article.found")
    found.wait_for()
    assert found.get_attribute("data-role") == "user" and found.inner_text().startswith("tell me about quokkas")
    assert page.evaluate("localStorage.getItem('jarvis.conversation')") == ids[1]
    index = page.evaluate("[...document.querySelectorAll('article.message')].indexOf("
                          "document.querySelector('article.found'))")
    assert index == 2  # the 3rd message
    problems.assert_clean()


MATH = {
    "inline": ("The area is $\\pi r^2$ here.", "math"),
    "display": ("$$\\int_0^1 x\\,dx = \\frac{1}{2}$$", "math[display=block]"),
    "brackets": ("Euler: \\(e^{i\\pi}+1=0\\)", "math"),
    "square": ("\\[\\sum_{n=1}^\\infty \\frac{1}{n^2}\\]", "math"),
}


def render(page, texts: list[str]) -> list[dict]:
    """Each text rendered by the page's renderer into the chat: its HTML, text and how long it took (ms)."""
    return page.evaluate("""async (texts) => {
        const page = document.querySelector('script[type=module]').src;  // the page's own module
        const { renderMarkdown } = await import(new URL('../markdown.js', page));
        return texts.map((text) => {
            const holder = document.createElement('div');
            holder.className = 'message assistant';
            const started = performance.now();
            holder.append(renderMarkdown(text));
            const ms = performance.now() - started;
            document.querySelector('#messages').append(holder);
            return { html: holder.innerHTML, text: holder.textContent, ms };
        });
    }""", texts)


def test_math_renders_in_prose_stays_literal_in_code_and_a_bad_formula_spoils_nothing(jarvis, context):
    page, problems = open_page(context, jarvis.url)
    samples = [text for text, _ in MATH.values()]
    samples += ["Code: `$x^2$` and\n\n```\n$$y$$\n```", "Costs $5 and $10 today.",
                "Broken $\\frac{1}{$ then **bold** and $x^2$ after."]
    results = render(page, samples)
    for (text, _shape), result in zip(MATH.values(), results, strict=False):
        assert "<math" in result["html"] and "\\" not in result["text"], (text, result)
    assert page.locator("#messages math[display=block]").count() >= 2
    code = results[4]
    assert "<math" not in code["html"] and "$x^2$" in code["text"] and "$$y$$" in code["text"]
    assert "<math" not in results[5]["html"] and results[5]["text"].strip() == "Costs $5 and $10 today."
    broken = results[6]
    assert "$\\frac{1}{$" in broken["text"] and "<strong>bold</strong>" in broken["html"]
    assert broken["html"].count("<math") == 1  # the good formula after the bad one still renders
    problems.assert_clean()


def test_copy_puts_the_exact_markdown_on_the_clipboard_and_code_copy_never_covers_code(jarvis, upstream, context):
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=jarvis.url)
    markdown = "**Bold** and `code`, $x^2$\n\n```python\nprint('first line')\n```"
    upstream.scenario = Scenario(content=markdown)
    page, problems = open_page(context, jarvis.url)
    send(page, "show me")
    wait_status(page, "complete")
    last_answer(page).locator(".copy-message").click()
    # The clipboard, polled (the button's "Copied" lasts 1.5 s, and under load the answer's actions may be
    # drawn anew by the page's sync with the server just after the click, taking the label with them).
    page.wait_for_function("async (markdown) => (await navigator.clipboard.readText()) === markdown",
                           arg=markdown, polling=50)
    page.locator(f"{ASSISTANT} .copy-code").click()
    assert page.evaluate("navigator.clipboard.readText()").rstrip("\n") == "print('first line')"
    button_box = page.locator(f"{ASSISTANT} .copy-code").bounding_box()
    code_box = page.locator(f"{ASSISTANT} pre code").bounding_box()
    line_top = code_box["y"] + float(page.evaluate(
        "parseFloat(getComputedStyle(document.querySelector('[data-role=assistant] pre code')).paddingTop) || 0"))
    assert button_box["y"] + button_box["height"] <= line_top + 0.5, (button_box, code_box)
    page.locator("body").click()
    page.keyboard.press("?")
    page.wait_for_selector("#help-dialog[open]")
    assert "Search conversations" in page.locator("#help-dialog").inner_text()
    page.keyboard.press("Escape")
    page.wait_for_selector("#help-dialog:not([open])", state="attached")
    problems.assert_clean()


def hostile_math(canary: str) -> list[str]:
    pwn = "window.__pwned=1"
    return [
        f"$\\href{{javascript:{pwn}}}{{click}}$",
        f"$\\href{{{canary}/href}}{{remote}}$",
        f"$\\url{{javascript:{pwn}}}$",
        "$\\htmlClass{evil}{x}$",
        "$\\htmlId{evil}{x}$",
        f"$\\htmlStyle{{background:url({canary}/style.png)}}{{x}}$",
        f"$\\htmlData{{onclick={pwn}}}{{x}}$",
        f"$\\includegraphics{{{canary}/graphic.png}}$",
        "$\\rule{100000em}{100000em}$",
        "$$" + "{" * 1500 + "x" + "}" * 1500 + "$$",
        "$" + "{" * 6000 + "x" + "}" * 6000 + "$",
        "$" + "\\def\\a{\\a\\a}\\a" + "$",
        "$" + "x^" * 3000 + "x$",
        f"$\\text{{<img src=x onerror={pwn}>}}$",
        f"$</math><img src=x onerror={pwn}>$",
    ]


@pytest.mark.serial  # measures how long each payload holds the page
def test_hostile_math_and_imported_files_stay_inert_and_never_freeze_the_page(jarvis, context, canary):
    page, problems = open_page(context, jarvis.url)
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    results = render(page, hostile_math(canary))
    slowest = max(result["ms"] for result in results)
    print(f"hostile math: slowest render {slowest:.1f} ms over {len(results)} payloads")
    # KaTeX's own limits (maxSize, maxExpand) bound each payload; without them one freezes the page for
    # seconds or for ever. Measured: tens of ms on a slow machine, so 0.5 s is far from both.
    assert slowest < 500, [round(result["ms"]) for result in results]
    dangerous = "script, iframe, img, style, link, a[href^=javascript], [style], [onerror], [onclick], [class*=evil]"
    assert page.locator(", ".join(f"#messages {s.strip()}" for s in dangerous.split(","))).count() == 0

    pwn = "window.__pwned=1"
    hostile_file = {"format": "jarvis.conversations", "version": 1, "conversations": [{
        "title": f"<img src=x onerror={pwn}>", "messages": [
            {"role": "user", "content": f"<script>{pwn}</script><b onmouseover={pwn}>hi</b>"},
            {"role": "assistant", "content": f"<svg onload={pwn}></svg> [x](javascript:{pwn}) ![i]({canary}/i.png)",
             "reasoning": f"<img src=x onerror={pwn}>", "status": "complete"}]}]}
    imported = requests.post(jarvis.url + "/api/conversations/import", json=hostile_file, timeout=5).json()["data"]
    page.evaluate("id => localStorage.setItem('jarvis.conversation', id)", imported[0])
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.locator("#title").inner_text() == f"<img src=x onerror={pwn}>"
    assert page.locator("article.message").count() == 2
    page.keyboard.press("/")
    page.keyboard.type("img")  # the hostile title in the search results, as text
    page.locator("#search-results button").first.wait_for()
    page.mouse.move(300, 300)
    time.sleep(0.2)  # give handlers a chance to fire, were there any
    assert page.locator("#app img, #app script, #app svg, #app [onerror], #app [onload], #app "
                        "[onmouseover]").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert _Canary.requests == []
    assert not [url for url in requested if not url.startswith(jarvis.url)], requested
    problems.assert_clean()
