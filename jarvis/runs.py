"""Answers that belong to the server: a page answer is a run, not an HTTP response.

Where an answer's life goes, top to bottom:

    start    POST .../messages claims the conversation in the store (one answer per
             conversation, across workers: store.start_answer) and opens the backend through a
             Relay that has no client of its own. The caller becomes its first watcher.
    stream   The run reads the relay's SSE events in its own greenlet, keeps the answer
             (jarvis.answer), saves it at least every FLUSH_SECONDS, and hands every event to
             each watcher. A watcher leaving never stops the run.
    attach   GET .../stream on the worker that runs it: what the page lacks, from memory, then
             the live events. On any other worker: the store, followed every FOLLOW_SECONDS.
    stop     Here: the relay cancels at the source at once. Elsewhere: a flag in the store,
             which the owner's tick (every TICK_SECONDS) turns into the same cancel.
    detached Nobody has watched for JARVIS_DETACHED_SECONDS: cancelled, saved as stopped.
             (0: the last watcher leaving stops it at once, as a /v1 client leaving does.)
    end      complete, stopped or error: the last save and the end of its run in one write
             (store.finish_answer_later). A run whose worker died is marked interrupted by
             whoever looks next (jarvis.leases): a re-attach, a listing, a start-up.

The page's chunks are OpenAI's, plus `delta.reasoning_content`, `content_was_reasoning`, a last
chunk with `choices: []`, the `stats` and the final `status`, and `waiting` while an embedded
model serves another answer first. Never yield in a `finally` here (see jarvis.relay).
"""

from __future__ import annotations

import json
import logging
import re
import time

import gevent
import gevent.event
import gevent.queue
from flask import Response

from jarvis import leases
from jarvis.answer import Answer, utf16_length
from jarvis.backends import Backend, ChatRequest
from jarvis.continuation import Continuation
from jarvis.endings import Ending, Outcome
from jarvis.errors import StreamError
from jarvis.relay import Relay
from jarvis.responses import sse_response
from jarvis.settings import Settings
from jarvis.sse import DONE_EVENT, OPENING, PING, data_event, error_event
from jarvis.stores import ConversationStore, StoreUnavailable
from jarvis.tool_loop import ToolLoop
from jarvis.usage import Meter
from jarvis.worker import ClientWatcher

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5  # the saved answer lags the stream by at most this
WATCHED_FLUSH_SECONDS = 0.1  # ... and by at most this while a page follows it from another worker
TICK_SECONDS = 0.1  # how soon the owner sees a Stop asked on another worker, or a page following
FOLLOW_SECONDS = 0.1  # how often a page following from another worker reads the store
REMOTE_WATCH_SECONDS = 2.0  # a follower elsewhere counts as watching for this long after its last look
_WATCHER_QUEUE = 1000  # events a slow watcher may fall behind before it is dropped (it can re-attach)
_WATCHER_BYTES = 16 * 1024 * 1024  # ... or bytes
_SWITCH_BYTES = 1024 * 1024  # after handing on this much without waiting, let other greenlets run
_RETRY_FIRST_SECONDS = 1.0  # a save that failed is tried again after this, doubling up to _RETRY_MAX_SECONDS,
_RETRY_MAX_SECONDS = 5.0  # for at most JARVIS_STORE_RETRY_SECONDS: the text waits in memory meanwhile
_END = object()


def page_chunk(*, delta: dict | None = None, **fields) -> dict:
    """A chunk of the page's stream; with `delta`, one choice carrying it."""
    choices = [{"index": 0, "delta": delta, "finish_reason": None}] if delta else []
    return {"object": "chat.completion.chunk", "choices": choices, **fields}


def utf16_tail(text: str, start: int) -> str:
    """What follows the first `start` UTF-16 units of `text` (a split pair stays split, as the page has it)."""
    if text.isascii():
        return text[start:]
    return text.encode("utf-16-le", "surrogatepass")[2 * start:].decode("utf-16-le", "surrogatepass")


def missing_text(content: str, reasoning: str, reasoning_moved: bool, after: int,
                 reasoning_after: int) -> tuple[dict, int, int]:
    """The delta that brings a page showing `after` UTF-16 units of content and `reasoning_after` of
    reasoning up to date, and the page's offsets afterwards.

    When the answer's first content turned out to be reasoning (`reasoning_moved`: a lone </think>) and
    the page still shows it as content (some content, no reasoning), the content moves first. A page
    may show more than this text: it saw tokens that were not saved yet when their worker died; it
    keeps them, and gets nothing twice.
    """
    delta = {}
    if reasoning_moved and after and not reasoning_after:
        delta["content_was_reasoning"] = True
        after, reasoning_after = 0, after
    content_length, reasoning_length = utf16_length(content), utf16_length(reasoning)
    if reasoning_length > reasoning_after:
        delta["reasoning_content"] = utf16_tail(reasoning, reasoning_after)
    if content_length > after:
        delta["content"] = utf16_tail(content, after)
    return delta, max(after, content_length), max(reasoning_after, reasoning_length)


class Watcher:
    """One page's stream of a run: the events it has yet to write."""

    def __init__(self):
        self.queue: gevent.queue.Queue = gevent.queue.Queue(_WATCHER_QUEUE)
        self.queued_bytes = 0
        self.dropped = False


class Run:
    """One answer being written by this worker, for any number of watchers."""

    def __init__(self, runs: Runs, conversation_id: str, message_id: int, chat: ChatRequest,
                 client: str | None = None, continued: tuple[str, str] = ("", ""),
                 ended: tuple[str, str | None, dict | None] | None = None, title: str | None = None,
                 user_id: int | None = None):
        self.runs = runs
        self.user_id = user_id  # whose answer (accounts); None without accounts
        self.conversation_id = conversation_id
        self.message_id = message_id
        self.client = client  # the address it counts against (JARVIS_MAX_RUNS_PER_CLIENT)
        self.answer = Answer(content=continued[0], reasoning=continued[1])  # (a continued answer's text so far)
        # A continued answer: its text and how it had ended (status, error, stats), and its first new chunks,
        # held back until they show whether the model continues it or answers afresh (as a server that cannot
        # continue does). Put back as it had ended, stats and all, when nothing is added to it.
        self.continued, self.ended_before = continued, ended
        self.kept_stats: dict | None = None
        self.chat = chat
        self.title = title  # a first answer's: the first words its conversation was named by, until the model's
        self.held: list[bytes] | None = [] if continued[0] else None
        self.answered_afresh = False
        backend = runs.backend
        if chat.tools is not None and runs.tools is not None and runs.tools.servers:
            backend = ToolLoop(backend, runs.tools, runs.settings)  # model and tools, as one generation
        self.relay = Relay(backend, chat, runs.settings, {}, observer=self, meter=runs.meter)
        self.watchers: set[Watcher] = set()
        self.finished = False
        self.remote_watched_at: float | None = None
        self.detach_timer: gevent.Greenlet | None = None
        self.flush_timer: gevent.Greenlet | None = None
        self.last_flush = time.monotonic()
        self.failed_saves = 0
        self.saving = False  # a save is on its way to the store
        self.unsaved_since: float | None = None  # the first of the saves failing in a row
        self.saved_chars = 0  # of content, in the store's last accepted save
        self.final_saved = gevent.event.Event()  # the store has the answer's end (its run row is gone)
        self.ended_as: dict | None = None  # how it ended, as saved: {"status", "error", "stats"}

    # -- start and stream ------------------------------------------------------------------

    def _stream(self) -> None:
        handed_on = 0
        try:
            for data in self.relay.stream():
                if data is not OPENING:  # each watcher's response opens itself
                    self._publish(data)
                    handed_on += len(data)
                    if handed_on > _SWITCH_BYTES:
                        handed_on = 0
                        gevent.sleep(0)
        finally:
            self.finished = True
            self._cancel_detach_timer()
            self._publish(_END)
            self.runs.forget(self)
            if not self.final_saved.is_set():  # its last save is queued: a send right after [DONE] waits for it
                self.runs.ending[self.conversation_id] = self

    def _publish(self, item) -> None:
        size = len(item) if type(item) is bytes else 0
        for watcher in list(self.watchers):
            try:
                if watcher.queued_bytes + size > _WATCHER_BYTES:
                    raise gevent.queue.Full
                watcher.queue.put_nowait(item)
                watcher.queued_bytes += size
            except gevent.queue.Full:  # a watcher that stopped reading: it re-attaches from its offsets
                self.watchers.discard(watcher)
                watcher.dropped = True  # its response ends at its next event
                log.info("dropped a watcher that fell too far behind")

    # -- the relay's observer ---------------------------------------------------------------

    def events(self, batch: list[bytes]) -> list[bytes]:
        if self.answer.upstream is None:  # several upstreams: the one the router chose (its name, from config)
            self.answer.upstream = self.relay.chosen_upstream
        page_batch = []
        for payload in batch:
            try:
                chunk = json.loads(payload)
            except (ValueError, RecursionError):
                continue
            page_batch.append(json.dumps(self.answer.add(chunk)).encode())
        if self.held is not None:  # judged at the latest when the upstream says the answer is done
            page_batch = self._judged(page_batch, final=self.answer.finish_reason is not None)
        if self.answer.length > self.runs.settings.max_answer_chars and self.relay.stopping is None:
            limit = self.runs.settings.max_answer_chars
            self.relay.interrupt(Outcome.TOO_LONG, StreamError(
                "answer_too_long", f"The answer grew past {limit} characters (JARVIS_MAX_ANSWER_CHARS): it was "
                                   "stopped there and kept as far as it went", "server_error"))
        if self.flush_timer is None:
            delay = max(0.0, self.last_flush + self._flush_interval() - time.monotonic())
            self.flush_timer = gevent.spawn_later(delay, self._flush)
        return page_batch

    def watched_remotely(self, at: float | None) -> None:
        """The tick's news of a page following from another worker: save for it more often, from now."""
        before = self.remote_watched_at
        newly = at is not None and (before is None or at - before > REMOTE_WATCH_SECONDS)
        self.remote_watched_at = at
        if newly and self.flush_timer is not None:
            self.flush_timer.kill(block=False)  # scheduled at the slow interval: save now, then at the fast one
            self.flush_timer = gevent.spawn(self._flush)

    def _flush_interval(self) -> float:
        followed = self.remote_watched_at is not None and \
            time.time() - self.remote_watched_at < REMOTE_WATCH_SECONDS
        return WATCHED_FLUSH_SECONDS if followed else FLUSH_SECONDS

    def _judged(self, page_batch: list[bytes], *, final: bool, streaming: bool = True) -> list[bytes]:
        """A continued answer's new chunks: held back until its new text shows it continues the old one
        (then released), or shows a fresh answer starting as the old one did (then the answer is put back
        as it was and, while the upstream still streams, the run ended with an error saying so — one
        ending, recorded by the relay: never a second answer glued on). `final`: no more text will come."""
        assert self.held is not None
        self.held.extend(page_batch)
        verdict = answered_afresh(self.continued[0], self.answer.content[len(self.continued[0]):], final=final)
        if verdict is None:
            return []
        held, self.held = self.held, None
        if not verdict:
            return held
        self.answered_afresh = True
        self.runs.continuation.answered_afresh(self.chat.body.get("model"))
        self.answer.content_parts, self.answer.reasoning_parts = [self.continued[0]], [self.continued[1]]
        self.answer.splitter.held = ""
        self.answer.length = len(self.continued[0]) + len(self.continued[1])
        log.info("the upstream answered afresh instead of continuing the answer %d: its new text was dropped",
                 self.message_id)
        if streaming:
            self.relay.interrupt(Outcome.UPSTREAM_ERROR, StreamError("cannot_continue", CANNOT_CONTINUE,
                                                                     "upstream_error"))
        return []

    def finish(self, status: str) -> list[bytes]:
        held = self._judged([], final=True, streaming=False) if self.held is not None else []
        if self.answered_afresh:  # it ended before the error could: say so in the last chunk
            return [json.dumps(page_chunk(status=self.ended_before[0] if self.ended_before else "stopped",
                                          note=CANNOT_CONTINUE)).encode()]
        chunks = self.answer.finish()
        chunks[-1]["status"] = status
        if self.relay.stopping is Outcome.DETACHED:
            chunks[-1]["note"] = self._detached_note()
        return [*held, *(json.dumps(chunk).encode() for chunk in chunks)]

    def _detached_note(self) -> str:
        return (f"Nobody was watching for {self.runs.settings.detached_seconds:g} s (JARVIS_DETACHED_SECONDS), "
                "so the answer was stopped")

    def waiting(self) -> list[bytes]:
        """The embedded model is busy with other answers: name them, so the page can offer to stop one."""
        others = [run.conversation_id for run in self.runs.by_message.values()
                  if run is not self and run.user_id == self.user_id]  # (someone else's are not named)
        waiting = {"for": others}
        position = getattr(self.relay.generation, "queue_position", None)  # 1: the next to get a slot
        if isinstance(position, int):
            waiting["position"] = position
        return [json.dumps(page_chunk(waiting=waiting)).encode()]

    def watched(self) -> bool:
        return bool(self.watchers)

    def tokens(self) -> tuple[int, int]:
        stats = self.answer.stats()
        return stats["prompt_tokens"] or 0, stats["completion_tokens"] or 0

    def ended(self, ending: Ending, error_message: str | None) -> None:
        if self.flush_timer is not None:
            self.flush_timer.kill(block=False)
            self.flush_timer = None
        if ending.outcome is Outcome.DELETED:
            self._finally_saved()
            return
        status = ending.page_status
        if ending.outcome is Outcome.DETACHED:
            error_message = self._detached_note()
        if self.answered_afresh and self.ended_before is not None:  # put back as it had ended, saying why
            status, error_message, self.kept_stats = self.ended_before[0], CANNOT_CONTINUE, self.ended_before[2]
        elif self.ended_before is not None and status != "complete" and \
                (self.answer.content, self.answer.reasoning) == self.continued:
            status, error_message, self.kept_stats = self.ended_before  # added nothing: as it had ended
        self.answer.end()  # text still held back (a stop or an error ended it mid-tag) is saved too
        error_message = error_message if status != "complete" else None
        self.ended_as = {"status": status, "error": error_message, "stats": self.kept_stats or self.answer.stats()}
        self._save_final(attempt=1)

    def _retitle(self, was: str) -> None:
        """Ask the model for a title of a few words (not shown as an answer, not a run), within
        JARVIS_STREAM_INACTIVITY_SECONDS; the first words stay when anything goes wrong."""
        question = self.chat.body["messages"][-1].get("content") if self.chat.body.get("messages") else None
        if not isinstance(question, str):
            return
        body = {"messages": [{"role": "system", "content": TITLE_PROMPT},
                             {"role": "user", "content": f"{question[:2000]}\n\n---\n\n{self.answer.content[:2000]}"}],
                "max_tokens": 16, "temperature": 0.2, "stream": False,
                **({"model": self.chat.body["model"]} if self.chat.body.get("model") else {})}
        request = ChatRequest(body=body, raw=json.dumps(body).encode(), stream=False, trace_id=self.chat.trace_id,
                              account=self.chat.account)
        try:
            relay = Relay(self.runs.backend, request, self.runs.settings, {}, meter=self.runs.meter)
            relay.open()
            response = relay.result_response()
            title = clean_title(json.loads(response.get_data())["choices"][0]["message"]["content"])
        except Exception as error:  # an upstream that refuses, fails or answers oddly: keep the first words
            log.info("no title from the model (%s): the first words stay", type(error).__name__)
            return
        if title and self.runs.store.retitle(self.conversation_id, was, title):
            log.info("titled the conversation from its first answer")

    def _save_final(self, attempt: int, first_failed: float | None = None) -> None:
        """The last save and the end of the run: retried with back-off until the store takes it (a full
        disk, a held lock, a database away), for at most JARVIS_STORE_RETRY_SECONDS; the text waits here
        meanwhile. It wins over an `interrupted` mark another process set while this one could not renew
        its lease. Past the limit the loss is logged at ERROR, naming the answer and what was lost. Saves
        `ended_as`, as ended() set it."""
        assert self.ended_as is not None
        status = self.ended_as["status"]
        limit = self.runs.settings.max_answer_chars
        content = self.answer.content[:limit]
        result = self.runs.store.finish_answer_later(
            self.message_id, content, status, self.ended_as["error"], reasoning=self.answer.reasoning[:limit],
            stats=self.ended_as["stats"], reasoning_moved=self.answer.reasoning_moved, tools=self.answer.tools)

        def saved(result):
            if result.successful():
                if attempt > 1:
                    log.info("the answer's last save went through at attempt %d", attempt)
                self._finally_saved(status)
                return
            now = time.monotonic()
            began = first_failed if first_failed is not None else now
            retry_seconds = self.runs.settings.store_retry_seconds
            if now - began >= retry_seconds:
                log.error("the answer %d could not be saved for %g s (JARVIS_STORE_RETRY_SECONDS; %s): %d of its "
                          "%d characters are lost, the store keeps the %d it last accepted", self.message_id,
                          retry_seconds, result.exception, len(content) - self.saved_chars, len(content),
                          self.saved_chars)
                self._finally_saved()
                return
            delay = min(_RETRY_FIRST_SECONDS * 2 ** (attempt - 1), _RETRY_MAX_SECONDS)
            if attempt == 1 or attempt % 10 == 0:
                log.warning("the answer's last save failed (%s); trying again for up to %g s", result.exception,
                            retry_seconds)
            gevent.spawn_later(delay, self._save_final, attempt + 1, began)

        result.rawlink(saved)

    def _finally_saved(self, status: str | None = None) -> None:
        """The run's end is in the store (`status`), or never will be (None)."""
        self.final_saved.set()
        if self.title is not None and status == "complete" and self.runs.settings.titles:
            gevent.spawn(self._retitle, self.title)
        if self.runs.ending.get(self.conversation_id) is self:
            del self.runs.ending[self.conversation_id]

    def _flush(self) -> None:
        self.flush_timer = None
        if self.saving:  # the last save has not come back (a slow or absent database): this one waits for it
            self.flush_timer = gevent.spawn_later(self._flush_interval(), self._flush)
            return
        self.saving = True
        self.last_flush = time.monotonic()
        limit = self.runs.settings.max_answer_chars
        content = self.answer.content[:limit]
        result = self.runs.store.update_message_later(self.message_id, content, "streaming",
                                                      reasoning=self.answer.reasoning[:limit],
                                                      reasoning_moved=self.answer.reasoning_moved,
                                                      tools=self.answer.tools)
        result.rawlink(lambda result: self._saved(result, len(content)))

    def _saved(self, result, chars: int) -> None:
        """Every save's result is checked: a message gone stops the run. Saves that fail are tried again
        with back-off while the answer goes on, its text kept here; past JARVIS_STORE_RETRY_SECONDS of
        failing the answer is stopped with an in-band error rather than go on unsaved."""
        self.saving = False
        if result.successful():
            self.failed_saves, self.unsaved_since = 0, None
            if result.value is False:
                self.stop(Outcome.DELETED)  # its conversation was deleted (perhaps from another worker)
            else:
                self.saved_chars = chars
            return
        self.failed_saves += 1
        now = time.monotonic()
        self.unsaved_since = self.unsaved_since or now
        retry_seconds = self.runs.settings.store_retry_seconds
        if self.failed_saves == 1 or self.failed_saves % 10 == 0:
            log.warning("saving the answer failed (%s), %d time(s) in a row; its text is kept here and saved when "
                        "the store takes it", result.exception, self.failed_saves)
        if now - self.unsaved_since >= retry_seconds and self.relay.stopping is None:
            self.relay.interrupt(Outcome.NOT_SAVED, StreamError(
                "answer_not_saved", f"The answer could not be saved for {retry_seconds:g} s ({result.exception}): it "
                                    "was stopped rather than go on unsaved, and is kept as far as it was saved",
                "server_error"))
        elif self.flush_timer is None and not self.finished:
            delay = min(_RETRY_FIRST_SECONDS * 2 ** (self.failed_saves - 1), _RETRY_MAX_SECONDS)
            self.flush_timer = gevent.spawn_later(delay, self._flush)  # try again

    # -- watchers -------------------------------------------------------------------------

    def attach(self, environ: dict, after: int, reasoning_after: int) -> Response:
        """A page's stream of this run: what it lacks, then every event until the end."""
        watcher = Watcher()
        delta, _, _ = missing_text(self.answer.content, self.answer.reasoning, self.answer.reasoning_moved, after,
                                   reasoning_after)
        self.watchers.add(watcher)
        self._cancel_detach_timer()
        catch_up = page_chunk(delta=delta or None, **({"tools": self.answer.tools} if self.answer.tools else {}))
        return sse_response(self._watch(watcher, environ, catch_up if delta or self.answer.tools else None))

    def _watch(self, watcher: Watcher, environ: dict, catch_up: dict | None):
        client = ClientWatcher(environ, lambda how: self._left(watcher))
        client.start()
        try:
            yield OPENING
            if catch_up:
                yield data_event(json.dumps(catch_up).encode())
            while True:
                item = watcher.queue.get()
                if item is _END or watcher.dropped:
                    return
                watcher.queued_bytes -= len(item)
                yield item
        finally:
            client.stop()
            self._left(watcher)

    def _left(self, watcher: Watcher) -> None:
        if watcher not in self.watchers:
            return
        self.watchers.discard(watcher)
        try:
            watcher.queue.put_nowait(_END)  # wake its response, which ends
        except gevent.queue.Full:
            pass  # it is far behind, and ends when it gets there
        if not self.watchers and not self.finished:
            self._nobody_watching()

    def _nobody_watching(self) -> None:
        seconds = self.runs.settings.detached_seconds
        if seconds == 0:
            self.stop(Outcome.CLIENT_STOP)  # as a /v1 client leaving: cancelled at once
            return
        self._cancel_detach_timer()
        self.detach_timer = gevent.spawn_later(seconds, self._detached)

    def _detached(self) -> None:
        self.detach_timer = None
        if self.watchers or self.finished:
            return
        if self.remote_watched_at is not None and time.time() - self.remote_watched_at < REMOTE_WATCH_SECONDS:
            self.detach_timer = gevent.spawn_later(REMOTE_WATCH_SECONDS, self._detached)  # watched elsewhere
            return
        log.info("nobody watched for %.0f s: stopping the answer", self.runs.settings.detached_seconds)
        self.stop(Outcome.DETACHED)

    def _cancel_detach_timer(self) -> None:
        if self.detach_timer is not None:
            self.detach_timer.kill(block=False)
            self.detach_timer = None

    # -- the end ---------------------------------------------------------------------------

    def stop(self, reason: Outcome) -> None:
        """Cancel at the source now: stopped (Stop), detached, deleted, client_stop."""
        if not self.finished:
            self.relay.interrupt(reason)


class Runs:
    """This worker's runs, and the tick that keeps their leases and hears Stops asked elsewhere."""

    def __init__(self, store: ConversationStore, backend: Backend, settings: Settings, meter: Meter | None = None,
                 tools=None):
        self.store = store
        self.backend = backend
        self.tools = tools  # jarvis.mcp_client.ToolServers: a conversation's tools run in its answers (tool_loop)
        self.settings = settings
        self.meter = meter  # what each answer used (jarvis.usage)
        self.owner = leases.this_process()
        self.by_message: dict[int, Run] = {}
        self.ending: dict[str, Run] = {}  # by conversation: runs that ended here, their last save still queued
        self.ticker: gevent.Greenlet | None = None
        self.continuation = Continuation(backend, settings)  # which servers can continue an answer

    def start(self, conversation_id: str, message_id: int, chat: ChatRequest, environ: dict,
              client: str | None = None, continued: tuple[str, str] = ("", ""),
              shown: tuple[int | None, int | None] = (None, None),
              ended: tuple[str, str | None, dict | None] | None = None, title: str | None = None,
              user_id: int | None = None) -> Response:
        """Start a run and return its first watcher's stream. The watcher is attached before the run's
        greenlet can run at all: an event published to nobody would be lost to the page that asked. A
        continued answer (`continued`: its content and reasoning so far) streams only what the page
        lacks of it (`shown`: the characters of each it has; None: all) and its new text."""
        run = Run(self, conversation_id, message_id, chat, client, continued, ended, title, user_id)
        self.by_message[message_id] = run
        # The tick renews the run's lease from now, while the backend opens: an open that took longer than
        # LEASE_SECONDS (a tool loop starting its MCP servers on a busy machine took 4.5 s) let anyone who looked
        # mark the answer interrupted while it was starting (a page reloaded then showed it ended). A Stop from
        # another worker reaches it while it opens, too.
        if self.ticker is None or self.ticker.dead:
            self.ticker = gevent.spawn(self._tick)
            self.store.listen(self._heard)  # PostgreSQL: Stops and deletes from other nodes, at once
        try:
            run.relay.open()
        except BaseException:
            self.forget(run)
            if run.relay.closed and not run.final_saved.is_set():  # its end is being saved: a read waits for it
                self.ending[conversation_id] = run
            if run.ended_as is not None and run.relay.ending.outcome is Outcome.STOPPED:
                # A Stop before the backend began: an answer stopped like any other, with nothing in it yet
                # (saved so; a continuation as it had ended), not an error for the page that sent it, which
                # is still reading this response for the ids of what it shows. It ends as it was saved.
                return sse_response(iter([OPENING, _final_events(run.ended_as)]))
            raise
        after = [len(text) if count is None else count for text, count in zip(continued, shown, strict=True)]
        response = run.attach(environ, after[0], after[1])
        gevent.spawn(run._stream)
        return response

    def _heard(self, kind: str, message_id: int) -> None:
        run = self.by_message.get(message_id)
        if run is not None:
            log.info("a %s came from another node", "Stop" if kind == "stop" else "delete")
            run.stop(Outcome.STOPPED if kind == "stop" else Outcome.DELETED)

    def close(self) -> None:
        """Stop every run and the tick (an app being thrown away, as in tests)."""
        for run in list(self.by_message.values()):
            run.stop(Outcome.SHUTDOWN)
        if self.ticker is not None:
            self.ticker.kill()

    def settle(self, conversation_id: str | None = None, client: str | None = None) -> None:
        """Wait (at most JARVIS_STORE_BUSY_SECONDS in all) for the last saves of the answers that just ended
        here (or are being stopped), in this conversation or started by this client (neither: all of them).
        One that sends the next message the instant it reads [DONE] must not be told the conversation is
        still answering, nor that it has too many answers running (its ended ones count until their run
        rows are gone); a page reading the conversation, or the list, after its Stop sees the answer ended."""
        deadline = time.monotonic() + self.settings.store_busy_seconds
        stopping = [run for run in self.by_message.values() if run.relay.stopping is not None]
        for run in [*self.ending.values(), *stopping]:
            if (conversation_id is None and client is None) or run.conversation_id == conversation_id \
                    or (client is not None and run.client == client):
                run.final_saved.wait(max(0.0, deadline - time.monotonic()))

    def for_conversation(self, conversation_id: str) -> Run | None:
        return next((run for run in self.by_message.values() if run.conversation_id == conversation_id), None)

    def forget(self, run: Run) -> None:
        self.by_message.pop(run.message_id, None)

    def _tick(self) -> None:
        renewed = time.monotonic()
        failing = 0  # ticks in a row that could not reach the store
        while self.by_message:
            gevent.sleep(TICK_SECONDS)
            renew = failing > 0 or time.monotonic() - renewed >= leases.RENEW_SECONDS
            # Only the runs asked about: one that started while the store answered is not in its answer.
            held = list(self.by_message.values())
            try:
                states = self.store.tick_runs(self.owner, renew=renew, held=[run.message_id for run in held])
            except StoreUnavailable as error:
                failing += 1
                if failing == 1 or failing % 100 == 0:  # one line, then one every 10 s or so
                    log.warning("could not check this worker's answers in the store (%s); %d time(s) in a row",
                                error, failing)
                continue
            except Exception:
                log.exception("checking this worker's answers in the store failed")
                continue
            if failing:
                log.info("the store answers again after %d failed checks of this worker's answers", failing)
                failing = 0
            renewed = time.monotonic() if renew else renewed
            for run in held:
                if run.finished:
                    continue
                state = states.get(run.message_id)
                if state is None:
                    run.stop(Outcome.DELETED)
                elif state[0]:
                    log.info("a Stop came from another worker")
                    run.stop(Outcome.STOPPED)
                else:
                    run.watched_remotely(state[1])


TITLE_PROMPT = ("Write a title of at most six words for the conversation below: its topic, in its language. "
                "Answer with the title alone, no quotes, no punctuation at the end.")


def clean_title(text) -> str | None:
    """A model's title, made safe to show: its first line, without quotes, markup or a full stop, at most 60
    characters; None when nothing usable is left."""
    if not isinstance(text, str):
        return None
    text = re.sub(r"<think>.*?</think>", "", text, flags=re.S)
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^(title\s*:\s*)", "", line.strip(), flags=re.I).strip(" \t\"'`*#_.")
    line = "".join(character for character in line if character.isprintable())[:60].strip()
    return line or None


CANNOT_CONTINUE = ("This model's server answered afresh instead of continuing this answer, so it cannot continue "
                   "answers: the answer is kept as it was")
_JUDGED_CHARACTERS = 12  # of the new text (spaces left out), compared with the old text's start


def answered_afresh(old: str, new: str, *, final: bool) -> bool | None:
    """Whether a continuation's new text is a fresh answer: it starts as the old text started (a server that
    cannot continue answers the question again, and at temperature 0 word for word). None: too little new
    text yet to tell. An old text too short to compare is taken as continued."""
    old_start, new_start = "".join(old.split())[:_JUDGED_CHARACTERS], "".join(new.split())[:_JUDGED_CHARACTERS]
    if len(old_start) < 4:
        return False
    if len(new_start) < len(old_start) and not final:
        return None
    if len(new_start) < 4:
        return False
    return old_start.startswith(new_start) if len(new_start) < len(old_start) else new_start == old_start


def follow(store: ConversationStore, settings: Settings, message_id: int, environ: dict, after: int,
           reasoning_after: int) -> Response:
    """A page's stream of an answer that another worker runs (or that ended): the store, followed."""
    return sse_response(_follow(store, settings, message_id, environ, after, reasoning_after))


def _follow(store, settings, message_id, environ, after, reasoning_after):
    gone = gevent.event.Event()
    client = ClientWatcher(environ, lambda how: gone.set())
    client.start()
    saved = store.subscribe(message_id)  # PostgreSQL: set at each save, from any node; SQLite: None, poll
    try:
        yield OPENING
        last_write, last_touch, tools = time.monotonic(), 0.0, None
        while not gone.is_set():
            now = time.monotonic()
            touch = now - last_touch >= 0.5  # tells the owner someone watches, and to save more often
            message = store.follow(message_id, touch=touch)
            last_touch = now if touch else last_touch
            if message is None:
                yield error_event({"message": "The conversation was deleted", "type": "invalid_request_error",
                                   "param": None, "code": "conversation_deleted"})
                return
            delta, after, reasoning_after = missing_text(message["content"], message["reasoning"],
                                                         message["reasoning_moved"], after, reasoning_after)
            changed = message.get("tools") is not None and message["tools"] != tools
            if delta or changed:
                tools = message.get("tools")
                yield data_event(json.dumps(page_chunk(delta=delta or None, **({"tools": tools} if changed else {})))
                                 .encode())
                last_write = now
            if message["status"] != "streaming":
                yield _final_events(message)
                return
            if now - last_write >= settings.heartbeat_seconds:
                yield PING
                last_write = now
            if saved is None:
                gone.wait(FOLLOW_SECONDS)
            else:
                gevent.wait([gone, saved], timeout=FOLLOW_SECONDS, count=1)
                saved.clear()
    finally:
        client.stop()
        store.unsubscribe(message_id, saved)


def _final_events(message: dict) -> bytes:
    """How an ended answer's stream ends: an error event, or its stats and status; then [DONE]."""
    if message["status"] == "error":
        return error_event({"message": message["error"] or "The answer failed", "type": "server_error",
                            "param": None, "code": "answer_failed"})
    final = page_chunk(stats=message["stats"], status=message["status"])
    if message["status"] != "complete" and message["error"]:
        final["note"] = message["error"]
    return data_event(json.dumps(final).encode()) + DONE_EVENT
