"""The relay: the one place where a backend's output becomes a client's SSE stream, and where it ends.

Nothing ever waits on one thing while another matters:

    response  (gunicorn's greenlet) opens the backend — connects, sends, waits
              for the answer's headers, interrupted by a stop and bounded by the
              inactivity limit — then reads an upstream's stream itself; writes
              events, `: ping` heartbeats while the backend is quiet, and the
              in-band error + [DONE] on any abnormal end (inactivity, max
              duration, shutdown, upstream)
    pump      (a greenlet) only for a backend that is not an upstream's stream
              (the embedded model, a whole answer): reads it into a bounded
              queue, which the response waits on
    ticker    a repeating timer: heartbeats and time limits. While the response
              waits inside the upstream's read it interrupts that wait (the
              generation's batches() yields INTERRUPTED and goes on); otherwise
              it queues a tick
    watcher   a read watcher on the client socket reporting FIN/RST at once,
              even while the upstream is silent

Reading an upstream in the response's own greenlet is what a token costs least
with: one wake-up and one switch, where a pump and a queue took two of each.

Cancelling is aborting the generation at once (for an upstream: FIN on its
socket, so it stops generating) and then ending the greenlet reading it, whose
`finally` closes it. Every stream ends with exactly one INFO line naming its outcome.

Never `yield` in an `except GeneratorExit` or `finally` block here: gunicorn
closes the generator when a write fails, and a yield there raises RuntimeError.
"""

from __future__ import annotations

import _socket
import contextvars
import logging
import os
import re
import socket
import time

import gevent
import gevent.event
import gevent.queue
from flask import Response

from jarvis import metrics, streams
from jarvis.backends import INTERRUPTED, Backend, ChatRequest, Interrupted
from jarvis.errors import ApiError, StreamError
from jarvis.logs import spawn, trace_id_var
from jarvis.settings import Settings
from jarvis.sse import DONE_EVENT, OPENING, PING, LastChunk, data_event, error_event, responses_error_event

log = logging.getLogger(__name__)

_QUEUE_BATCHES = 256
_QUEUE_BYTES = 8 * 1024 * 1024  # the pump waits while this much is read but not yet written
_KILL_SECONDS = 2.0

class _OpenTimeout(BaseException):
    """The backend did not accept the request within the inactivity limit (a BaseException, like
    gevent.Timeout, so that no `except Exception` inside a backend swallows it)."""


_END = object()
_WAKE = object()
_TICK = object()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: Exception):
        self.error = error


class _Result:
    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes):
        self.status = status
        self.body = body


_open_relays: set[Relay] = set()

# What a stream is doing, read from its first events only (until the answer starts): thinking
# (a reasoning field) or answering (content, or a Responses text delta).
_ANSWERING = re.compile(rb'"content":\s*"[^"]|output_text\.delta')
_THINKING = re.compile(rb'"reasoning(?:_content)?":\s*"[^"]|reasoning_summary_text\.delta|reasoning_text\.delta')


def open_stream_count() -> int:
    return len(_open_relays)


def interrupt_all(reason: str) -> int:
    """End every open stream with `reason` (used at shutdown); return how many there were."""
    relays = list(_open_relays)
    for relay in relays:
        relay.interrupt(reason)
    return len(relays)


_STOP_ERRORS = {
    "shutdown": StreamError("server_shutdown", "Jarvis is shutting down; send the request again in a moment",
                            "server_error"),
    "deleted": StreamError("conversation_deleted", "The conversation was deleted while its answer streamed",
                           "invalid_request_error"),
}


class Relay:
    """One chat completion on its way from a backend to a client."""

    def __init__(self, backend: Backend, request: ChatRequest, settings: Settings, environ: dict,
                 observer=None):
        self.backend = backend
        # Optional: .events(batch) -> the batch to send (it may rewrite it), .finish(status) -> payloads to
        # send before [DONE] when a stream completes or is stopped, .waiting() -> payloads to send while
        # the backend has nothing yet (a queued model), and .ended(outcome, error_message).
        self.observer = observer
        self.request = request
        # The Responses API streams named events, relayed whole, and ends without [DONE].
        self.whole_events = request.endpoint == "responses"
        self.done = b"" if self.whole_events else DONE_EVENT
        self.heartbeat = settings.heartbeat_seconds
        self.inactivity = settings.stream_inactivity_seconds
        self.max_seconds = settings.stream_max_seconds
        self.max_streams = settings.max_streams
        # Heartbeats go out at most a quarter heartbeat late; limits are checked as often.
        self.tick_seconds = min(self.heartbeat, self.inactivity, self.max_seconds) / 4
        # The pump's queue to the response, made with the pump (an upstream's stream needs neither).
        self.queue: gevent.queue.Queue | None = None
        self.queued_bytes = 0
        self.room: gevent.event.Event | None = None  # set while queued_bytes is under _QUEUE_BYTES
        self.watcher = ClientWatcher(environ, self._client_gone)
        self.pump: gevent.Greenlet | None = None
        self.generation = None
        # The backend is opened by the greenlet calling open(), and an interruptible generation read
        # by the one iterating stream() (`reader`), which closes it; `waiting` while it waits inside
        # the backend (open, or the generation's batches()).
        self.direct = False
        self.reader = None
        self.waiting = False
        self.generation_closed = False
        self.to_client = False  # the stream is a response body (not a page's run): its last bytes say so
        self.stop_reason: str | None = None
        self.stop_error: StreamError | None = None  # what a stop for another reason tells the client
        self.outcome = "client_stop"
        self.events = 0
        self.started = time.monotonic()
        self.first_event_at: float | None = None
        self.last_event = self.started
        self.last_write = self.started  # the last bytes written to the client, a heartbeat included
        self.error_code: str | None = None
        self.error_message: str | None = None
        self.stopped_at: float | None = None  # first stop signal: client gone, Stop, shutdown, ...
        self.client_left_by: str | None = None  # "fin" or "reset", as the watcher saw it
        self.upstream_closed_at: float | None = None
        self.closed = False
        self.counted = False
        self.bytes = 0  # relayed to the client (before SSE framing)
        self.queued = False  # the backend said it has nothing yet (the embedded model serving another answer)
        self.thinking = False
        self.answering = False

    # -- start ---------------------------------------------------------------

    def open(self) -> None:
        """Open the backend in this greenlet (watched: a stop or the inactivity limit interrupts it) and
        return once it has accepted, or raise ApiError. Then an upstream's stream is read by whoever
        iterates stream(); any other backend's, and every whole answer, by a pump greenlet."""
        try:
            if len(_open_relays) >= self.max_streams:
                self.outcome = "refused"
                raise ApiError(429, f"This worker already serves {self.max_streams} streams (JARVIS_MAX_STREAMS); "
                                    "try again shortly", code="too_many_streams",
                               headers={"Retry-After": "1"})
            _open_relays.add(self)
            streams.watch(_open_relays)
            metrics.ACTIVE_STREAMS.inc()
            self.counted = True
            self.watcher.start()
            self.generation = self._open_backend()
            if self.request.stream and getattr(self.generation, "interruptible", False):
                self.direct = True
            else:
                self.queue = gevent.queue.Queue(_QUEUE_BATCHES)
                self.room = gevent.event.Event()
                self.room.set()
                self.pump = spawn(self._pump)
        except BaseException as error:
            if isinstance(error, ApiError):
                self.error_code, self.error_message = error.code, error.message
            self.close()
            raise

    def _open_backend(self):
        """backend.open(), interrupted by a stop (`_interrupt_wait`) and, streamed or not, ended when
        the backend has not answered at all within the inactivity limit: it never will."""
        if self.stop_reason:
            raise self._stopped_before_start()
        self.reader = gevent.getcurrent()
        self.waiting = True
        try:
            with gevent.Timeout(self.inactivity, _OpenTimeout):
                generation = self.backend.open(self.request)
        except Interrupted:
            raise self._stopped_before_start() from None
        except _OpenTimeout:
            self.outcome = "inactivity"
            raise ApiError(504, "The upstream did not start answering within JARVIS_STREAM_INACTIVITY_SECONDS",
                           type_="upstream_error", code="upstream_timeout") from None
        except ApiError:
            self.outcome = "upstream_error"
            raise
        except StreamError as error:
            self.outcome = "upstream_error"
            raise ApiError(502, str(error), type_="upstream_error", code=error.code) from None
        except Exception as error:  # a bug: a clear 502 rather than a traceback to the client
            log.exception("opening the backend failed")
            self.outcome = "upstream_error"
            raise ApiError(502, f"Jarvis failed while opening the backend ({type(error).__name__}); see the "
                                "server log", type_="upstream_error", code="internal_error") from None
        finally:
            self.waiting = False
        if self.stop_reason:  # stopped as it opened
            self._close_generation(generation)
            raise self._stopped_before_start()
        return generation

    def _wait_for(self, wanted: type, seconds: float, timeout_code: str, timeout_message: str):
        """Wait for an item of type `wanted` from the pump, before any byte went to the client."""
        deadline = time.monotonic() + seconds
        while True:
            if self.stop_reason:
                raise self._stopped_before_start()
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except gevent.queue.Empty:
                self.outcome = "inactivity"
                raise ApiError(504, timeout_message, type_="upstream_error", code=timeout_code)
            if isinstance(item, _Failure):
                self.outcome = "upstream_error"
                error = item.error
                if isinstance(error, ApiError):
                    raise error
                raise ApiError(502, str(error), type_="upstream_error", code=error.code)
            if isinstance(item, wanted):
                return item

    def _stopped_before_start(self) -> ApiError:
        self.outcome = self.stop_reason
        if self.stop_reason == "shutdown":
            return ApiError(503, "Jarvis is shutting down; send the request again in a moment", code="server_shutdown")
        if self.stop_reason == "deleted":
            return ApiError(404, "The conversation was deleted", code="conversation_deleted")
        # 499: nginx's "client closed request"; nobody is left to read it.
        return ApiError(499, "The client closed the connection", code="client_closed")

    # -- the pump greenlet -------------------------------------------------

    def _pump(self) -> None:
        """Read the opened generation into the queue (a backend that is not an upstream's stream)."""
        generation = self.generation
        put = self.queue.put
        try:
            if self.request.stream:
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
                put(_END)
            else:
                put(_Result(*generation.result()))
        except (ApiError, StreamError) as error:
            put(_Failure(error))
        except Exception as error:  # a bug: report it in-band rather than hang the client
            log.exception("backend failed")
            put(_Failure(StreamError("internal_error", f"Jarvis failed while reading the backend "
                                                       f"({type(error).__name__}); see the server log")))
        finally:
            self._close_generation(generation)

    def _close_generation(self, generation) -> None:
        self.generation_closed = True
        try:
            generation.close()
        except Exception:
            log.warning("closing the backend generation failed", exc_info=True)
        self.upstream_closed_at = time.monotonic()

    def _put_batch(self, batch: list[bytes]) -> None:
        """Queue a batch; past _QUEUE_BYTES, wait until the response has written enough of it."""
        self.queued_bytes += sum(map(len, batch))
        self.queue.put(batch)
        if self.queued_bytes > _QUEUE_BYTES:
            self.room.clear()
            self.room.wait()

    def _gathered(self, batch: list[bytes]) -> list[bytes]:
        """The batch and every batch queued right behind it (not a tick, the end or a failure)."""
        queue = self.queue
        while queue.qsize():
            following = queue.peek_nowait()
            if type(following) is not list or not following:
                break
            batch = batch + queue.get_nowait()
        return batch

    def _taken(self, batch: list[bytes]) -> None:
        self.queued_bytes -= sum(map(len, batch))
        if self.queued_bytes <= _QUEUE_BYTES and not self.room.is_set():
            self.room.set()

    # -- stop signals from other greenlets -----------------------------------

    def _client_gone(self, how: str) -> None:
        self.client_left_by = how
        self._stop("client_stop")

    def interrupt(self, reason: str, error: StreamError | None = None) -> None:
        """Stop this stream from another greenlet: shutdown, deleted (its conversation), stopped (on
        purpose), detached (nobody watching); or for any other reason, ending with `error`."""
        if error is not None and self.stop_reason is None:
            self.stop_error = error
        self._stop(reason)

    def _stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.stopped_at = time.monotonic()
        # Cancel at the source now, not when the response greenlet or the pump next get to run.
        if self.generation is not None:
            self.generation.abort()
        if self.pump is not None:
            self.pump.kill(block=False)
        gevent.get_hub().loop.run_callback(self._interrupt_wait)  # opening, or reading an upstream
        if self.queue is None:
            return  # opening (interrupted above), or an upstream's stream (aborted above)
        try:
            self.queue.put_nowait(_WAKE)
        except gevent.queue.Full:
            pass  # the response greenlet has plenty to read and checks stop_reason each turn

    def _interrupt_wait(self) -> None:
        """In the hub: end the reader's wait inside the backend, if it is waiting there."""
        if self.waiting:
            self.reader.throw(Interrupted)

    # -- the response ----------------------------------------------------------

    def sse_response(self) -> Response:
        self.to_client = True
        response = sse_response(self.stream())
        response.call_on_close(self.close)  # covers a generator that never started
        return response

    def stream(self):
        """The stream as SSE bytes, from the opening comment to [DONE] (or an error event and [DONE])."""
        trace_id_var.set(self.request.trace_id)
        # One repeating timer per stream drives heartbeats and time limits, rather than a timeout
        # on every wait: the loops below run once per chunk.
        ticker = gevent.get_hub().loop.timer(self.tick_seconds, self.tick_seconds)
        ticker.start(self._tick)
        try:
            yield OPENING  # gunicorn sends the headers with the first body write
            self.last_write = time.monotonic()
            if self.direct:
                yield from self._read_directly()
            else:
                yield from self._read_queue()
        except GeneratorExit:
            self.outcome = "client_stop"
            raise
        finally:
            ticker.stop()
            ticker.close()
            self.close()

    def _read_directly(self):
        """Read the generation in this greenlet: each batch is written before the next read."""
        batches = self.generation.batches()
        self.reader = gevent.getcurrent()
        while True:
            if self.stop_reason:
                yield from self._stopped()
                return
            self.waiting = True
            try:
                batch = next(batches, _END)
            except (ApiError, StreamError) as error:
                if self.stop_reason:
                    continue  # the stop ended the read: report the stop, not the broken connection
                self.outcome = "upstream_error"
                yield self._fail(error)
                return
            except Exception as error:  # a bug: report it in-band rather than hang the client
                log.exception("backend failed")
                yield self._fail(StreamError("internal_error", f"Jarvis failed while reading the backend "
                                                               f"({type(error).__name__}); see the server log"))
                return
            except Interrupted:  # a wait in the generation that does not expect one: a bug, and it has ended
                log.exception("the backend's stream was interrupted where it could not be")
                yield self._fail(self._internal_error())
                return
            finally:
                self.waiting = False
            if batch is INTERRUPTED:
                if (yield from self._ticked()):
                    return
            elif batch is _END:
                if self.stop_reason:
                    continue
                self.outcome = "complete"
                yield self._last(self._closing_events("complete") + self.done)
                return
            elif batch:
                if self.first_event_at is None and len(batch) > 1:
                    # The client's first token goes out before the rest of a first burst is framed.
                    if (yield from self._sent(batch[:1])):
                        return
                    batch = batch[1:]
                if (yield from self._sent(batch)):
                    return
            else:
                yield from self._nothing_yet()

    def _read_queue(self):
        """Wait on the pump's queue: batches, ticks, the end or a failure."""
        get = self.queue.get
        while True:
            if self.stop_reason:
                yield from self._stopped()
                return
            item = get()
            if type(item) is list:
                if item:
                    if self.queue.qsize():  # more waiting (this greenlet lagged): one write for all
                        item = self._gathered(item)
                    self._taken(item)
                    if (yield from self._sent(item)):
                        return
                else:
                    yield from self._nothing_yet()
            elif item is _TICK:
                if (yield from self._ticked()):
                    return
            elif item is _END:
                self.outcome = "complete"
                yield self._last(self._closing_events("complete") + self.done)
                return
            elif isinstance(item, _Failure):
                yield self._fail(item.error)
                return

    # Both loops' steps, as generators that yield what goes to the client and return True when that
    # ended the stream: `if (yield from self._sent(batch)): return`.

    def _sent(self, batch: list[bytes]):
        """The batch as SSE bytes; the end when handling it failed or the stream reached its maximum."""
        data = self._handled(batch)
        if data is None:
            yield self._fail(self._internal_error())
            return True
        if data:
            yield data
            self.last_write = self.last_event
        if self.last_write - self.started >= self.max_seconds:
            yield self._fail(self._limit_reached(self.last_write))
            return True
        return False

    def _ticked(self):
        """On a tick: the end when a time limit is reached, else a heartbeat if one is due."""
        now = time.monotonic()
        limit = self._limit_reached(now)
        if limit is not None:
            yield self._fail(limit)
            return True
        if now - self.last_write >= self.heartbeat:
            self.last_write = now
            yield PING
        return False

    def _handled(self, batch: list[bytes]) -> bytes | None:
        """The batch as SSE bytes; None when handling it failed (a bug on the page path)."""
        try:
            return self._events(batch)
        except Exception:  # end in-band rather than cut the stream
            log.exception("processing the backend's events failed")
            self._stop("internal")
            return None

    def _internal_error(self) -> StreamError:
        return StreamError("internal_error", "Jarvis failed while handling the answer; see the server log",
                           "server_error")

    def _nothing_yet(self):
        self.last_event = time.monotonic()  # the backend is alive but has nothing yet
        self.queued = True
        waiting = self._observed_waiting()
        if waiting:
            yield waiting

    def _last(self, data: bytes) -> bytes:
        """The stream's last bytes: marked as such when they go straight to a client (jarvis.worker
        then ends the chunked body in the same write)."""
        return LastChunk(data) if self.to_client else data

    def _tick(self) -> None:
        if self.direct:
            if self.waiting:
                self.reader.throw(Interrupted)
            return
        try:
            self.queue.put_nowait(_TICK)
        except gevent.queue.Full:
            pass  # the response has plenty to read; limits are checked when it gets here

    def _events(self, batch: list[bytes]) -> bytes:
        now = time.monotonic()
        if self.first_event_at is None:
            self.first_event_at = now
        self.last_event = now
        self.events += len(batch)
        self.bytes += sum(map(len, batch))
        if not self.answering:
            self._phase_of(batch)
        if self.observer is not None:
            batch = self.observer.events(batch)
            if not batch:
                return b""
        if self.whole_events:
            return b"".join([block + b"\n\n" for block in batch])
        if len(batch) == 1:
            return data_event(batch[0])
        return b"".join([data_event(payload) for payload in batch])

    def _closing_events(self, status: str) -> bytes:
        """What the observer adds before [DONE] (the page's stats and status), if anything."""
        if self.observer is None:
            return b""
        return b"".join(data_event(payload) for payload in self.observer.finish(status))

    def _observed_waiting(self) -> bytes:
        if self.observer is None:
            return b""
        return b"".join(data_event(payload) for payload in self.observer.waiting())

    def _stopped(self):
        if self.stop_reason == "client_stop":
            self.outcome = "client_stop"
            return
        if self.stop_error is not None:
            yield self._fail(self.stop_error)
            return
        if self.stop_reason in _STOP_ERRORS:
            yield self._fail(_STOP_ERRORS[self.stop_reason])
            return
        # Stopped on purpose (the Stop button, or nobody watching): a clean end for whoever watches.
        self.outcome = self.stop_reason
        yield self._last(self._closing_events("stopped") + DONE_EVENT)

    def _limit_reached(self, now: float) -> StreamError | None:
        if now - self.started >= self.max_seconds:
            return StreamError("stream_max_duration", f"The stream reached JARVIS_STREAM_MAX_SECONDS "
                                                      f"({self.max_seconds:g} s) and was ended", "timeout_error")
        if now - self.last_event >= self.inactivity:
            return StreamError("stream_inactivity", f"The backend sent nothing for {self.inactivity:g} s "
                                                    "(JARVIS_STREAM_INACTIVITY_SECONDS); the stream was ended",
                               "timeout_error")
        return None

    def _fail(self, error: StreamError | ApiError) -> bytes:
        if isinstance(error, ApiError):
            error = StreamError(error.code or "upstream_error", str(error), "upstream_error")
        self.outcome = _OUTCOMES.get(error.code, "upstream_error")
        self.error_code = error.code
        self.error_message = str(error.error.get("message") or error)
        return self._last(responses_error_event(error.error) if self.whole_events else error_event(error.error))

    def _phase_of(self, batch: list[bytes]) -> None:
        for payload in batch:
            if _ANSWERING.search(payload):
                self.answering = True
                return
            if not self.thinking and _THINKING.search(payload):
                self.thinking = True

    def describe(self, now: float) -> dict:
        """What /debug/streams and a stack dump show of this stream, from memory."""
        page = self.observer is not None
        watchers = getattr(self.observer, "watchers", None)
        if watchers is not None and not watchers:
            phase = "detached"  # a page's answer that nobody watches now
        elif self.generation is None:
            phase = "waiting for headers"
        elif self.answering:
            phase = "answering"
        elif self.thinking:
            phase = "thinking"
        elif self.queued and self.first_event_at is None:
            phase = "queued"
        else:
            phase = "waiting for first token"
        model = self.request.body.get("model")
        return {"trace_id": self.request.trace_id, "route": "page" if page else f"/v1/{self.request.endpoint}",
                "model": model[:100] if isinstance(model, str) else None, "upstream": self.upstream,
                "phase": phase, "age_s": round(now - self.started, 3),
                "since_last_byte_s": round(now - self.last_event, 3), "events": self.events, "bytes": self.bytes,
                "client_attached": bool(watchers) if watchers is not None else not self.stop_reason,
                "worker": os.getpid()}

    # -- non-streaming -----------------------------------------------------------

    def result_response(self) -> Response:
        """Wait for a whole answer, cancelling the backend if the client leaves first."""
        try:
            result = self._wait_for(_Result, self.max_seconds, "upstream_timeout",
                                    "The upstream did not finish within JARVIS_STREAM_MAX_SECONDS")
            self.first_event_at = time.monotonic()
            self.events = 1
            self.outcome = "complete"
            return Response(result.body, status=result.status, content_type="application/json")
        finally:
            self.close()

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """Stop the watcher, cancel the backend unless it finished, and log the one end line."""
        if self.closed:
            return
        self.closed = True
        _open_relays.discard(self)
        self.watcher.stop()
        if self.pump is not None and self.outcome != "complete":
            self.pump.kill(block=True, timeout=_KILL_SECONDS)
        if (self.generation is not None and not self.generation_closed
                and (self.pump is None or self.pump.dead)):  # (a pump killed before it ran never closed it)
            self._close_generation(self.generation)  # drains after [DONE] to reuse the connection
        self._log_end()
        self._record_metrics()
        if self.observer is not None:
            try:
                self.observer.ended(self.outcome, self.error_message)
            except Exception:
                log.exception("recording the end of the stream failed")

    @property
    def upstream(self) -> str:
        """The upstream that answered (several: the one the router chose; none chosen yet: '-')."""
        if self.generation is not None:
            return getattr(self.generation, "upstream", self.backend.name)
        return "-" if self.backend.name == "router" else self.backend.name

    def _record_metrics(self) -> None:
        if self.counted:
            metrics.ACTIVE_STREAMS.dec()
        metrics.STREAMS.labels(self.outcome, self.request.endpoint, self.upstream).inc()
        metrics.STREAM_DURATION.observe(time.monotonic() - self.started)
        if self.first_event_at is not None:
            metrics.TIME_TO_FIRST_TOKEN.observe(self.first_event_at - self.started)
        if self.stopped_at is not None and self.upstream_closed_at is not None:
            metrics.CANCEL_LATENCY.observe(max(0.0, self.upstream_closed_at - self.stopped_at))
        if self.outcome == "upstream_error":
            metrics.UPSTREAM_ERRORS.labels(self.error_code or "unknown", self.upstream).inc()

    def _log_end(self) -> None:
        now = time.monotonic()
        fields = {"outcome": self.outcome, "events": self.events,
                  "ttft_ms": round((self.first_event_at - self.started) * 1000, 1) if self.first_event_at else None,
                  "duration_ms": round((now - self.started) * 1000, 1)}
        extra = ""
        if self.error_code:
            fields["error"] = self.error_code
            extra += f" error={self.error_code}"
        if self.client_left_by is not None:
            fields["client"] = self.client_left_by
            extra += f" client={self.client_left_by}"
        if self.stopped_at is not None and self.upstream_closed_at is not None:
            # Stop signal (client gone, Stop, shutdown...) to the generation cancelled at its source.
            fields["cancel_ms"] = round(max(0.0, self.upstream_closed_at - self.stopped_at) * 1000, 1)
            extra += f" cancel_ms={fields['cancel_ms']}"
        # Which upstream answered, and the id it logged this request under, to join its log with ours.
        fields["endpoint"], fields["upstream"] = self.request.endpoint, self.upstream
        fields["upstream_id"] = self.request.upstream_request_id
        log.info("stream end outcome=%s events=%d ttft_ms=%s duration_ms=%.1f endpoint=%s upstream=%s upstream_id=%s%s",
                 self.outcome, self.events, "-" if fields["ttft_ms"] is None else fields["ttft_ms"],
                 fields["duration_ms"], self.request.endpoint, self.upstream, fields["upstream_id"], extra,
                 extra={"fields": fields})


_OUTCOMES = {
    "stream_inactivity": "inactivity",
    "stream_max_duration": "max_duration",
    "server_shutdown": "shutdown",
    "conversation_deleted": "deleted",
    "answer_too_long": "too_long",
    "answer_not_saved": "not_saved",
}


class _SSEResponse(Response):
    """A Response whose body goes to the server as the generator itself: no werkzeug wrappers
    (ClosingIterator, iter_encoded) in front of every chunk. The generator yields bytes only."""

    def get_app_iter(self, environ: dict):
        if environ["REQUEST_METHOD"] == "HEAD":
            return super().get_app_iter(environ)
        return _Body(self)


class _Body:
    """Iterates as the generator; close() is the response's (the generator's close, then every
    call_on_close callback), which the server calls when it is done, started or not."""

    __slots__ = ("response",)

    def __init__(self, response: Response):
        self.response = response

    def __iter__(self):
        return iter(self.response.response)

    def close(self) -> None:
        self.response.close()


def sse_response(events) -> Response:
    """A streaming response for SSE bytes: the headers that keep every proxy and client from buffering."""
    response = _SSEResponse(events, status=200, content_type="text/event-stream; charset=utf-8")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    response.implicit_sequence_conversion = False  # middleware calling get_data() must fail loudly
    return response


class ClientWatcher:
    """Reports a client's FIN or RST the moment it arrives, by peeking at its socket.

    A libev read watcher on the client's descriptor, not a greenlet: starting and
    stopping one costs no spawn, no switch and no kill per stream. When the
    descriptor turns readable the hub peeks (without blocking, through a plain
    socket object on the same descriptor): EOF is a FIN, an error a reset, and
    data the client's pipelined next request — then it stops watching and lets
    a failing heartbeat write report a disconnect instead. `on_gone` runs right
    there, in the hub, in the context (trace id) of whoever started the watch,
    so it must never block: it may set flags, shut a socket down, kill a greenlet
    without waiting, put_nowait, set an Event, spawn.
    Skipped where peeking is impossible or unsafe (TLS, HTTP/2, no socket). The
    relay stops the watcher before gunicorn reads the next request on the socket.
    """

    def __init__(self, environ: dict, on_gone):
        sock = environ.get("gunicorn.socket")
        usable = (sock is not None and getattr(sock, "cipher", None) is None
                  and str(environ.get("SERVER_PROTOCOL", "")).startswith("HTTP/1"))
        self.sock = sock if usable else None
        self.on_gone = on_gone
        self.io = None
        self.context = None

    def start(self) -> None:
        if self.sock is None:
            return
        fileno = self.sock.fileno()
        if fileno < 0:
            return
        self.context = contextvars.copy_context()
        loop = gevent.get_hub().loop
        # 1: readable. The highest priority: in a loop turn with hundreds of streams' reads pending, a
        # client's FIN is handled (and its upstream cancelled) before them, not after.
        self.io = loop.io(fileno, 1, priority=getattr(loop, "MAXPRI", None))
        self.io.start(self._readable)

    def _readable(self) -> None:
        """In the hub: never block, never raise."""
        io = self.io
        if io is None:
            return
        how = None
        try:
            plain = _socket.socket(fileno=io.fd)
        except OSError:
            how = "reset"  # the descriptor is gone
        else:
            try:
                data = plain.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                return  # woken for nothing: keep watching
            except OSError:
                how = "reset"
            else:
                how = None if data else "fin"
            finally:
                plain.detach()
        self.stop()
        if how is not None:
            try:  # at once, in the hub: a spawned greenlet would wait for the loop's next turn (tens of ms
                # under load), and every on_gone only sets flags, shuts a socket down and queues a wake-up
                self.context.run(self.on_gone, how)
            except Exception:
                log.exception("reporting a client's disconnect failed")

    def stop(self) -> None:
        io, self.io = self.io, None
        if io is not None:
            io.stop()
            io.close()
