"""Every open stream: this worker's registry of them (counted against JARVIS_MAX_STREAMS, ended at
shutdown), and the whole node's, as an operator needs to see it: GET /debug/streams, and the top of
each worker's USR1 dump.

Each worker knows its own relays (OPEN). To show the whole node, a worker with streams open
writes a snapshot of them every SNAPSHOT_SECONDS into the metrics directory that gunicorn's workers
already share (`streams-<pid>.json`, written whole and renamed into place), and once more, empty,
when its last one ends; the worker that answers /debug/streams adds its own live list to the other
workers' snapshots (a file whose worker is gone is ignored). No upstream is ever touched, and no
service is added.
"""

from __future__ import annotations

import glob
import json
import os
import re
import time

import gevent

SNAPSHOT_SECONDS = 0.25
_FILE = "streams-{pid}.json"

_writer: gevent.Greenlet | None = None

# What a stream is doing, read from its first events only (until the answer starts): thinking
# (a reasoning field) or answering (content, or a Responses text delta).
_ANSWERING = re.compile(rb'"content":\s*"[^"]|output_text\.delta')
_THINKING = re.compile(rb'"reasoning(?:_content)?":\s*"[^"]|reasoning_summary_text\.delta|reasoning_text\.delta')
_COMPLETION_TEXT = re.compile(rb'"text":\s*"[^"]')  # /v1/completions


def has_text(payload: bytes) -> bool:
    """Whether an event carries text: of the answer, of its thinking, or of a text completion."""
    return bool(_ANSWERING.search(payload) or _THINKING.search(payload) or _COMPLETION_TEXT.search(payload))


OPEN: set = set()  # this worker's open relays (jarvis.relay.Relay)


def open_count() -> int:
    return len(OPEN)


def register(relay) -> None:
    OPEN.add(relay)
    watch(OPEN)


def unregister(relay) -> None:
    OPEN.discard(relay)


def interrupt_all(reason) -> int:
    """End every open stream for `reason` (an Outcome: shutdown); return how many there were."""
    relays = list(OPEN)
    for relay in relays:
        relay.interrupt(reason)
    return len(relays)


def describe_all(relays) -> list[dict]:
    now = time.monotonic()
    return [describe(relay, now) for relay in list(relays)]


def describe(relay, now: float) -> dict:
    """What /debug/streams and a stack dump show of this stream, from memory."""
    page = relay.observer is not None
    watched = relay.observer.watched() if page else not relay.stopping
    if not watched and page:
        phase = "detached"  # a page's answer that nobody watches now
    elif relay.generation is None:
        phase = "waiting for headers"
    elif relay.answering:
        phase = "answering"
    elif relay.thinking:
        phase = "thinking"
    elif relay.queued and relay.first_event_at is None:
        phase = "queued"
    else:
        phase = "waiting for first token"
    model = relay.request.body.get("model")
    if not isinstance(model, str) or not model:  # the request named none: the one its backend answers with
        backend = getattr(relay.backend, "backend", relay.backend)  # (a page's tool loop wraps its backend)
        model = getattr(backend, "model_id", None) or getattr(backend, "model", None) or \
            getattr(backend, "default_model", None)
    slot = getattr(relay.generation, "slot", None)  # the embedded model's slot (jarvis.backends.batching)
    return {"trace_id": relay.request.trace_id, "route": "page" if page else f"/v1/{relay.request.endpoint}",
            "model": model[:100] if isinstance(model, str) else None, "upstream": relay.upstream,
            "slot": slot if isinstance(slot, int) else None,
            "queue_position": getattr(relay.generation, "queue_position", None) if phase == "queued" else None,
            "phase": phase, "age_s": round(now - relay.clock.started, 3),
            "since_last_byte_s": round(now - relay.clock.last_event, 3), "events": relay.events, "bytes": relay.bytes,
            "client_attached": bool(watched), "worker": os.getpid()}


def summary_lines(relays) -> list[str]:
    """One line per open stream, for the top of a stack dump."""
    return [f"stream {stream['trace_id']} phase={stream['phase']} age={stream['age_s']:.1f}s "
            f"last_byte={stream['since_last_byte_s']:.1f}s route={stream['route']} upstream={stream['upstream']} "
            f"slot={'-' if stream['slot'] is None else stream['slot']} events={stream['events']}"
            for stream in describe_all(relays)]


def node_streams(relays) -> list[dict]:
    """This worker's streams, live, and every other live worker's latest snapshot."""
    streams = describe_all(relays)
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return streams
    own = os.getpid()
    for path in glob.glob(os.path.join(directory, _FILE.format(pid="*"))):
        pid = path.rsplit("-", 1)[-1].split(".")[0]
        if not pid.isdigit() or int(pid) == own or not _alive(int(pid)):
            continue
        try:
            with open(path) as file:
                streams.extend(json.load(file))
        except (OSError, ValueError):
            continue  # being replaced, or its worker just went
    return streams


def watch(relays) -> None:
    """Start this worker's snapshot writer (once); it stops when no stream is left, after an empty write."""
    global _writer
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory and (_writer is None or _writer.dead):
        _writer = gevent.spawn(_write_snapshots, relays, directory)


def _write_snapshots(relays, directory: str) -> None:
    path = os.path.join(directory, _FILE.format(pid=os.getpid()))
    while True:
        streams = describe_all(relays)
        try:
            temporary = f"{path}.tmp"
            with open(temporary, "w") as file:
                json.dump(streams, file)
            os.replace(temporary, path)
        except OSError:
            pass  # the directory went (a test's teardown): nothing to show anyway
        if not streams:
            return
        gevent.sleep(SNAPSHOT_SECONDS)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def note_phase(relay, batch: list[bytes]) -> None:
    """Whether the stream is thinking or answering yet, from its events until the answer starts."""
    for payload in batch:
        if _ANSWERING.search(payload):
            relay.answering = True
            return
        if not relay.thinking and _THINKING.search(payload):
            relay.thinking = True
