"""How a stream ends: one vocabulary of outcomes, one table of what each means, one function that decides.

A relay does not choose its outcome. While it runs it writes down what happened (`Happened`: it
completed, it was refused, it timed out before starting, it failed with an error code, a stop came
for a reason, the client left in the middle of a write); when it closes, `decide()` reads that
record and returns the `Ending`, and everything that reports the end reads the same record:

    the end line      "stream end outcome=<outcome>", at the ending's log level
    the metrics       jarvis_streams_total{outcome}, and upstream errors by code
    the saved answer  its page status: complete, stopped or error (interrupted is written by
                      jarvis.leases for a run whose worker died, never by a relay)
    the client        the in-band error event a stop for this reason sends (shutdown, deleted), and
                      the HTTP status of one that came before the first byte
    the upstream      cancelled at its source unless the answer completed

Nothing outside this module assigns an outcome (tests/test_lint.py reads every module's syntax tree).
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jarvis import metrics
from jarvis.errors import ApiError, StreamError

if TYPE_CHECKING:
    from jarvis.relay import Relay

log = logging.getLogger("jarvis.relay")  # the end line has always been the relay's


class Outcome(enum.Enum):
    COMPLETE = "complete"
    CLIENT_STOP = "client_stop"  # the client left: FIN, RST, a failed write, or (page) the last tab with detach 0
    STOPPED = "stopped"  # Stop, on purpose (a page's answer)
    DETACHED = "detached"  # a page's answer nobody watched for JARVIS_DETACHED_SECONDS
    DELETED = "deleted"  # its conversation was deleted
    SHUTDOWN = "shutdown"  # the worker is stopping
    REFUSED = "refused"  # JARVIS_MAX_STREAMS reached: 429 before anything started
    INACTIVITY = "inactivity"  # the backend sent nothing for JARVIS_STREAM_INACTIVITY_SECONDS
    MAX_DURATION = "max_duration"  # JARVIS_STREAM_MAX_SECONDS reached
    TOO_LONG = "too_long"  # a page's answer grew past JARVIS_MAX_ANSWER_CHARS
    NOT_SAVED = "not_saved"  # a page's answer could not be saved, again and again
    UPSTREAM_ERROR = "upstream_error"  # the backend failed (or Jarvis did, reading it: code internal_error)


@dataclass(frozen=True)
class Ending:
    outcome: Outcome
    level: int  # of the end line
    page_status: str  # what the saved answer says: complete, stopped or error
    error_code: str | None  # the in-band error code a stream ending this way sends (None: no error of its own)
    stop_error: StreamError | None = None  # what a stop for this reason tells a client that is still there
    before_start: tuple[int, str, str] | None = None  # a stop before the first byte: (HTTP status, message, code)

    @property
    def label(self) -> str:
        """The metrics label and the end line's word."""
        return self.outcome.value

    @property
    def cancels_upstream(self) -> bool:
        """Anything but a completed answer cancels the generation at its source."""
        return self.outcome is not Outcome.COMPLETE


_CLIENT_CLOSED = (499, "The client closed the connection", "client_closed")  # nginx's 499; nobody reads it

ENDINGS: dict[Outcome, Ending] = {ending.outcome: ending for ending in [
    Ending(Outcome.COMPLETE, logging.INFO, "complete", None),
    Ending(Outcome.CLIENT_STOP, logging.INFO, "stopped", None, before_start=_CLIENT_CLOSED),
    Ending(Outcome.STOPPED, logging.INFO, "stopped", None, before_start=_CLIENT_CLOSED),
    Ending(Outcome.DETACHED, logging.INFO, "stopped", None, before_start=_CLIENT_CLOSED),
    Ending(Outcome.DELETED, logging.INFO, "error", "conversation_deleted",
           StreamError("conversation_deleted", "The conversation was deleted while its answer streamed",
                       "invalid_request_error"),
           (404, "The conversation was deleted", "conversation_deleted")),
    Ending(Outcome.SHUTDOWN, logging.INFO, "error", "server_shutdown",
           StreamError("server_shutdown", "Jarvis is shutting down; send the request again in a moment",
                       "server_error"),
           (503, "Jarvis is shutting down; send the request again in a moment", "server_shutdown")),
    Ending(Outcome.REFUSED, logging.INFO, "error", "too_many_streams"),
    Ending(Outcome.INACTIVITY, logging.INFO, "error", "stream_inactivity"),
    Ending(Outcome.MAX_DURATION, logging.INFO, "error", "stream_max_duration"),
    Ending(Outcome.TOO_LONG, logging.INFO, "error", "answer_too_long", before_start=_CLIENT_CLOSED),
    Ending(Outcome.NOT_SAVED, logging.INFO, "error", "answer_not_saved", before_start=_CLIENT_CLOSED),
    Ending(Outcome.UPSTREAM_ERROR, logging.INFO, "error", "upstream_error"),
]}

# An error a stream ended with, by its code: the outcome it means (any other code is the upstream's).
_BY_ERROR_CODE = {ending.error_code: outcome for outcome, ending in ENDINGS.items()
                  if ending.error_code not in (None, "upstream_error", "too_many_streams")}

@dataclass
class Happened:
    """What a relay saw of its stream, written as it happens; `decide()` reads it once, at the end."""

    completed: bool = False  # the backend finished and the last bytes were handed to the client
    refused: bool = False  # too many streams: never started
    timed_out: bool = False  # the backend did not answer (or finish a whole answer) in time
    failed: bool = False  # the stream ended with an error: `error_code`, before or after its first byte
    error_code: str | None = None
    error_message: str | None = None
    stop: Outcome | None = None  # the first stop signal, whatever came of it
    client_left_mid_write: bool = False  # the server closed the body: a write to the client failed

    def fail(self, error: ApiError | StreamError) -> None:
        self.failed = True
        if isinstance(error, ApiError):
            self.error_code, self.error_message = error.code, error.message
        else:
            self.error_code = error.code
            self.error_message = str(error.error.get("message") or error)


def decide(happened: Happened) -> Ending:
    """The one place where a stream's end is decided. A write to a client that left trumps everything
    (nobody saw the rest); then an answer delivered whole; then why it could not start or went wrong;
    then the stop that ended it. A relay that recorded nothing lost its client before its body began."""
    if happened.client_left_mid_write:
        outcome = Outcome.CLIENT_STOP
    elif happened.completed:
        outcome = Outcome.COMPLETE
    elif happened.refused:
        outcome = Outcome.REFUSED
    elif happened.timed_out:
        outcome = Outcome.INACTIVITY
    elif happened.failed:
        outcome = _BY_ERROR_CODE.get(happened.error_code, Outcome.UPSTREAM_ERROR)
    elif happened.stop is not None:
        outcome = happened.stop
    else:
        outcome = Outcome.CLIENT_STOP
    return ENDINGS[outcome]


def report(ending: Ending, relay: Relay) -> None:
    """The stream's one end line and its metrics, both from `ending`."""
    now = time.monotonic()
    error_code = relay.happened.error_code
    upstream = relay.upstream
    cancel_seconds = None
    if relay.stopped_at is not None and relay.upstream_closed_at is not None:
        # Stop signal (client gone, Stop, shutdown...) to the generation cancelled at its source.
        cancel_seconds = max(0.0, relay.upstream_closed_at - relay.stopped_at)

    metrics.STREAMS.labels(ending.label, relay.request.endpoint, upstream).inc()
    metrics.STREAM_DURATION.observe(now - relay.clock.started)
    if relay.first_event_at is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(relay.first_event_at - relay.clock.started)
    if cancel_seconds is not None:
        metrics.CANCEL_LATENCY.observe(cancel_seconds)
    if ending.outcome is Outcome.UPSTREAM_ERROR:
        metrics.UPSTREAM_ERRORS.labels(metrics.error_kind(error_code), upstream).inc()
    if relay.generation is not None and upstream != "-":  # it answered (then, perhaps, broke)
        metrics.UPSTREAM_UP.labels(upstream).set(0 if error_code in metrics.DOWN_KINDS else 1)
    elif error_code in metrics.DOWN_KINDS and upstream != "-":  # one upstream, unreachable before answering
        metrics.UPSTREAM_UP.labels(upstream).set(0)

    started = relay.clock.started
    fields = {"outcome": ending.label, "events": relay.events,
              "ttft_ms": round((relay.first_event_at - started) * 1000, 1) if relay.first_event_at else None,
              "duration_ms": round((now - started) * 1000, 1)}
    extra = ""
    if error_code:
        fields["error"] = error_code
        extra += f" error={error_code}"
    if relay.client_left_by is not None:
        fields["client"] = relay.client_left_by
        extra += f" client={relay.client_left_by}"
    if cancel_seconds is not None:
        fields["cancel_ms"] = round(cancel_seconds * 1000, 1)
        extra += f" cancel_ms={fields['cancel_ms']}"
    # Which upstream answered, and the id it logged this request under, to join its log with ours.
    fields["endpoint"], fields["upstream"] = relay.request.endpoint, upstream
    fields["upstream_id"] = relay.request.upstream_request_id
    log.log(ending.level, "stream end outcome=%s events=%d ttft_ms=%s duration_ms=%.1f endpoint=%s upstream=%s "
            "upstream_id=%s%s", ending.label, relay.events, "-" if fields["ttft_ms"] is None else fields["ttft_ms"],
            fields["duration_ms"], relay.request.endpoint, upstream, fields["upstream_id"], extra,
            extra={"fields": fields})
