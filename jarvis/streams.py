"""Every open stream on this node, as an operator needs to see it: GET /debug/streams, and the top of
each worker's USR1 dump.

Each worker knows its own relays (jarvis.relay). To show the whole node, a worker with streams open
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
import time

import gevent

SNAPSHOT_SECONDS = 0.25
_FILE = "streams-{pid}.json"

_writer: gevent.Greenlet | None = None


def describe_all(relays) -> list[dict]:
    now = time.monotonic()
    return [relay.describe(now) for relay in list(relays)]


def summary_lines(relays) -> list[str]:
    """One line per open stream, for the top of a stack dump."""
    return [f"stream {stream['trace_id']} phase={stream['phase']} age={stream['age_s']:.1f}s "
            f"last_byte={stream['since_last_byte_s']:.1f}s route={stream['route']} upstream={stream['upstream']} "
            f"events={stream['events']}" for stream in describe_all(relays)]


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
