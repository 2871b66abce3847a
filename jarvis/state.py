"""What an app holds — its settings, backend and conversation store — and typed access to them.

The app factory installs them once; views and hooks read them through these
functions instead of untyped `current_app.extensions` lookups. A leaf module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask, current_app

if TYPE_CHECKING:
    from jarvis.backends import Backend
    from jarvis.settings import Settings
    from jarvis.store import ConversationStore

_SETTINGS, _BACKEND, _STORE = "jarvis.settings", "jarvis.backend", "jarvis.store"


def install(app: Flask, settings: Settings, backend: Backend, store: ConversationStore) -> None:
    app.extensions.update({_SETTINGS: settings, _BACKEND: backend, _STORE: store})


def settings() -> Settings:
    return current_app.extensions[_SETTINGS]


def backend() -> Backend:
    return current_app.extensions[_BACKEND]


def store() -> ConversationStore:
    return current_app.extensions[_STORE]
