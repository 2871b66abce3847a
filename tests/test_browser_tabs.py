"""The browser tests' shared tab (tests/browser.py): handed to the next test only as a new context's would
be, with nothing of the last test's left in it."""

import http.server
import threading

import pytest

from tests.browser import open_page

pytestmark = [pytest.mark.live, pytest.mark.browser]

PAGE = b"""<!doctype html><title>tab</title><script src="/cached.js"></script>
<script>document.addEventListener("DOMContentLoaded", () => { document.body.dataset.ready = "true"; });</script>
<body><p>tab</p></body>"""


@pytest.fixture
def site():
    """A page that sets a cookie and loads a script the browser may cache for an hour; counts its loads."""
    hits = {"/": 0, "/cached.js": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] = hits.get(self.path, 0) + 1
            script = self.path == "/cached.js"
            body, kind = (b"window.loaded = true;", "text/javascript") if script else (PAGE, "text/html")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            if script:
                self.send_header("Cache-Control", "max-age=3600")
            else:
                self.send_header("Set-Cookie", "visited=1; Path=/")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url, server.hits = f"http://127.0.0.1:{server.server_address[1]}", hits
    yield server
    server.shutdown()
    server.server_close()


def test_the_tab_handed_on_keeps_no_storage_cookie_permission_cache_or_listener(_tabs, context, site):

    page, problems = open_page(context, site.url)
    context.grant_permissions(["clipboard-read"], origin=site.url)
    page.evaluate("localStorage.setItem('last', 'x'); sessionStorage.setItem('tab', 'y'); document.cookie = 'old=1'")
    page.goto(site.url)  # the script again, from the cache
    assert site.hits["/cached.js"] == 1 and sorted(cookie["name"] for cookie in context.cookies()) == ["old", "visited"]
    permission = "navigator.permissions.query({name: 'clipboard-read'}).then(status => status.state)"
    assert page.evaluate(permission) == "granted"
    other = context.new_page()  # a second tab: closed, not handed on

    _tabs.hand_over(keep=True)

    assert other.is_closed() and not page.is_closed() and page.url == "about:blank"
    again, problems_again = open_page(_tabs.context, site.url)
    assert again is page  # the same tab, not a new renderer
    assert (site.hits["/"], site.hits["/cached.js"]) == (3, 2)  # the cache was emptied
    assert again.evaluate("[localStorage.length, sessionStorage.length]") == [0, 0]
    assert [cookie["name"] for cookie in _tabs.context.cookies()] == ["visited"]  # this visit's only
    assert again.evaluate(permission) == "prompt"
    again.evaluate("console.error('after the hand-over')")
    again.wait_for_function("true")  # the console event has reached this process
    assert problems.console_errors == [] and problems_again.console_errors == ["after the hand-over"]


def test_a_failed_tests_tabs_are_not_handed_on(_tabs, context, site):
    page, _ = open_page(_tabs.context, site.url)
    old = _tabs.context
    _tabs.hand_over(keep=False)
    assert page.is_closed() and _tabs.context is not old and _tabs.spare is None
    again, _ = open_page(_tabs.context, site.url)
    assert again is not page and again.evaluate("localStorage.length") == 0


def test_a_test_that_closed_its_tab_hands_on_a_new_tab_in_the_same_context_as_clean(_tabs, context, site):
    page, _ = open_page(_tabs.context, site.url)
    context.grant_permissions(["clipboard-read"], origin=site.url)
    page.evaluate("localStorage.setItem('last', 'x'); document.cookie = 'old=1'")
    page.close()
    old = _tabs.context

    _tabs.hand_over(keep=True)

    assert _tabs.context is old and _tabs.spare is not None and _tabs.spare is not page
    again, _ = open_page(_tabs.context, site.url)
    assert again.evaluate("localStorage.length") == 0 and site.hits["/cached.js"] == 2  # the cache emptied
    assert [cookie["name"] for cookie in _tabs.context.cookies()] == ["visited"]
    assert again.evaluate("navigator.permissions.query({name: 'clipboard-read'}).then(s => s.state)") == "prompt"
