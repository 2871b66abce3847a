"""The chat page: a Jinja template and plain JavaScript that read the SSE stream with fetch."""

from __future__ import annotations

import functools
import posixpath
import re
from pathlib import Path

from flask import Blueprint, current_app, render_template

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


@bp.get("/")
def index():
    """The chat page."""
    modules = page_modules(current_app.static_folder)
    response = current_app.make_response(render_template("index.html", preload=modules[1:]))
    response.headers["Content-Security-Policy"] = _CSP  # the other security headers: jarvis.security
    return response
