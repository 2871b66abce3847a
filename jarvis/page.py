"""The chat page: a Jinja template and plain JavaScript that read the SSE stream with fetch."""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

bp = Blueprint("page", __name__)

_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@bp.get("/")
def index():
    """The chat page."""
    response = current_app.make_response(render_template("index.html"))
    response.headers["Content-Security-Policy"] = _CSP  # the other security headers: jarvis.security
    return response
