"""The app factory: settings (from the environment unless given), backend, store, blueprints.

Tests build an app from a Settings object and a fake backend, in milliseconds and
without a server: `create_app(Settings(...), backend=FakeBackend())`.
"""

from __future__ import annotations

from flask import Flask, Response, request

from jarvis import errors, inputs, lifecycle, logs, metrics, security, state
from jarvis.backends import Backend, create_backend
from jarvis.settings import Settings
from jarvis.stores import ConversationStore, open_store


def create_app(settings: Settings | None = None, *, backend: Backend | None = None,
               store: ConversationStore | None = None, tool_servers=None) -> Flask:
    """Build the app; with no settings, read them from the environment (as app.py does). Tests may hand it
    running tool servers (jarvis.mcp_client.ToolServers) that several apps share."""
    settings = Settings.from_env() if settings is None else settings
    logs.configure(settings.log_level, settings.log_format)

    app = Flask(__name__, template_folder="templates", static_folder="static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    store = store or open_store(settings)
    from jarvis.mcp_client import ToolServers

    state.install(app, settings, backend or create_backend(settings), store,
                  tool_servers if tool_servers is not None else ToolServers(settings.tool_servers))

    errors.init_app(app)
    lifecycle.track_connections(app)
    security.init_app(app, settings, store)
    app.before_request(_start_trace)
    app.after_request(_return_trace)
    app.after_request(_count)
    app.after_request(inputs.close_if_body_unread)

    from jarvis import (
        accounts,
        admin,
        api,
        attachments,
        conversations,
        debug,
        health,
        limits,
        mcp_client,
        metrics,
        page,
    )

    app.register_blueprint(accounts.bp)
    app.register_blueprint(attachments.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(limits.bp)
    app.register_blueprint(mcp_client.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(conversations.bp)
    app.register_blueprint(debug.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(page.bp)
    app.register_blueprint(metrics.bp)
    return app


def _start_trace() -> None:
    # The same greenlet serves the next keep-alive request: always set a fresh id.
    logs.trace_id_var.set(logs.new_trace_id(request.headers.get("X-Request-Id")))


def _count(response: Response) -> Response:
    metrics.count_request(request.url_rule.rule if request.url_rule is not None else None, response.status_code)
    return response


def _return_trace(response: Response) -> Response:
    response.headers["X-Request-Id"] = logs.trace_id_var.get()
    return response
