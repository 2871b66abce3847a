"""Pictures and files in the chat page (headless Chromium): paste a picture, drop a PDF, send; the model gets
them; after a reload the message shows the thumbnail (which opens the picture) and the file's chip."""

from __future__ import annotations

import base64

import pytest
import requests

from tests.browser import open_page, wait_status
from tests.test_attachments import png, text_pdf

pytestmark = [pytest.mark.live, pytest.mark.browser, pytest.mark.shared_servers]

GIVE = """([kind, name, type, data]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type}));
  const target = kind === "paste" ? document.querySelector("#prompt") : document.querySelector("#composer");
  const event = kind === "paste"
    ? new ClipboardEvent("paste", {clipboardData: transfer, bubbles: true, cancelable: true})
    : new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true});
  target.dispatchEvent(event);
}"""


@pytest.mark.long(6)
def test_a_pasted_picture_and_a_dropped_pdf_are_sent_and_shown_after_a_reload(jarvis, upstream, context):
    picture, pdf = png(30, 20, (250, 10, 10)), text_pdf("The invoice total is 99 euros")
    page, problems = open_page(context, jarvis.url)
    page.evaluate(GIVE, ["paste", "screenshot.png", "image/png", base64.b64encode(picture).decode()])
    page.evaluate(GIVE, ["drop", "invoice.pdf", "application/pdf", base64.b64encode(pdf).decode()])
    page.locator(".attach-pending img").wait_for()  # the picture's thumbnail, before sending
    page.locator(".attach-pending", has_text="invoice.pdf").wait_for()
    page.get_by_label("Message").fill("What do these say?")
    page.get_by_role("button", name="Send").click()
    wait_status(page, "complete")
    [exchange] = upstream.chats
    text, image = exchange.body["messages"][-1]["content"]
    assert "The invoice total is 99 euros" in text["text"] and text["text"].startswith("What do these say?")
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == picture
    # The context meter: the branch's tokens (the answer's usage) against the upstream's context (its /props).
    meter = page.locator("#context-meter")
    meter.wait_for()
    assert meter.inner_text().endswith("/ 4.1k tokens of context"), meter.inner_text()
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    thumbnail = page.locator("[data-role=user] .attached img")
    thumbnail.wait_for()
    assert page.locator("[data-role=user] .attach-chip").inner_text() == "invoice.pdf"
    opened = page.locator("[data-role=user] .attached a").first.get_attribute("href")
    assert opened.startswith("/api/files/")
    assert page.evaluate("url => fetch(url).then((r) => r.arrayBuffer()).then((b) => b.byteLength)", opened) == \
        len(picture)
    assert page.evaluate("() => document.querySelector('[data-role=user] .attached img').naturalWidth") == 30
    assert not page.locator(".attachments").is_visible()  # the tray emptied when the message went
    problems.assert_clean()
    assert requests.get(jarvis.url + opened, timeout=5).headers["X-Content-Type-Options"] == "nosniff"
    conversation_id = page.evaluate("() => localStorage.getItem('jarvis.conversation')") or \
        requests.get(jarvis.url + "/api/conversations", timeout=5).json()["data"][0]["id"]
    measured = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}/context", timeout=5).json()
    saved = requests.get(f"{jarvis.url}/api/conversations/{conversation_id}", timeout=5).json()["messages"][-1]
    assert measured == {"used": saved["stats"]["prompt_tokens"] + saved["stats"]["completion_tokens"],
                        "estimated": False, "window": 4096}
