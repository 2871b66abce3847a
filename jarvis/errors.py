"""One error shape for every client: OpenAI's `{"error": {message, type, param, code}}`.

    ApiError               an error answered with a real HTTP status, before any body byte
    StreamError            an abnormal end after the first byte: sent in-band, then [DONE]
        UpstreamErrorEvent the upstream itself sent an error event; relayed as it came

Messages tell the user how to fix the problem. They never carry secrets: the
upstream's key and the client's headers are not part of any message.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, json, request
from werkzeug.exceptions import HTTPException

from jarvis.stores import StoreUnavailable

log = logging.getLogger(__name__)

# Statuses the openai SDK would retry; say so explicitly where a retry cannot help.
_RETRYABLE = {408, 409, 429, 502, 503, 504}


def error_object(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """The inner object of OpenAI's error JSON."""
    return {"message": message, "type": type_, "param": param, "code": code}


def type_for_status(status: int) -> str:
    """OpenAI's error type for an HTTP status."""
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """An error answered with an HTTP status and OpenAI's error JSON (`body` replaces the JSON whole)."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, code: str | None = None,
                 param: str | None = None, body: dict | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}
        self.body = body or {"error": error_object(message, type_ or type_for_status(status), code, param)}

    @property
    def message(self) -> str:
        error = self.body.get("error")
        return error["message"] if isinstance(error, dict) and isinstance(error.get("message"), str) else str(self)

    @property
    def code(self) -> str | None:
        return self.body.get("error", {}).get("code") if isinstance(self.body.get("error"), dict) else None

    def to_response(self) -> Response:
        response = Response(json.dumps(self.body), status=self.status, mimetype="application/json")
        response.headers.update(self.headers)
        if self.status not in _RETRYABLE:
            response.headers["x-should-retry"] = "false"
        return response


class StreamError(Exception):
    """A stream ended abnormally after its first byte; `code` says why."""

    def __init__(self, code: str, message: str, type_: str = "server_error"):
        super().__init__(message)
        self.code = code
        self.error = error_object(message, type_, code)


class ToolError(RuntimeError):
    """A tool could not be called: its server is unavailable, or the call failed or timed out. Its message is
    what the model (and the page) are told."""


class UpstreamErrorEvent(StreamError):
    """The upstream sent `data: {"error": ...}`; relay its error object unchanged."""

    def __init__(self, error: dict):
        message = error.get("message") if isinstance(error.get("message"), str) else "upstream error"
        super().__init__("upstream_error", message, "upstream_error")
        self.error = error


def init_app(app: Flask) -> None:
    """Answer every error, expected or not, in one shape."""
    app.register_error_handler(ApiError, lambda error: error.to_response())
    app.register_error_handler(HTTPException, _http_exception)
    app.register_error_handler(StoreUnavailable, _store_failure)
    app.register_error_handler(Exception, _unexpected_exception)


def _store_failure(error: StoreUnavailable) -> Response:
    """The database failed (full disk, a lock held too long, a server gone, no connection in time): say
    so, one log line, no traceback."""
    log.warning("the conversation store failed on %s %s: %s", request.method, request.path, error)
    return ApiError(503, f"The conversations could not be read or saved ({error}); nothing was changed. "
                         "Try again in a moment", code="store_unavailable",
                    headers={"Retry-After": "1"}).to_response()


_HTTP_CODES = {
    404: "unknown_url",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
}


def _http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status == 404:
        message = f"Unknown path {request.path}: see README.md for the endpoints Jarvis serves"
    elif status == 405:
        message = f"{request.method} is not allowed on {request.path}"
    else:
        message = error.description or error.name
    response = ApiError(status, message, type_="invalid_request_error", code=_HTTP_CODES.get(status)).to_response()
    if status == 405 and isinstance(error.get_response().headers.get("Allow"), str):
        response.headers["Allow"] = error.get_response().headers["Allow"]
    return response


def _unexpected_exception(error: Exception) -> Response:
    log.exception("unexpected error while handling %s %s", request.method, request.path)
    return ApiError(500, "Jarvis hit an internal error; the log has the details under this request's trace id",
                    code="internal_error").to_response()
