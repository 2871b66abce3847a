"""Headless Chromium (Debian's) driven by Playwright, with every console error and rejection recorded."""

from __future__ import annotations

import pytest

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

RECORD_REJECTIONS = """
window.__rejections = [];
window.addEventListener("unhandledrejection", (event) => {
  window.__rejections.push(String(event.reason && (event.reason.stack || event.reason)));
});
"""


class PageProblems:
    """Console errors, page errors and unhandled rejections seen by a page."""

    def __init__(self, page):
        self.page = page
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", lambda message: self.console_errors.append(message.text)
                if message.type == "error" else None)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))

    def rejections(self) -> list[str]:
        return self.page.evaluate("window.__rejections || []")

    def assert_clean(self):
        assert self.console_errors == [], self.console_errors
        assert self.page_errors == [], self.page_errors
        assert self.rejections() == []


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    context.add_init_script(RECORD_REJECTIONS)
    yield context
    context.close()


ASSISTANT = "[data-role=assistant]"
# How often a wait_for_function checks its condition, in ms. Playwright's default ("raf") checks on every
# animation frame, which keeps the page drawing 60 frames a second for as long as a test waits: measured
# 0.04-0.2 s of Chromium's CPU per second of waiting, where a 20 ms interval costs ~0.01 s.
POLL_MS = 20


def send(page, text: str):
    page.get_by_label("Message").fill(text)
    page.get_by_role("button", name="Send").click()


def last_answer(page):
    return page.locator(ASSISTANT).last


def answer_text(page) -> str:
    return last_answer(page).locator(".content").inner_text()


def wait_text_longer(page, length: int, timeout: float = 10):
    page.wait_for_function(
        "length => { const all = document.querySelectorAll('[data-role=assistant] .content');"
        " return all.length && all[all.length - 1].textContent.length > length; }", arg=length,
        timeout=timeout * 1000, polling=POLL_MS)


def wait_status(page, status: str, timeout: float = 10):
    page.wait_for_function(
        "status => { const all = document.querySelectorAll('[data-role=assistant]');"
        " return all.length && all[all.length - 1].dataset.status === status; }", arg=status,
        timeout=timeout * 1000, polling=POLL_MS)


def open_page(context, url: str):
    page = context.new_page()
    problems = PageProblems(page)
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page, problems
