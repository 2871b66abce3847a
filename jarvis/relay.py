"""The relay: the one place where a backend's output becomes a client's SSE stream.

Nothing ever waits on one thing while another matters. The response (gunicorn's greenlet) opens the
backend — connects, sends, waits for the answer's headers, interrupted by a stop and bounded by the
inactivity limit — then reads an upstream's stream itself, or takes what a pump read (jarvis.pump:
the embedded model, whole answers); it writes events, `: ping` heartbeats while the backend is quiet,
and the in-band error + [DONE] on any abnormal end. A repeating timer (the ticker) keeps time
(jarvis.clock): while the response waits inside an upstream's read it interrupts that wait (batches()
yields INTERRUPTED and goes on), else it queues a tick. The client's socket is watched for FIN/RST
(jarvis.worker.ClientWatcher), even while the upstream is silent. Reading an upstream in the
response's own greenlet costs a token one wake-up and one switch, where a pump and a queue took two.

Cancelling is aborting the generation at once (for an upstream: FIN on its socket, so it stops
generating) and then ending the greenlet reading it, whose `finally` closes it. The relay writes down
what happened (jarvis.endings.Happened); how the stream ended is decided once, in jarvis.endings, when
it closes: one INFO line, the metrics and (through its observer) the saved answer all read that.

Never `yield` in an `except GeneratorExit` or `finally` block here: gunicorn closes the generator when
a write fails, and a yield there raises RuntimeError.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

import gevent
from flask import Response

from jarvis import metrics, streams
from jarvis.backends import INTERRUPTED, Backend, ChatRequest, Generation, Interrupted
from jarvis.clock import Clock
from jarvis.endings import ENDINGS, Ending, Happened, Outcome, decide, report
from jarvis.errors import ApiError, StreamError
from jarvis.logs import trace_id_var
from jarvis.pump import END, TICK, WAKE, Failure, Pump
from jarvis.responses import sse_response
from jarvis.settings import Settings
from jarvis.sse import DONE_EVENT, OPENING, PING, LastChunk, data_event, error_event, responses_error_event
from jarvis.usage import Meter, Tally
from jarvis.worker import ClientWatcher

log = logging.getLogger(__name__)

_KILL_SECONDS = 2.0


class _OpenTimeout(BaseException):
    """The backend did not accept the request within the inactivity limit (a BaseException, like
    gevent.Timeout, so that no `except Exception` inside a backend swallows it)."""


class StreamObserver(Protocol):
    """What a relay tells the one who asked for it without being its client (a page's run), and the
    only things it asks of it."""

    def events(self, batch: list[bytes]) -> list[bytes]:
        """The backend's payloads; returns those to send (it may rewrite them)."""

    def finish(self, status: str) -> list[bytes]:
        """Payloads to send before [DONE] when the stream completes or is stopped (`status`)."""

    def waiting(self) -> list[bytes]:
        """Payloads to send while the backend has nothing yet (the embedded model serves another answer)."""

    def watched(self) -> bool:
        """Whether anybody watches the stream now (nobody: it is detached, and still runs)."""

    def ended(self, ending: Ending, error_message: str | None) -> None:
        """The stream has ended, as `ending` says; called once, after the end line."""

    def tokens(self) -> tuple[int, int]:
        """(prompt, completion) tokens the answer used, as its stats count them."""


class Relay:
    """One chat completion on its way from a backend to a client."""

    def __init__(self, backend: Backend, request: ChatRequest, settings: Settings, environ: dict,
                 observer: StreamObserver | None = None, meter: Meter | None = None):
        self.backend = backend
        self.observer = observer
        self.request = request
        # What it used (jarvis.usage), counted to request.account by `meter` when it ends; `release` (set by
        # the caller, jarvis.limits): gives back the account's stream (max_streams) before the last bytes go out.
        self.meter = meter
        self.release = None
        # The Responses API streams named events, relayed whole, and ends without [DONE].
        self.whole_events = request.endpoint == "responses"
        self.done = b"" if self.whole_events else DONE_EVENT
        self.tally = Tally(each_event=self.whole_events)
        self.max_streams = settings.max_streams
        self.clock = Clock(settings)
        self.client = ClientWatcher(environ, self._client_gone)
        self.pump: Pump | None = None  # a backend that is not an upstream's stream; see jarvis.pump
        self.generation: Generation | None = None
        # The backend is opened by the greenlet calling open(), and an upstream's stream read by the one
        # iterating stream() (`reader`), which closes it; `in_backend` while it waits inside the backend
        # (open, or the generation's batches()), where a stop or a tick interrupts it.
        self.direct = False
        self.reader = None
        self.in_backend = False
        self.generation_closed = False
        self.to_client = False  # the stream is a response body (not a page's run): its last bytes say so
        self.happened = Happened()
        self.stop_error: StreamError | None = None  # what a stop for another reason tells the client
        self.ending: Ending | None = None  # decided once, when the stream closes
        self.events = 0
        self.first_event_at: float | None = None
        self.stopped_at: float | None = None  # first stop signal: client gone, Stop, shutdown, ...
        self.client_left_by: str | None = None  # "fin" or "reset", as the client watcher saw it
        self.upstream_closed_at: float | None = None
        self.closed = False
        self.counted = False
        self.bytes = 0  # relayed to the client (before SSE framing)
        self.queued = False  # the backend said it has nothing yet (the embedded model serving another answer)
        self.thinking = False
        self.answering = False

    @property
    def stopping(self) -> Outcome | None:
        """Why the stream is being stopped, once a stop came (from any greenlet)."""
        return self.happened.stop

    @property
    def chosen_upstream(self) -> str | None:
        """The upstream the router chose for this stream (its configured name), once opened."""
        return self.generation.upstream if self.generation is not None else None

    # -- start ---------------------------------------------------------------

    def open(self) -> None:
        """Open the backend in this greenlet (watched: a stop or the inactivity limit interrupts it) and
        return once it has accepted, or raise ApiError. Then an upstream's stream is read by whoever
        iterates stream(); any other backend's, and every whole answer, by a pump."""
        try:
            if streams.open_count() >= self.max_streams:
                self.happened.refused = True
                raise ApiError(429, f"This worker already serves {self.max_streams} streams (JARVIS_MAX_STREAMS); "
                                    "try again shortly", code="too_many_streams",
                               headers={"Retry-After": "1"})
            streams.register(self)
            metrics.ACTIVE_STREAMS.inc()
            self.counted = True
            self.client.start()
            self.generation = self._open_backend()
            if self.request.stream and self.generation.interruptible:
                self.direct = True
            else:
                self.pump = Pump(self.generation, self.request.stream, self._close_generation)
        except BaseException as error:
            if isinstance(error, ApiError) and not self.happened.failed:
                self.happened.error_code, self.happened.error_message = error.code, error.message
            self.close()
            raise

    def _open_backend(self) -> Generation:
        """backend.open(), interrupted by a stop (`_interrupt_wait`) and, streamed or not, ended when
        the backend has not answered at all within the inactivity limit: it never will."""
        if self.stopping:
            raise self._stopped_before_start()
        self.reader = gevent.getcurrent()
        self.in_backend = True
        try:
            with gevent.Timeout(self.clock.inactivity, _OpenTimeout):
                generation = self.backend.open(self.request)
        except Interrupted:
            raise self._stopped_before_start() from None
        except _OpenTimeout:
            self.happened.timed_out = True
            raise ApiError(504, "The upstream did not start answering within JARVIS_STREAM_INACTIVITY_SECONDS",
                           type_="upstream_error", code="upstream_timeout") from None
        except ApiError as error:
            self.happened.fail(error)
            raise
        except StreamError as error:
            failure = ApiError(502, str(error), type_="upstream_error", code=error.code)
            self.happened.fail(failure)
            raise failure from None
        except Exception as error:  # a bug: a clear 502 rather than a traceback to the client
            log.exception("opening the backend failed")
            failure = ApiError(502, f"Jarvis failed while opening the backend ({type(error).__name__}); see the "
                                    "server log", type_="upstream_error", code="internal_error")
            self.happened.fail(failure)
            raise failure from None
        finally:
            self.in_backend = False
        if self.stopping:  # stopped as it opened
            self._close_generation(generation)
            raise self._stopped_before_start()
        return generation

    def _stopped_before_start(self) -> ApiError:
        status, message, code = ENDINGS[self.stopping].before_start or ENDINGS[Outcome.CLIENT_STOP].before_start
        return ApiError(status, message, code=code)

    def _close_generation(self, generation: Generation) -> None:
        self.generation_closed = True
        try:
            generation.close()
        except Exception:
            log.warning("closing the backend generation failed", exc_info=True)
        self.upstream_closed_at = time.monotonic()

    # -- stop signals from other greenlets -----------------------------------

    def _client_gone(self, how: str) -> None:
        self.client_left_by = how
        self._stop(Outcome.CLIENT_STOP)

    def interrupt(self, reason: Outcome, error: StreamError | None = None) -> None:
        """Stop this stream from another greenlet: shutdown, deleted (its conversation), stopped (on
        purpose), detached (nobody watching); or for any other reason, ending with `error`."""
        if error is not None and self.stopping is None:
            self.stop_error = error
        self._stop(reason)

    def _stop(self, reason: Outcome) -> None:
        if self.stopping is None:
            self.happened.stop = reason
            self.stopped_at = time.monotonic()
        # Cancel at the source now, not when the response greenlet or the pump next get to run.
        if self.generation is not None:
            self.generation.abort()
        gevent.get_hub().loop.run_callback(self._interrupt_wait)  # opening, or reading an upstream
        if self.pump is not None:
            self.pump.kill(block=False)
            self.pump.nudge(WAKE)

    def _interrupt_wait(self) -> None:
        """In the hub: end the reader's wait inside the backend, if it is waiting there."""
        if self.in_backend:
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
        ticker = gevent.get_hub().loop.timer(self.clock.tick_seconds, self.clock.tick_seconds)
        ticker.start(self._tick)
        try:
            yield OPENING  # gunicorn sends the headers with the first body write
            self.clock.last_write = time.monotonic()
            yield from self._read()
        except GeneratorExit:
            self.happened.client_left_mid_write = True
            if self.stopped_at is None:  # the failed write was the first sign: the cancel is timed from it
                self.stopped_at = time.monotonic()
            raise
        finally:
            ticker.stop()
            ticker.close()
            self.close()

    def _read(self):
        """Read the backend until the stream ends: an upstream's stream in this greenlet (each batch
        written before the next read), anything else from its pump. Both give the same items."""
        take = self._direct_reader() if self.direct else self.pump.next
        while True:
            if self.stopping and not self._delivered():
                yield from self._stopped()
                return
            item = take()
            if type(item) is list:
                if not item:
                    yield from self._nothing_yet()
                    continue
                if self.first_event_at is None and len(item) > 1:
                    # The client's first token goes out before the rest of a first burst is framed.
                    if (yield from self._sent(item[:1])):
                        return
                    item = item[1:]
                if (yield from self._sent(item)):
                    return
            elif item is TICK:
                if (yield from self._ticked()):
                    return
            elif item is END:
                if not self.stopping or self._delivered():  # (else the stop says how it ended)
                    yield self._completed()
                    return
            elif isinstance(item, Failure):
                yield self._fail(item.error)
                return

    def _delivered(self) -> bool:
        """The backend's last event has been read: a stop that comes now (a client that hangs up the
        moment it reads it, as Codex CLI does at response.completed) does not undo a whole answer."""
        return self.direct and self.generation.finished

    def _direct_reader(self):
        """The pump's `next` for an upstream's stream read in this greenlet, where a stop or a tick
        interrupts its wait (`in_backend`): batches, TICK, END or a Failure."""
        batches = self.generation.batches()
        self.reader = gevent.getcurrent()

        def take():
            self.in_backend = True
            try:
                batch = next(batches, END)
            except (ApiError, StreamError) as error:
                # A stop ended the read: report the stop, not the broken connection.
                return WAKE if self.stopping else Failure(error)
            except Exception as error:  # a bug: report it in-band rather than hang the client
                log.exception("backend failed")
                return Failure(StreamError("internal_error", f"Jarvis failed while reading the backend "
                                                             f"({type(error).__name__}); see the server log"))
            except Interrupted:  # a wait in the generation that does not expect one: a bug, and it has ended
                log.exception("the backend's stream was interrupted where it could not be")
                return Failure(self._internal_error())
            finally:
                self.in_backend = False
            return TICK if batch is INTERRUPTED else batch

        return take

    # The loop's steps, as generators that yield what goes to the client and return True when that
    # ended the stream: `if (yield from self._sent(batch)): return`.

    def _sent(self, batch: list[bytes]):
        """The batch as SSE bytes; the end when handling it failed or the stream reached its maximum."""
        data = self._handled(batch)
        if data is None:
            yield self._fail(self._internal_error())
            return True
        if data:
            yield data
            self.clock.last_write = self.clock.last_event
        if self.clock.last_write - self.clock.started >= self.clock.max_seconds:
            yield self._fail(self.clock.limit_reached(self.clock.last_write))
            return True
        return False

    def _ticked(self):
        """On a tick: the end when a time limit is reached, else a heartbeat if one is due."""
        now = time.monotonic()
        if getattr(self.generation, "tools_running", False):
            self.clock.last_event = now  # not silent: waiting for tools (jarvis.tool_loop), each with its timeout
        limit = self.clock.limit_reached(now)
        if limit is not None:
            yield self._fail(limit)
            return True
        if self.clock.heartbeat_due(now):
            yield PING
        return False

    def _handled(self, batch: list[bytes]) -> bytes | None:
        """The batch as SSE bytes; None when handling it failed (a bug on the page path)."""
        try:
            return self._events(batch)
        except Exception:  # end in-band rather than cut the stream
            log.exception("processing the backend's events failed")
            self._stop(Outcome.UPSTREAM_ERROR)  # cancel at the source; the error is what the stream ends with
            return None

    def _internal_error(self) -> StreamError:
        return StreamError("internal_error", "Jarvis failed while handling the answer; see the server log",
                           "server_error")

    def _nothing_yet(self):
        self.clock.last_event = time.monotonic()  # the backend is alive but has nothing yet
        self.queued = True
        if self.observer is not None:
            waiting = self.observer.waiting()
            if waiting:
                yield b"".join(data_event(payload) for payload in waiting)

    def _last(self, data: bytes) -> bytes:
        """The stream's last bytes: marked as such when they go straight to a client (jarvis.worker
        then ends the chunked body in the same write). The account's stream is given back first."""
        self._release()
        return LastChunk(data) if self.to_client else data

    def _release(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            try:
                release()
            except Exception as error:  # its row dies with this process, or expires
                log.warning("could not release the account's stream (%s)", type(error).__name__)

    def _tick(self) -> None:
        if self.direct:
            if self.in_backend:
                self.reader.throw(Interrupted)
            return
        self.pump.nudge(TICK)

    def _events(self, batch: list[bytes]) -> bytes:
        now = time.monotonic()
        if self.first_event_at is None:
            self.first_event_at = now
        self.clock.last_event = now
        self.events += len(batch)
        self.bytes += sum(map(len, batch))
        self.tally.feed(batch)
        if not self.answering:
            streams.note_phase(self, batch)
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

    def _completed(self) -> bytes:
        self.happened.completed = True
        return self._last(self._closing_events("complete") + self.done)

    def _stopped(self):
        """How a stopped stream ends: nothing for a client that left; an error for a stop that says
        why (shutdown, deleted, too long, not saved); else a clean end for whoever watches."""
        reason = self.stopping
        if reason is Outcome.CLIENT_STOP:
            return
        error = self.stop_error or ENDINGS[reason].stop_error
        if error is not None:
            yield self._fail(error)
            return
        yield self._last(self._closing_events("stopped") + DONE_EVENT)

    def _fail(self, error: StreamError | ApiError) -> bytes:
        if isinstance(error, ApiError):
            error = StreamError(error.code or "upstream_error", str(error), "upstream_error")
        self.happened.fail(error)
        return self._last(responses_error_event(error.error) if self.whole_events else error_event(error.error))

    # -- non-streaming -----------------------------------------------------------

    def result_response(self) -> Response:
        """Wait for a whole answer (at most JARVIS_STREAM_MAX_SECONDS), cancelling the backend if the
        client leaves first; any failure is an ApiError, before any byte went to the client."""
        try:
            try:
                item = self.pump.whole_answer(self.clock.max_seconds, lambda: self.stopping is not None)
            except TimeoutError:
                self.happened.timed_out = True
                raise ApiError(504, "The upstream did not finish within JARVIS_STREAM_MAX_SECONDS",
                               type_="upstream_error", code="upstream_timeout") from None
            if item is None:
                raise self._stopped_before_start()
            if isinstance(item, Failure):
                error = item.error if isinstance(item.error, ApiError) else \
                    ApiError(502, str(item.error), type_="upstream_error", code=item.error.code)
                self.happened.fail(error)
                raise error
            self.first_event_at = time.monotonic()
            self.events = 1
            self.tally.whole(item.body)
            self.happened.completed = True
            return Response(item.body, status=item.status, content_type="application/json")
        finally:
            self.close()

    # -- the end ---------------------------------------------------------------

    def close(self) -> None:
        """Stop watching the client, cancel the backend unless it finished, decide how the stream ended
        and report it: the end line, the metrics, the observer."""
        if self.closed:
            return
        self.closed = True
        streams.unregister(self)
        self.client.stop()
        self.ending = ending = decide(self.happened)
        if self.pump is not None and ending.cancels_upstream:
            self.pump.kill(block=True, timeout=_KILL_SECONDS)
        if (self.generation is not None and not self.generation_closed
                and (self.pump is None or self.pump.dead)):  # (a pump killed before it ran never closed it)
            self._close_generation(self.generation)  # drains after [DONE] to reuse the connection
        if self.counted:
            metrics.ACTIVE_STREAMS.dec()
        self._release()
        report(ending, self)
        if self.generation is not None and self.meter is not None:
            self._count_usage()
        if self.observer is not None:
            try:
                self.observer.ended(ending, self.happened.error_message)
            except Exception:
                log.exception("recording the end of the stream failed")

    def _count_usage(self) -> None:
        model = self.request.body.get("model")
        prompt, completion = self.observer.tokens() if self.observer is not None else self.tally.tokens()
        try:
            self.meter.add(self.request.account, model if isinstance(model, str) and model else self.upstream,
                           prompt, completion)
        except Exception:
            log.exception("counting the stream's usage failed")

    @property
    def upstream(self) -> str:
        """The upstream that answered (several: the one the router chose; none chosen yet: '-')."""
        if self.generation is not None:
            return self.generation.upstream or self.backend.name
        return "-" if self.backend.name == "router" else self.backend.name
