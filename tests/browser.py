"""Headless Chromium (Debian's) driven by Playwright, with every console error and rejection recorded.

One browser per test process, and one browser context in it, whose tab is handed from test to test: a
test's first `open_page` navigates the tab the last test left instead of opening a new one. A new context
and tab cost Chromium a renderer process: measured with Jarvis's page (open it, one short answer), 1.47-
1.65 CPU-s and 0.77-0.86 s a test, against 0.67-0.73 CPU-s and 0.42-0.46 s reusing the tab, about 40 of
the parallel phase's ~330 CPU-s. Between tests the context is made as a new one is: every other tab
closed, the kept tab's document unloaded (its streams end as a closed tab's would), the test's listeners
removed, cookies, permissions, every origin's storage and the HTTP cache cleared. A tab a test changed
beyond that (`private_page`) is closed instead, and the next test gets a new tab in the same context
(a new tab costs ~0.3 CPU-s, a new context ~1); every tab of a test that failed goes with its context.
"""

from __future__ import annotations

from urllib.parse import urlsplit

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


def _described(message) -> str:
    """A console error's text; for a request that failed ("Failed to load resource: ... 401"), which one."""
    url = (message.location or {}).get("url") or ""
    return f"{message.text} ({url})" if message.text.startswith("Failed to load resource") and url else message.text


class PageProblems:
    """Console errors, page errors and unhandled rejections seen by a page."""

    def __init__(self, page):
        self.page = page
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self._listeners = [("console", lambda message: self.console_errors.append(_described(message))
                            if message.type == "error" else None),
                           ("pageerror", lambda error: self.page_errors.append(str(error)))]
        for event, listener in self._listeners:
            page.on(event, listener)

    def detach(self):
        for event, listener in self._listeners:
            self.page.remove_listener(event, listener)

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


VIEWPORT = {"width": 1100, "height": 800}


class _Tabs:
    """The shared context of a test process, and the tab kept in it for the next test."""

    def __init__(self, browser):
        self.browser = browser
        self.context = None
        self.spare = None  # the tab the last test left, at about:blank
        self.problems: dict = {}  # tab -> its PageProblems, for open_page's tabs
        self.private: set = set()  # tabs changed beyond what is cleared between tests
        self.origins: set[str] = set()  # every origin a tab showed since the last hand-over
        self._renew()

    def _renew(self):
        if self.context is not None:
            _TABS.pop(self.context, None)
            self.context.close()
        self.context = self.browser.new_context(viewport=VIEWPORT)
        self.context.add_init_script(RECORD_REJECTIONS)
        self.context.on("page", lambda page: page.on("framenavigated", self._seen))
        self.spare = None
        _TABS[self.context] = self

    def _seen(self, frame):
        parts = urlsplit(frame.url)
        if parts.scheme in ("http", "https"):
            self.origins.add(f"{parts.scheme}://{parts.netloc}")

    def hand_over(self, keep: bool):
        """Make the context as a new one would be, keeping one tab (see the module): the test's, or when it
        left none to keep (it closed its tab, or changed it: `private_page`) a new tab in the context. A
        test that failed leaves nothing: a new context."""
        try:
            if not keep:
                self._renew()
                return
            open_tabs = [page for page in self.context.pages if not page.is_closed()]
            reusable = [page for page in open_tabs if page in self.problems and page not in self.private]
            self.spare = reusable[0] if reusable else self.context.new_page()
            for page in open_tabs:
                if page is not self.spare:
                    page.close()
            if self.spare in self.problems:
                self.problems[self.spare].detach()
            self.spare.goto("about:blank")  # unloads the test's document: its fetches end
            self.spare.unroute_all()
            self.context.clear_cookies()
            self.context.clear_permissions()
            session = self.context.new_cdp_session(self.spare)
            try:
                for origin in self.origins:
                    session.send("Storage.clearDataForOrigin", {"origin": origin, "storageTypes": "all"})
                session.send("Network.clearBrowserCache")
            finally:
                session.detach()
        except Exception:
            self._renew()  # a tab that would not be cleaned is not handed on
            raise
        finally:
            self.problems.clear()
            self.private.clear()
            self.origins.clear()


_TABS: dict = {}  # context -> its _Tabs


@pytest.fixture(scope="session")
def _tabs(browser):
    tabs = _Tabs(browser)
    yield tabs
    _TABS.pop(tabs.context, None)
    tabs.context.close()


@pytest.fixture
def context(_tabs, request):
    yield _tabs.context
    failed = any(getattr(request.node, f"outcome_{phase}", "passed") == "failed" for phase in ("setup", "call"))
    _tabs.hand_over(keep=not failed)


def private_page(page):
    """Mark a tab a test changes beyond what is cleared between tests (an init script, say): it is closed
    after the test instead of being handed to the next."""
    for tabs in _TABS.values():
        if page.context is tabs.context:
            tabs.private.add(page)
    return page


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
    """A tab showing Jarvis's page at `url`, ready; the shared context's spare tab if it has one."""
    tabs = _TABS.get(context)
    if tabs is not None and tabs.spare is not None and not tabs.spare.is_closed():
        page, tabs.spare = tabs.spare, None
    else:
        page = context.new_page()
    problems = PageProblems(page)
    if tabs is not None:
        tabs.problems[page] = problems
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page, problems

