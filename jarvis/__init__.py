"""Jarvis: a self-hosted chat server that streams OpenAI-compatible completions and never hangs.

This package's top level stays light: gunicorn's master imports `jarvis.settings` and `jarvis.store`
to validate settings before it forks, and must not import Flask, requests or prometheus-client.
"""


def create_app(test_config: dict | None = None):
    """Build the Flask app (see jarvis.factory)."""
    from jarvis.factory import create_app as build

    return build(test_config)
