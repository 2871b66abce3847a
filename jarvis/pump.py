"""The pump: a greenlet that reads a backend which is not an upstream's stream (the embedded model, or
any whole answer) into a bounded queue, which the relay's response waits on.

What the queue carries, in order: batches (lists of `data:` payloads; an empty one means "nothing
yet": the embedded model is serving another answer), then END, a `Failure` or, for a whole answer,
its `Result`. The relay puts TICK (time to check its limits and heartbeat) and WAKE (a stop) into the
same queue, so its response has one thing to wait on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
import gevent.event
import gevent.queue

from jarvis.backends import Generation
from jarvis.errors import ApiError, StreamError
from jarvis.logs import spawn

log = logging.getLogger(__name__)

_QUEUE_BATCHES = 256
_QUEUE_BYTES = 8 * 1024 * 1024  # the pump waits while this much is read but not yet written

END = object()
TICK = object()
WAKE = object()


class Failure:
    __slots__ = ("error",)

    def __init__(self, error: ApiError | StreamError):
        self.error = error


class Result:
    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body


class Pump:
    """Reads `generation` in its own greenlet; `closed(generation)` runs when it is done with it (the
    relay closes the generation there and notes when)."""

    def __init__(self, generation: Generation, streamed: bool, closed: Callable[[Generation], None]):
        self.generation = generation
        self.streamed = streamed
        self.closed = closed
        self.queue: gevent.queue.Queue = gevent.queue.Queue(_QUEUE_BATCHES)
        self.queued_bytes = 0
        self.room = gevent.event.Event()  # set while queued_bytes is under _QUEUE_BYTES
        self.room.set()
        self.greenlet = spawn(self._run)

    @property
    def dead(self) -> bool:
        return self.greenlet.dead

    def kill(self, block: bool, timeout: float | None = None) -> None:
        self.greenlet.kill(block=block, timeout=timeout)

    def nudge(self, item) -> None:
        """TICK or WAKE, from the relay: dropped when the queue is full (the response has plenty to read,
        and checks its limits and stops each turn)."""
        try:
            self.queue.put_nowait(item)
        except gevent.queue.Full:
            pass

    def next(self, timeout: float | None = None):
        """The next item (gevent.queue.Empty after `timeout`); batches queued right behind a batch come
        with it, one write for all when the response lagged."""
        item = self.queue.get(timeout=timeout)
        if type(item) is list and item:
            if self.queue.qsize():
                item = self._gathered(item)
            self.queued_bytes -= sum(map(len, item))
            if self.queued_bytes <= _QUEUE_BYTES and not self.room.is_set():
                self.room.set()
        return item

    def whole_answer(self, seconds: float, stopped: Callable[[], bool]) -> Result | Failure | None:
        """A whole answer's Result or Failure; None when a stop came first; TimeoutError after `seconds`."""
        deadline = time.monotonic() + seconds
        while not stopped():
            try:
                item = self.next(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.queue.Empty:
                raise TimeoutError from None
            if isinstance(item, (Result, Failure)):
                return item
        return None

    def _gathered(self, batch: list[bytes]) -> list[bytes]:
        queue = self.queue
        while queue.qsize():
            following = queue.peek_nowait()
            if type(following) is not list or not following:
                break
            batch = batch + queue.get_nowait()
        return batch

    def _run(self) -> None:
        generation = self.generation
        put = self.queue.put
        try:
            if self.streamed:
                batches = generation.batches()
                for batch in batches:
                    if batch:
                        # Hand the client its first token before relaying the rest of a burst.
                        self._put_batch(batch[:1])
                        gevent.sleep(0)
                        if len(batch) > 1:
                            self._put_batch(batch[1:])
                        break
                    put(batch)
                for batch in batches:
                    self._put_batch(batch)
                put(END)
            else:
                put(Result(*generation.result()))
        except (ApiError, StreamError) as error:
            put(Failure(error))
        except Exception as error:  # a bug: report it in-band rather than hang the client
            log.exception("backend failed")
            put(Failure(StreamError("internal_error", f"Jarvis failed while reading the backend "
                                                      f"({type(error).__name__}); see the server log")))
        finally:
            self.closed(generation)

    def _put_batch(self, batch: list[bytes]) -> None:
        """Queue a batch; past _QUEUE_BYTES, wait until the response has written enough of it."""
        self.queued_bytes += sum(map(len, batch))
        self.queue.put(batch)
        if self.queued_bytes > _QUEUE_BYTES:
            self.room.clear()
            self.room.wait()
