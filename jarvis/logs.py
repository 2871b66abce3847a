"""Trace ids and log set-up: every line Jarvis writes names the request it belongs to.

The trace id lives in a context variable. A greenlet serves one request at a
time but the same greenlet serves the next keep-alive request, so the id is
set afresh for every request; greenlets spawned for a request get a copy of
the context through `spawn`. Logs go to stderr, which gunicorn's
`capture_output` points at its error log, so USR1 log reopening covers them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid

import gevent

trace_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("trace_id", default="-")

_VALID_TRACE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s [%(trace_id)s] %(message)s"
_DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"


def new_trace_id(proposed: str | None = None) -> str:
    """Adopt a client's X-Request-Id when it is a sane token, else make one."""
    if proposed and _VALID_TRACE_ID.fullmatch(proposed):
        return proposed
    return uuid.uuid4().hex


def upstream_request_id(trace_id: str) -> str:
    """The X-Request-Id to send upstream: the trace id when it is a UUID, else a new UUID.

    Some upstreams validate it (llama-cpp-python's server answers 400 to anything but a UUID),
    so a client's own id, kept for Jarvis's log and response, is never forwarded as it is.
    """
    try:
        return str(uuid.UUID(trace_id))
    except ValueError:
        return str(uuid.uuid4())


def spawn(function, *args) -> gevent.Greenlet:
    """gevent.spawn that carries the caller's context (trace id) into the greenlet."""
    context = contextvars.copy_context()
    return gevent.spawn(context.run, function, *args)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def escaped(value):
    """A logged value with control characters written out (\\x0a): a request's path or header can never
    start a forged log line."""
    if isinstance(value, str) and _CONTROL.search(value):
        return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", value)
    return value


class _TraceIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id = trace_id_var.get()
        if isinstance(record.args, tuple):
            record.args = tuple(escaped(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: escaped(value) for key, value in record.args.items()}
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, trace id, message, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "trace_id": getattr(record, "trace_id", "-"),
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str, log_format: str = "text") -> None:
    """Send the `jarvis` loggers to stderr with the trace id on every line (idempotent)."""
    # What no format here shows is not collected for every record (the logging HOWTO's "Optimization"):
    # the caller's frame (a walk up the stack), the thread (under gevent, a dummy Thread made for every
    # greenlet that logs) and the multiprocessing process name. Together about half an end line's cost.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger("jarvis")
    root.setLevel(level.upper())
    root.propagate = False
    if any(getattr(handler, "_jarvis", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._jarvis = True
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_FORMAT, _DATE_FORMAT))
    handler.addFilter(_TraceIdFilter())
    root.addHandler(handler)
    # psycopg's own lines in the same format, not bare on stderr; its pool's warning for every failed
    # connection attempt is left out (the requests that could not be served each log one line already).
    driver = logging.getLogger("psycopg")
    driver.addHandler(handler)
    driver.propagate = False
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
