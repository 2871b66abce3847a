"""The chat page: a Jinja template and plain JavaScript that read the SSE stream with fetch."""

from __future__ import annotations

import functools
import hashlib
import posixpath
import re
from pathlib import Path
from stat import S_ISREG

from flask import Blueprint, current_app, g, render_template, send_from_directory, url_for

bp = Blueprint("page", __name__)

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


# A static import in one of the page's modules: `import … from "./x.js"`, `export … from "../y.js"`, `import "./z.js"`.
_IMPORT = re.compile(r'^[ \t]*(?:(?:import|export)\b[^;"]*?\bfrom[ \t]*|import[ \t]*)"(\.{1,2}/[^"]+)"', re.M)


@functools.cache
def page_modules(static_folder: str, entry: str = "page/main.js") -> tuple[str, ...]:
    """Every module the page's script imports, directly or not (paths under static/, breadth first).

    The page lists them as `<link rel="modulepreload">`: without, the browser finds the module graph one
    level at a time, a round trip each (main.js, then its imports, then theirs: three before the
    vendored libraries), and a fresh page was ready ~100 ms later (measured in headless Chromium on
    loopback; more over a real network)."""
    found, queue = [entry], [entry]
    while queue:
        module = queue.pop(0)
        source = (Path(static_folder) / module).read_text(encoding="utf-8")
        for target in _IMPORT.findall(source):
            path = posixpath.normpath(posixpath.join(posixpath.dirname(module), target))
            if path not in found:
                found.append(path)
                queue.append(path)
    return tuple(found)


# -- the page's files, cached for good under their version ------------------------------------------------
# The page is 27 files (its modules, the vendored libraries, the style sheets). Served only at /static/...,
# with Flask's `no-cache` and validators, every load of the page asked for each again and got 304s: 29
# requests where 7 carry anything (measured in headless Chromium). Under /static/v/<version>/, the version
# a hash of every file, they are cached for a year and never asked for again until Jarvis's files change;
# the modules' relative imports stay under the same version, so the whole graph is versioned with no
# change to the scripts. /static/... itself still serves each file as before (for scripts and links
# outside the page).
VERSIONED_MAX_AGE = 365 * 24 * 3600


def static_version(static_folder: str) -> str:
    """A hash of every file under static/ (its path and bytes): it changes with any file, so an upgraded
    Jarvis's page never gets an old file from a browser's cache. Hashed again only when a file's size or
    time changes (a stat of each: 0.4 ms for the 29), so a page edited under a running server is not kept stale."""
    stamps = []
    for path in sorted(Path(static_folder).rglob("*")):
        stat = path.stat()
        if S_ISREG(stat.st_mode):
            stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return _hash_of(static_folder, tuple(stamps))


@functools.lru_cache(maxsize=4)
def _hash_of(static_folder: str, files: tuple) -> str:
    root = Path(static_folder)
    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@bp.app_template_global()
def static_url(filename: str) -> str:
    """The URL of a file under static/, with the version that lets a browser keep it (worked out once a
    request: the page names 27 files)."""
    if "static_version" not in g:
        g.static_version = static_version(current_app.static_folder)
    return url_for("page.versioned_static", version=g.static_version, filename=filename)


@bp.get("/static/v/<version>/<path:filename>")
def versioned_static(version: str, filename: str):
    """A file under static/. Another version than this Jarvis's (a page loaded before an upgrade) gets the
    file as it is now, but not to keep: nothing is cached under an old version's name."""
    response = send_from_directory(current_app.static_folder, filename)
    if version == static_version(current_app.static_folder):
        response.headers["Cache-Control"] = f"public, max-age={VERSIONED_MAX_AGE}, immutable"
    else:
        response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def index():
    """The chat page."""
    modules = page_modules(current_app.static_folder)
    response = current_app.make_response(render_template("index.html", preload=modules[1:]))
    response.headers["Content-Security-Policy"] = _CSP  # the other security headers: jarvis.security
    return response
