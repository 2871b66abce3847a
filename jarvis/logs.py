"""Trace ids and log set-up: every line Jarvis writes names the request it belongs to.

The trace id lives in a context variable. A greenlet serves one request at a
time but the same greenlet serves the next keep-alive request, so the id is
set afresh for every request; greenlets spawned for a request get a copy of
the context through `spawn`. Logs go to stderr, which gunicorn's
`capture_output` points at its error log, so USR1 log reopening covers them.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import re
import sys
import time
import uuid

import gevent
import gevent.monkey

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
    """One JSON object per line: time, level, logger, trace id, message, and the event's fields.

    gunicorn's own loggers use it too when JARVIS_LOG_FORMAT=json (jarvis.server_config's logger_class):
    `gunicorn.error` (its start, worker and signal lines) and `gunicorn.access`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "pid": record.process, "trace_id": getattr(record, "trace_id", "-"),
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


# -- JSON lines written without logging: from native threads, signal handlers, and stray writes to stderr ----
#
# gevent's monitor reports from its own native thread, faulthandler writes from the signal itself, and
# whatever prints to sys.stderr (gevent's report of a greenlet that died, a warning) bypasses logging. In
# JSON mode each of these becomes whole JSON lines written with one os.write each, under a lock of the
# operating system's own (gevent's patched locks cannot be taken from a native thread).

_native_lock = gevent.monkey.get_original("_thread", "allocate_lock")()
_native_thread_id = gevent.monkey.get_original("_thread", "get_ident")
_json_mode = [False]


def json_mode() -> bool:
    return _json_mode[0]


def json_line(level: str, logger: str, message: str, **fields) -> bytes:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "level": level, "logger": logger, "pid": os.getpid(),
             "trace_id": "-", "message": message, **fields}
    return (json.dumps(entry, default=str) + "\n").encode()


def write_line(line: bytes, fd: int = 2) -> None:
    """One whole line, from any thread (a pipe reader may see lines over 4 KiB split, never interleaved
    with another writer's inside this process)."""
    with _native_lock:
        view = memoryview(line)
        while view:
            written = os.write(fd, view)
            view = view[written:]


class JsonStderr(io.TextIOBase):
    """sys.stderr in JSON mode: each line written to it becomes one JSON object (logger `stderr`); its
    file descriptor is the real one, so gunicorn's capture_output and log reopening work as before."""

    def __init__(self, real):
        self._real = real
        self._partial: dict[int, str] = {}

    def fileno(self) -> int:
        return self._real.fileno()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        thread = _native_thread_id()
        pending = self._partial.pop(thread, "") + text
        *lines, rest = pending.split("\n")
        if rest:
            self._partial[thread] = rest
        for line in lines:
            if line.startswith("{") and _is_json_object(line):  # already a JSON line (a handler made before)
                write_line((line + "\n").encode(), self.fileno())
            elif line.strip():
                write_line(json_line("ERROR", "stderr", line), self.fileno())
        return len(text)

    def flush(self) -> None:
        for thread, rest in list(self._partial.items()):
            if thread == _native_thread_id() and rest.strip():
                del self._partial[thread]
                write_line(json_line("ERROR", "stderr", rest), self.fileno())


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def json_stderr() -> None:
    """In JSON mode, make every stray line on sys.stderr a JSON object (idempotent; inherited by workers
    when done in gunicorn's master)."""
    _json_mode[0] = True
    if not isinstance(sys.stderr, JsonStderr):
        sys.stderr = JsonStderr(sys.stderr)


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
    handler = logging.StreamHandler(getattr(sys.stderr, "_real", sys.stderr))
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
