"""Jarvis: a self-hosted chat server that streams OpenAI-compatible completions and never hangs.

This package's top level stays light: gunicorn's master imports `jarvis.settings` and `jarvis.stores.sqlite`
to validate settings before it forks, and must not import Flask, requests or prometheus-client.
"""

__version__ = "0.9.0"


def create_app(settings=None, **services):
    """Build the Flask app (see jarvis.factory); with no arguments, from the environment."""
    from jarvis.factory import create_app as build

    return build(settings, **services)
