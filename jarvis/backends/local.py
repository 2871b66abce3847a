"""The embedded backend: a GGUF model run in-process through llama-cpp-python's bindings, off the gevent hub.

llama.cpp generation is CPU-bound C code; on the hub it would stop every other greenlet (heartbeats, other
streams, health checks) until gunicorn killed the worker. So the model runs in one native thread (a
one-thread pool): the batching engine of jarvis.backends.batching, which decodes up to JARVIS_LOCAL_SLOTS
answers together. Each answer's chunks come back through a deque plus a libev async watcher (the
thread-safe way to wake the hub).

An answer whose last message is the assistant's own is continued: the prompt is the model's chat template
over the messages before it, with the generation prompt, followed by that text as it is (a "prefill"), so
the model goes on with the text instead of closing its turn and answering afresh (`chat_formatter`).

A Stop also stops llama.cpp inside a decode: reading a long prompt is one decode of many seconds, and
llama.cpp checks an abort callback after every node of its compute graph (`PromptAbort`); the engine
triggers it when every answer in the decode under way is stopped.

When every slot is busy, requests wait in FIFO order on a semaphore; a request cancelled while waiting
simply leaves, and a slot is given back only once the engine has let go of its answer.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time

import gevent
import gevent.event
import gevent.lock
from gevent.threadpool import ThreadPool

from jarvis import metrics
from jarvis.backends import ChatRequest
from jarvis.backends.batching import PromptAbort  # noqa: F401 (bench/prompt_abort.py imports it from here)
from jarvis.errors import ApiError, StreamError
from jarvis.logs import spawn
from jarvis.settings import LOCAL_MODEL_ID, Settings

log = logging.getLogger(__name__)

_QUEUE_POLL_SECONDS = 1.0  # a queued request reports "still alive" this often
_WAKE_CHECK_SECONDS = 0.25  # belt and braces: re-check the deque even without a wakeup
_END = object()


def model_id_for(path: str) -> str:
    """A stable id: the bundled SmolLM2 gets a friendly one, other files their name."""
    name = os.path.basename(path)
    if name.lower().startswith("smollm2-135m-instruct"):
        return LOCAL_MODEL_ID
    return os.path.splitext(name)[0].lower()


@contextlib.contextmanager
def extra_buffer_types_off():
    """While inside, llama-cpp-python loads models without llama.cpp's extra buffer types (AMX, weight
    repacking): its AMX path crashes on CPUs that advertise AMX inside VMs that do not enable it."""
    import llama_cpp.llama

    module = llama_cpp.llama.llama_cpp
    defaults = module.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    module.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        module.llama_model_default_params = defaults


def load_llama(path: str, context: int, threads: int):
    """Load the model once (extra buffer types off, see above)."""
    # OpenMP threads that spin while waiting starve the hub and each other on a busy machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp.llama

    with extra_buffer_types_off():
        llama = llama_cpp.llama.Llama(model_path=path, n_ctx=context, n_threads=threads,
                                      n_threads_batch=threads, verbose=False)
    # llama-cpp-python maps ggml's log levels with an old table (today's WARN reads as its ERROR), so
    # llama.cpp's warnings reach stderr unasked, one per cancelled decode. Its real errors map to
    # DEBUG and never printed anyway; failures reach Jarvis as exceptions, which it logs itself.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL)
    return llama


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, engine=None):
        from jarvis.backends.batching import Engine

        self.model_path = settings.local_model
        self.model_id = model_id_for(settings.local_model)
        self.context = settings.local_context
        self.default_max_tokens = settings.local_max_tokens
        self.pool = ThreadPool(1)  # the engine's thread: it loads the model, then runs the batching loop
        started = time.monotonic()
        self.engine = engine or self.pool.apply(Engine, (settings.local_model, settings.local_slots or None,
                                                         settings.local_context, settings.local_threads_or_cores))
        self.slots = self.engine.slots_n
        log.info("embedded model %s loaded in %.2f s (%d threads, %d slots of context %d)", self.model_id,
                 time.monotonic() - started, settings.local_threads_or_cores, self.slots, settings.local_context)
        self.pool.spawn(self.engine.run)
        self.free = gevent.lock.Semaphore(self.slots)  # FIFO: a request waits here when every slot is busy
        self.waiters: list[LocalGeneration] = []
        self.generations = 0
        self.tokens = 0

    def context_window(self, model: str | None) -> int | None:
        return self.context

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "jarvis"}]}

    def status(self) -> dict:
        busy = self.slots - self.free.counter
        return {"model": self.model_id, "queued": len(self.waiters), "busy": busy == self.slots,
                "slots": self.slots, "slots_busy": busy, "generations": self.generations, "tokens": self.tokens}

    def open(self, request: ChatRequest) -> LocalGeneration:
        if request.endpoint != "chat/completions":
            raise ApiError(404, f"The embedded model answers /v1/chat/completions only, not /v1/{request.endpoint}: "
                                "point Jarvis at an upstream that offers it (JARVIS_UPSTREAMS_FILE)",
                           code="unsupported_endpoint")
        return LocalGeneration(self, _generation_arguments(request.body, self))


class LocalGeneration:
    """One request for the model: waiting for a slot, then in the engine's batch (jarvis.backends.batching),
    its chunks handed to the hub through a deque and a libev async watcher."""

    interruptible = False  # read through a pump: its tokens come from the engine's thread
    upstream = None
    finished = False  # (the pump's END says when it is)

    def __init__(self, backend: LocalBackend, arguments: dict):
        from jarvis.backends.batching import Answer

        self.backend = backend
        self.chunks: collections.deque = collections.deque()
        self.wakeup = gevent.event.Event()
        self.ended = gevent.event.Event()  # the engine is done with this answer (on the hub)
        self.async_watcher = None
        self.holds_slot = False
        self.submitted = False
        self.engine_done = False  # set in the engine's thread
        self.reason = "queued"
        self.started = time.monotonic()
        self.cancelled_at: float | None = None
        self.answer = Answer(sink=self._sink, model=backend.model_id, **arguments)

    @property
    def queue_position(self) -> int | None:
        """1 for the next request to get a slot; None once it has one."""
        try:
            return self.backend.waiters.index(self) + 1
        except ValueError:
            return None

    @property
    def slot(self) -> int | None:
        return self.answer.slot

    # -- the greenlet side ----------------------------------------------------

    def batches(self):
        yield from self._wait_for_slot()
        self._submit()
        chunks = self.chunks
        while True:
            self.wakeup.clear()
            if not chunks:
                self.wakeup.wait(_WAKE_CHECK_SECONDS)
                continue
            batch = []
            while chunks:
                item = chunks.popleft()
                if item is _END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, Exception):
                    if batch:
                        yield batch
                    raise item
                batch.append(item)
            yield batch

    def _wait_for_slot(self):
        backend = self.backend
        backend.waiters.append(self)
        metrics.MODEL_QUEUE_DEPTH.inc()
        queued_at = time.monotonic()
        try:
            while not backend.free.acquire(timeout=_QUEUE_POLL_SECONDS):
                yield []  # still queued, still alive: keeps the relay's inactivity timer fresh
            self.holds_slot = True
        finally:
            backend.waiters.remove(self)
            metrics.MODEL_QUEUE_DEPTH.dec()
            metrics.MODEL_QUEUE_WAIT.observe(time.monotonic() - queued_at)

    def _submit(self) -> None:
        hub = gevent.get_hub()
        self.async_watcher = hub.loop.async_()
        self.async_watcher.start(self._woken)
        self.backend.generations += 1
        metrics.MODEL_SLOTS_BUSY.inc()
        self.started = time.monotonic()
        log.info("local generation start model=%s", self.backend.model_id)
        self.submitted = True
        self.backend.engine.submit(self.answer)

    def _woken(self) -> None:
        """On the hub, after the engine's thread sent something."""
        self.wakeup.set()
        if self.engine_done and not self.ended.is_set():
            self.ended.set()

    def result(self) -> tuple[int, bytes]:
        """A non-streaming answer, built from the same cancellable token stream."""
        content, finish_reason, completion_id, created = [], None, None, int(time.time())
        for batch in self.batches():
            for payload in batch:
                chunk = json.loads(payload)
                completion_id = completion_id or chunk.get("id")
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                content.append(choice.get("delta", {}).get("content") or "")
                finish_reason = choice.get("finish_reason") or finish_reason
        body = {"id": completion_id, "object": "chat.completion", "created": created,
                "model": self.backend.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(content)},
                             "finish_reason": finish_reason}],
                "usage": {"prompt_tokens": self.answer.prompt_tokens,
                          "completion_tokens": self.answer.completion_tokens,
                          "total_tokens": self.answer.prompt_tokens + self.answer.completion_tokens}}
        return 200, json.dumps(body).encode()

    def abort(self) -> None:
        """From any greenlet: stop generating now; inside a decode too when every answer in it is stopped."""
        if self.cancelled_at is None:
            self.cancelled_at = time.monotonic()
        if self.submitted:
            self.backend.engine.cancel(self.answer)
        else:
            self.answer.cancelled = True

    def close(self) -> None:
        """Cancel; hand the slot to the next request only once the engine has let go of this answer."""
        self.abort()
        if not self.holds_slot:
            return
        self.holds_slot = False
        if not self.submitted:
            self.backend.free.release()
            return
        spawn(self._release_when_finished)  # not killable by the relay that is cancelling us

    def _release_when_finished(self) -> None:
        try:
            self.ended.wait()
        finally:
            self.async_watcher.stop()
            self.async_watcher.close()
            self.backend.free.release()
            metrics.MODEL_SLOTS_BUSY.dec()
            now = time.monotonic()
            answer = self.answer
            stop_ms = f"{(now - self.cancelled_at) * 1000:.1f}" if self.reason == "cancelled" else "-"
            log.info("local generation end reason=%s slot=%s tokens=%d prompt_tokens=%d prompt_evaluated=%d "
                     "cancel_to_stop_ms=%s duration_ms=%.1f", self.reason, answer.slot, answer.completion_tokens,
                     answer.prompt_tokens, answer.prompt_evaluated, stop_ms, (now - self.started) * 1000)

    # -- the engine's thread (no gevent calls here except the async watcher's send) ----------------

    def _sink(self, kind: str, value) -> None:
        if kind == "chunk":
            self.chunks.append(value)
            if b'"content"' in value:
                self.backend.tokens += 1
        elif kind == "error":
            self.chunks.append(StreamError(value.code, str(value), value.kind))
        else:  # end
            self.reason = "cancelled" if self.answer.cancelled else value
            self.chunks.append(_END)
            self.engine_done = True
        self.async_watcher.send()


def _generation_arguments(body: dict, backend: LocalBackend) -> dict:
    """Translate the OpenAI request into the engine's Answer fields; ApiError on bad values. Besides OpenAI's
    parameters, the sampling extensions llama.cpp's and vLLM's servers take: top_k, min_p, and
    repeat_penalty (vLLM: repetition_penalty)."""
    from jarvis.backends.batching import Sampling

    arguments = {"messages": [_message(message, index) for index, message in enumerate(body["messages"])]}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    arguments["max_tokens"] = _number(max_tokens, "max_tokens", int, 1, backend.context) \
        if max_tokens is not None else backend.default_max_tokens
    sampling = {}
    for name, field, kind, low, high in (
            ("temperature", "temperature", float, 0, 2), ("top_p", "top_p", float, 0, 1),
            ("top_k", "top_k", int, 0, 1_000_000), ("min_p", "min_p", float, 0, 1),
            ("seed", "seed", int, -(2**63), 2**63 - 1), ("presence_penalty", "presence_penalty", float, -2, 2),
            ("frequency_penalty", "frequency_penalty", float, -2, 2),
            ("repeat_penalty", "repeat_penalty", float, 0, 2), ("repetition_penalty", "repeat_penalty", float, 0, 2)):
        if body.get(name) is not None:
            sampling[field] = _number(body[name], name, kind, low, high)
    arguments["sampling"] = Sampling(**sampling)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(item, str) for item in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop",
                           code="invalid_type")
        arguments["stop"] = stop
    return arguments


def _number(value, name: str, kind, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be a number", param=name, code="invalid_type")
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}", param=name, code="invalid_value")
    return kind(value)


def _message(message: dict, index: int) -> dict:
    """Plain role/content messages; content parts of type text are joined."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if len(parts) != len(content) or not all(isinstance(part, str) for part in parts):
            raise ApiError(400, f"messages[{index}].content: the embedded model accepts text parts only",
                           param=f"messages[{index}].content", code="invalid_content")
        content = "".join(parts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content", code="invalid_content")
    return {"role": message["role"], "content": content}
