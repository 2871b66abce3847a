"""Who may call Jarvis and from where, the limits, and the headers on every response (in-process)."""

import pytest

from tests.clients import content_of, sse
from tests.fake_backend import STALL, upstream_like_chunks

KEY = "test-key-0123456789abcdef"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}

ROUTES = [("POST", "/v1/chat/completions", CHAT), ("GET", "/v1/models", None), ("GET", "/metrics", None),
          ("GET", "/api/conversations", None), ("POST", "/api/conversations", {}),
          ("GET", "/api/conversations/some-id", None), ("PUT", "/api/conversations/some-id", {"title": "x"}),
          ("DELETE", "/api/conversations/some-id", None), ("POST", "/api/conversations/some-id/messages",
                                                           {"content": "hi"})]


@pytest.fixture
def guarded(make_client):
    return make_client(api_key=KEY)


@pytest.mark.parametrize("method, path, body", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_the_key(guarded, backend, method, path, body):
    response = guarded.open(path, method=method, json=body)
    assert response.status_code == 401
    assert response.json["error"]["code"] == "invalid_api_key" and response.json["error"]["type"] == \
        "authentication_error"
    assert KEY not in response.get_data(as_text=True)
    assert backend.requests == []


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}],
                         ids=["bearer", "x-api-key"])
def test_either_header_with_the_key_works(guarded, headers):
    assert guarded.get("/v1/models", headers=headers).status_code == 200
    response = guarded.post("/v1/chat/completions", headers=headers, json={**CHAT, "stream": True})
    assert content_of(sse(response.get_data())) == "w0 w1 w2 "


@pytest.mark.parametrize("headers", [
    {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"x-api-key": "wrong-key-0123456789abcdef"},
    {"Authorization": f"Bearer {KEY}", "x-api-key": "wrong"}, {"Authorization": "wrong", "x-api-key": KEY},
    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY[:-1]}"}, {"x-api-key": ""}],
    ids=["wrong bearer", "wrong x-api-key", "good bearer + wrong x-api-key", "wrong scheme + good x-api-key",
         "basic", "prefix", "empty"])
def test_a_wrong_key_in_any_header_never_passes(guarded, headers):
    assert guarded.get("/v1/models", headers=headers).status_code == 401


def test_healthz_and_the_page_shell_stay_open(guarded):
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/").status_code == 200
    with guarded.get("/static/page/main.js") as script:
        assert script.status_code == 200
    assert guarded.get("/api/session").json == {"required": True, "accounts": False, "signed_in": False, "user": None}


def test_page_signs_in_once_with_a_strict_httponly_cookie(guarded):
    assert guarded.post("/api/session", json={"key": "nope"}).status_code == 401
    response = guarded.post("/api/session", json={"key": KEY})
    assert response.status_code == 204
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and KEY not in cookie
    assert guarded.get("/api/conversations").status_code == 200
    assert guarded.get("/api/conversations", headers={"x-api-key": "wrong"}).status_code == 401
    guarded.delete("/api/session")
    assert guarded.get("/api/conversations").status_code == 401


def test_forged_cookie_is_refused(guarded):
    guarded.set_cookie("jarvis_session", "eyJhdXRoIjoiYWJjIn0.Zm9v.YmFy")
    assert guarded.get("/api/conversations").status_code == 401


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site"}])
def test_cross_site_state_changes_are_refused(client, backend, headers):
    for path, body in [("/api/conversations", {}), ("/v1/chat/completions", CHAT)]:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 403 and response.json["error"]["code"] == "cross_site"
    assert client.get("/api/conversations").json["data"] == [] and backend.requests == []


def test_same_origin_requests_pass(client):
    response = client.post("/api/conversations", json={},
                           headers={"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"})
    assert response.status_code == 201


def test_get_never_changes_state(client):
    conversation = client.post("/api/conversations", json={}).json
    before = client.get(f"/api/conversations/{conversation['id']}").json
    for path in ["/", "/healthz", "/v1/models", "/metrics", "/api/conversations", "/api/session",
                 f"/api/conversations/{conversation['id']}", "/v1/chat/completions",
                 f"/api/conversations/{conversation['id']}/messages?content=hi", "/?prompt=hi"]:
        assert client.get(path).status_code in (200, 405)
    assert client.get(f"/api/conversations/{conversation['id']}").json == before
    assert client.get("/api/conversations").json["data"] == []  # nothing was sent in it (an empty one is not listed)


def test_security_headers_on_every_response(client):
    for path in ["/", "/healthz", "/v1/models", "/nope", "/static/page/main.js"]:
        with client.get(path) as response:
            headers = response.headers
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    page = client.get("/").headers["Content-Security-Policy"]
    assert "script-src 'self'" in page and "connect-src 'self'" in page and "img-src 'self' data:" in page
    assert "unsafe-inline" not in page


def test_the_page_preloads_every_module_it_imports_so_the_browser_fetches_them_at_once(client):
    """Without the list the browser finds the module graph a level per round trip (main.js, its imports,
    theirs, then the vendored libraries): each link must name a module the page really imports, and the
    whole graph must be there."""
    import re
    from pathlib import Path

    import jarvis

    html = client.get("/").get_data(as_text=True)
    version = re.search(r'<script type="module" src="/static/v/([0-9a-f]+)/page/main\.js">', html).group(1)
    preloaded = re.findall(rf'<link rel="modulepreload" href="/static/v/{version}/([^"]+)">', html)
    static = Path(jarvis.__file__).parent / "static"
    page_scripts = {f"page/{path.name}" for path in (static / "page").glob("*.js")} - {"page/main.js"}
    assert page_scripts <= set(preloaded), page_scripts - set(preloaded)  # every page module, however deep
    assert {"api.js", "sse.js", "markdown.js", "vendor/marked.esm.js", "vendor/purify.es.mjs",
            "vendor/highlight.min.js", "vendor/katex.mjs"} <= set(preloaded)  # the libraries, three levels down
    assert len(preloaded) == len(set(preloaded)) and "page/main.js" not in preloaded
    for path in preloaded:
        with client.get(f"/static/v/{version}/{path}") as response:
            assert response.status_code == 200, path


def test_the_pages_files_are_cached_for_good_under_their_version(client):
    """Every file the page names is under /static/v/<version>/, kept by a browser for a year; any other
    version is served but not to keep; /static/... still serves each file to revalidate."""
    import re
    from pathlib import Path

    import jarvis

    static = Path(jarvis.__file__).parent / "static"
    html = client.get("/").get_data(as_text=True)
    named = re.findall(r'(?:href|src)="(/static/[^"]+)"', html)
    assert len(named) >= 20 and {re.match(r"/static/v/([0-9a-f]{16})/", url).group(1) for url in named} == \
        {named[0].split("/")[3]}  # one version, everywhere
    version = named[0].split("/")[3]
    for url in named:
        with client.get(url) as response:
            assert response.status_code == 200, url
            assert response.headers["Cache-Control"] == "public, max-age=31536000, immutable", url
            assert response.data == (static / url.split("/", 4)[4]).read_bytes(), url
            assert response.headers["X-Content-Type-Options"] == "nosniff"
    with client.get("/static/v/0123456789abcdef/page/main.js") as other:  # a page from before an upgrade
        assert other.status_code == 200 and other.headers["Cache-Control"] == "no-cache"
        assert other.data == (static / "page" / "main.js").read_bytes()
    with client.get("/static/page/main.js") as plain:
        assert plain.status_code == 200 and plain.headers["Cache-Control"] == "no-cache"
    for missing in (f"/static/v/{version}/page/nope.js", f"/static/v/{version}/%2e%2e/factory.py",
                    f"/static/v/{version}/..%2f..%2fjarvis/factory.py"):
        assert client.get(missing).status_code == 404, missing


def test_the_static_version_changes_with_any_files_bytes_or_name_while_the_server_runs(tmp_path):
    import os

    from jarvis.page import static_version

    folder = tmp_path / "static"
    (folder / "page").mkdir(parents=True)
    files = {"page/main.js": b"import './a.js';", "page/a.js": b"export {};", "chat.css": b"body {}"}
    later = [1_700_000_000]

    def write(name: str, data: bytes) -> None:  # an edit, a moment after the last one
        (folder / name).write_bytes(data)
        later[0] += 1
        os.utime(folder / name, (later[0], later[0]))

    for name, data in files.items():
        write(name, data)
    first = static_version(str(folder))
    assert static_version(str(folder)) == first
    write("chat.css", b"body { }")  # edited under a running server: a new version at once
    edited = static_version(str(folder))
    assert edited != first
    write("chat.css", b"body {}")
    assert static_version(str(folder)) == first  # the same bytes: the same version (and on every node)
    (folder / "page" / "a.js").rename(folder / "page" / "b.js")
    assert static_version(str(folder)) not in (first, edited)  # a file renamed
    write("vendor.js", b"")
    assert static_version(str(folder)) not in (first, edited)  # a file added


def test_message_count_and_size_limits(make_client):
    client = make_client(max_messages=3, max_message_chars=100)
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}] * 4})
    assert response.status_code == 400 and response.json["error"]["code"] == "too_many_messages"
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 101}]})
    assert response.status_code == 400 and response.json["error"]["code"] == "messages_too_long"


def test_over_the_stream_cap_is_429_and_streams_below_it_are_unaffected(make_client, backend):
    client = make_client(max_streams=3)
    backend.enqueue(*[["a ", STALL]] * 3)
    running = [client.post("/v1/chat/completions", json={**CHAT, "stream": True}) for _ in range(3)]
    refused = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json["error"] == {"message": refused.json["error"]["message"], "type": "rate_limit_error",
                                     "param": None, "code": "too_many_streams"}
    for response in running:
        response.close()  # the client leaves: the relay cancels its generation
    assert all(generation.closed for generation in backend.generations[:3])  # cancelled at the source
    assert content_of(sse(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).get_data())) == \
        "w0 w1 w2 "


def test_the_page_receives_only_known_chunk_fields(client, backend):
    backend.enqueue(upstream_like_chunks("openai", reasoning_tokens=2))  # chunks full of extra fields
    conversation = client.post("/api/conversations", json={}).json
    events = sse(client.post(f"/api/conversations/{conversation['id']}/messages", json={"content": "hi"}).get_data())
    chunks = [value for kind, value in events if kind == "data"]
    page_fields = {"id", "object", "created", "model", "choices", "stats", "status", "note", "waiting"}
    assert chunks and all(set(chunk) <= page_fields for chunk in chunks)
    assert chunks[-1]["status"] == "complete"
    assert all(set(choice) == {"index", "delta", "finish_reason"} for chunk in chunks for choice in chunk["choices"])
    deltas = [choice["delta"] for chunk in chunks for choice in chunk["choices"]]
    assert all(set(delta) <= {"role", "content", "reasoning_content", "content_was_reasoning"} for delta in deltas)
    assert all(isinstance(value, (int, float, str, type(None))) for value in chunks[-1]["stats"].values())


# -- DNS rebinding: a hostile page re-points its own name at 127.0.0.1 -----------------------------------------

@pytest.mark.parametrize("key", [None, KEY], ids=["no key", "with a key"])
def test_a_request_naming_another_host_is_421_even_from_the_same_origin(make_client, backend, key):
    client = make_client(api_key=key)
    rebound = {"Host": "attacker.example", "Origin": "http://attacker.example", "Sec-Fetch-Site": "same-origin"}
    for method, path, body in [("GET", "/api/conversations", None), ("POST", "/api/conversations", {}),
                               ("POST", "/v1/chat/completions", CHAT), ("GET", "/", None)]:
        response = client.open(path, method=method, json=body, headers=rebound)
        assert response.status_code == 421, path
        assert response.json["error"]["code"] == "misdirected_request"
        assert "JARVIS_ALLOWED_HOSTS" in response.json["error"]["message"]
    assert backend.requests == []
    assert client.get("/healthz", headers={"Host": "attacker.example"}).status_code == 200  # liveness only


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "127.0.0.2",
                                  "app.localhost"])
def test_loopback_names_are_allowed_by_default(client, host):
    assert client.get("/api/conversations", headers={"Host": host}).status_code == 200


def test_configured_names_are_allowed_and_only_them(make_client):
    client = make_client(allowed_hosts=("chat.example.org",))
    assert client.get("/api/conversations", headers={"Host": "chat.example.org"}).status_code == 200
    assert client.get("/api/conversations", headers={"Host": "localhost"}).status_code == 421
    anyone = make_client(allowed_hosts=("*",))
    assert anyone.get("/api/conversations", headers={"Host": "whatever.example"}).status_code == 200


def test_signing_out_revokes_the_session_on_the_server(guarded):
    assert guarded.post("/api/session", json={"key": KEY}).status_code == 204
    cookie = guarded.get_cookie("jarvis_session").value
    assert guarded.get("/api/conversations").status_code == 200
    guarded.delete("/api/session")
    guarded.set_cookie("jarvis_session", cookie)  # a copy of the old cookie, replayed
    assert guarded.get("/api/conversations").status_code == 401


def test_the_cookie_holds_a_random_id_and_nothing_derived_from_the_key(guarded):
    import base64
    import hashlib
    import json as json_module

    guarded.post("/api/session", json={"key": KEY})
    payload = guarded.get_cookie("jarvis_session").value.split(".")[0]
    content = json_module.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert set(content) <= {"sid", "_permanent"} and len(content["sid"]) >= 40
    assert hashlib.sha256(("jarvis-session:" + KEY).encode()).hexdigest() not in json_module.dumps(content)


def test_a_new_key_ends_every_session(make_client):
    old = make_client(api_key=KEY)
    old.post("/api/session", json={"key": KEY})
    cookie = old.get_cookie("jarvis_session").value
    rotated = make_client(api_key="another-key-0123456789abcdef")  # same data directory and secret
    rotated.set_cookie("jarvis_session", cookie)
    assert rotated.get("/api/conversations").status_code == 401


@pytest.mark.parametrize("path", ["/healthz", "/v1/models", "/"])
def test_an_http_1_1_request_without_host_is_400_and_http_1_0_is_served(client, path):
    from werkzeug.test import create_environ, run_wsgi_app

    for protocol, expected in [("HTTP/1.1", 400), ("HTTP/1.0", 200)]:
        environ = create_environ(path, environ_overrides={"SERVER_PROTOCOL": protocol})
        del environ["HTTP_HOST"]
        _, status, _ = run_wsgi_app(client.application, environ, buffered=True)
        assert int(status.split()[0]) == expected, (path, protocol, status)
