"""What an app holds — its settings, backend, conversation store, runs and usage meter — and typed access to them.

The app factory installs them once; views and hooks read them through these
functions instead of untyped `current_app.extensions` lookups. A leaf module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from jarvis.backends import Backend
    from jarvis.mcp_client import ToolServers
    from jarvis.runs import Runs
    from jarvis.settings import Settings
    from jarvis.stores import ConversationStore
    from jarvis.usage import Meter

_SETTINGS, _BACKEND, _STORE, _RUNS, _METER, _TOOLS = ("jarvis.settings", "jarvis.backend", "jarvis.store",
                                                      "jarvis.runs", "jarvis.meter", "jarvis.tools")


def install(app: Flask, settings: Settings, backend: Backend, store: ConversationStore, tools: ToolServers) -> None:
    from jarvis.runs import Runs
    from jarvis.usage import Meter

    meter = Meter(store)
    app.extensions.update({_SETTINGS: settings, _BACKEND: backend, _STORE: store, _METER: meter,
                           _RUNS: Runs(store, backend, settings, meter, tools), _TOOLS: tools})


def settings() -> Settings:
    return current_app.extensions[_SETTINGS]


def backend() -> Backend:
    return current_app.extensions[_BACKEND]


def store() -> ConversationStore:
    return current_app.extensions[_STORE]


def runs() -> Runs:
    return current_app.extensions[_RUNS]


def meter() -> Meter:
    return current_app.extensions[_METER]


def tool_servers() -> ToolServers:
    return current_app.extensions[_TOOLS]
