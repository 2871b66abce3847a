"""What an app holds — its settings, backend, conversation store and runs — and typed access to them.

The app factory installs them once; views and hooks read them through these
functions instead of untyped `current_app.extensions` lookups. A leaf module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from jarvis.backends import Backend
    from jarvis.runs import Runs
    from jarvis.settings import Settings
    from jarvis.stores import ConversationStore

_SETTINGS, _BACKEND, _STORE, _RUNS = "jarvis.settings", "jarvis.backend", "jarvis.store", "jarvis.runs"


def install(app: Flask, settings: Settings, backend: Backend, store: ConversationStore) -> None:
    from jarvis.runs import Runs

    app.extensions.update({_SETTINGS: settings, _BACKEND: backend, _STORE: store,
                           _RUNS: Runs(store, backend, settings)})


def settings() -> Settings:
    return current_app.extensions[_SETTINGS]


def backend() -> Backend:
    return current_app.extensions[_BACKEND]


def store() -> ConversationStore:
    return current_app.extensions[_STORE]


def runs() -> Runs:
    return current_app.extensions[_RUNS]
