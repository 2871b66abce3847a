"""The backend used when no upstream is configured and no embedded model is available."""

from __future__ import annotations

from jarvis.errors import ApiError

_MESSAGE = "No model is configured: set JARVIS_UPSTREAM_URL to an OpenAI-compatible API (see README.md)"


class UnconfiguredBackend:
    name = "unconfigured"

    def models(self) -> dict:
        return {"object": "list", "data": []}

    def open(self, request):
        raise ApiError(503, _MESSAGE, "server_error", "no_backend")
