"""The embedded backend: a GGUF model run in-process by llama-cpp-python, off the gevent hub.

llama.cpp generation is CPU-bound C code; on the hub it would stop every other
greenlet (heartbeats, other streams, health checks) until gunicorn killed the
worker. So generation runs in a native thread from a one-thread pool, and
hands each chunk back through a deque plus a libev async watcher (the
thread-safe way to wake the hub). A cancel flag is checked between tokens.

An answer whose last message is the assistant's own is continued: the prompt is the model's chat template
over the messages before it, with the generation prompt, followed by that text as it is (a "prefill"), so
the model goes on with the text instead of closing its turn and answering afresh (`continuing_handler`).

A cancel also stops llama.cpp inside a decode: reading a long prompt is one
decode of many seconds, and llama.cpp checks an abort callback after every
node of its compute graph (`PromptAbort`).

One generation runs at a time per model. Waiting requests queue in FIFO order
on a semaphore; a request cancelled while queued simply leaves the queue, and
a generation's slot is released only once its thread has really finished.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import threading
import time

import gevent
import gevent.event
import gevent.lock
from gevent.threadpool import ThreadPool

from jarvis import metrics
from jarvis.backends import ChatRequest
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


def continuing_handler(llama):
    """A chat handler that formats with the model's own template (from its GGUF) and continues a final
    assistant message; None when the model has no template (then llama-cpp-python's default, which
    answers afresh, is left to jarvis.continuation to find out)."""
    template = (getattr(llama, "metadata", None) or {}).get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp import llama_chat_format

    eos, bos = llama.token_eos(), llama.token_bos()
    formatter = llama_chat_format.Jinja2ChatFormatter(
        template=template, eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llama._model.token_get_text(bos) if bos != -1 else "", stop_token_ids=[eos])

    def formatted(*, messages, **options):
        if not messages or messages[-1]["role"] != "assistant":
            return formatter(messages=messages, **options)
        result = formatter(messages=messages[:-1], **options)
        result.prompt += messages[-1]["content"]
        return result

    return llama_chat_format.chat_formatter_to_chat_completion_handler(formatted)


class PromptAbort:
    """Stops llama.cpp within one compute-graph node, from any thread, without the GIL.

    llama.cpp calls the abort callback after every node (about 600 per decode for SmolLM2-135M).
    A Python callback would take the GIL each time: measured, that made a 961-token prompt take
    14.3 s instead of 7.5 s while another Python thread was busy, as the hub is under load. So the
    callback is C: libc's `strlen`, over a two-byte flag. It returns 0 (go on) while the flag is
    empty and 1 (abort) once a byte is written — read back as the callback's bool, which is the
    low byte of the return register on the ABIs llama.cpp runs on (x86-64, AArch64). llama_decode
    then returns 2 and llama-cpp-python raises RuntimeError.
    """

    def __init__(self, llama):
        from llama_cpp import llama_cpp as bindings

        self.flag = ctypes.create_string_buffer(2)
        # Kept on self: llama.cpp holds only raw pointers to both.
        self.callback = ctypes.cast(ctypes.CDLL(None).strlen, bindings.ggml_abort_callback)
        bindings.llama_set_abort_callback(llama._ctx.ctx, self.callback, ctypes.cast(self.flag, ctypes.c_void_p))

    def clear(self) -> None:
        self.flag[0] = b"\0"

    def trigger(self) -> None:
        self.flag[0] = b"x"


class LocalBackend:
    name = "local"

    def __init__(self, settings: Settings, llama=None):
        self.model_path = settings.local_model
        self.model_id = model_id_for(settings.local_model)
        self.context = settings.local_context
        self.default_max_tokens = settings.local_max_tokens
        self.pool = ThreadPool(1)
        started = time.monotonic()
        self.llama = llama or self.pool.apply(load_llama, (settings.local_model, settings.local_context,
                                                           settings.local_threads_or_cores))
        log.info("embedded model %s loaded in %.2f s (%d threads, context %d)", self.model_id,
                 time.monotonic() - started, settings.local_threads_or_cores, settings.local_context)
        self.prompt_abort = PromptAbort(self.llama) if hasattr(self.llama, "_ctx") else None
        self.continuing = continuing_handler(self.llama) if hasattr(self.llama, "_model") else None
        self.slot = gevent.lock.Semaphore(1)
        self.queued = 0
        self.generations = 0
        self.tokens = 0

    def context_window(self, model: str | None) -> int | None:
        return self.context

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_id, "object": "model", "created": 0,
                                            "owned_by": "jarvis"}]}

    def status(self) -> dict:
        return {"model": self.model_id, "queued": self.queued, "busy": self.slot.locked(),
                "generations": self.generations, "tokens": self.tokens}

    def open(self, request: ChatRequest) -> LocalGeneration:
        if request.endpoint != "chat/completions":
            raise ApiError(404, f"The embedded model answers /v1/chat/completions only, not /v1/{request.endpoint}: "
                                "point Jarvis at an upstream that offers it (JARVIS_UPSTREAMS_FILE)",
                           code="unsupported_endpoint")
        return LocalGeneration(self, _generation_arguments(request.body, self))


class LocalGeneration:
    """One request for the model: queued, then generating in the pool's thread."""

    interruptible = False  # read through a pump: its tokens come from the model's thread
    upstream = None
    finished = False  # (the pump's END says when it is)

    def __init__(self, backend: LocalBackend, arguments: dict):
        self.backend = backend
        self.arguments = arguments
        self.cancel = threading.Event()
        self.chunks: collections.deque = collections.deque()
        self.wakeup = gevent.event.Event()
        self.async_watcher = None
        self.thread_result = None
        self.thread_running = False  # between _start_thread and the thread's end, on the hub's clock
        self.holds_slot = False
        self.tokens = 0
        self.reason = "queued"
        self.started = time.monotonic()
        self.cancelled_at: float | None = None

    # -- the greenlet side ----------------------------------------------------

    def batches(self):
        yield from self._wait_for_slot()
        self._start_thread()
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
        self.backend.queued += 1
        metrics.MODEL_QUEUE_DEPTH.inc()
        queued_at = time.monotonic()
        try:
            while not self.backend.slot.acquire(timeout=_QUEUE_POLL_SECONDS):
                yield []  # still queued, still alive: keeps the relay's inactivity timer fresh
            self.holds_slot = True
        finally:
            self.backend.queued -= 1
            metrics.MODEL_QUEUE_DEPTH.dec()
            metrics.MODEL_QUEUE_WAIT.observe(time.monotonic() - queued_at)

    def _start_thread(self) -> None:
        hub = gevent.get_hub()
        self.async_watcher = hub.loop.async_()
        self.async_watcher.start(self.wakeup.set)
        self.backend.generations += 1
        self.started = time.monotonic()
        log.info("local generation start model=%s", self.backend.model_id)
        if self.backend.prompt_abort is not None:
            self.backend.prompt_abort.clear()  # on the hub, before the thread starts: ordered with abort()
        self.thread_running = True
        self.thread_result = self.backend.pool.spawn(self._generate, self.async_watcher)

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
                             "finish_reason": finish_reason}]}
        return 200, json.dumps(body).encode()

    def abort(self) -> None:
        """From any greenlet: stop generating now, inside a decode too (the prompt included)."""
        if not self.cancel.is_set():
            self.cancel.set()
            self.cancelled_at = time.monotonic()
        # Only while this generation's thread runs: once it has ended, the flag may be the next one's.
        if self.thread_running and self.backend.prompt_abort is not None:
            self.backend.prompt_abort.trigger()

    def close(self) -> None:
        """Cancel the thread; hand the model to the next request only once the thread has finished."""
        self.abort()
        if not self.holds_slot:
            return
        self.holds_slot = False
        if self.thread_result is None:
            self.backend.slot.release()
            return
        spawn(self._release_when_finished)  # not killable by the relay that is cancelling us

    def _release_when_finished(self) -> None:
        try:
            self.thread_result.wait()
        finally:
            self.thread_running = False
            self.async_watcher.stop()
            self.async_watcher.close()
            self.backend.slot.release()
            now = time.monotonic()
            stop_ms = f"{(now - self.cancelled_at) * 1000:.1f}" if self.reason == "cancelled" else "-"
            log.info("local generation end reason=%s tokens=%d cancel_to_stop_ms=%s duration_ms=%.1f",
                     self.reason, self.tokens, stop_ms, (now - self.started) * 1000)

    # -- the thread side (no gevent calls here except the async watcher's send) ----------------

    def _generate(self, wakeup) -> None:
        model_id = self.backend.model_id
        try:
            continuing = self.backend.continuing
            if continuing is not None and self.arguments["messages"][-1]["role"] == "assistant":
                stream = continuing(llama=self.backend.llama, stream=True, **self.arguments)
            else:
                stream = self.backend.llama.create_chat_completion(stream=True, **self.arguments)
            for chunk in stream:
                if self.cancel.is_set():
                    self.reason = "cancelled"
                    break
                chunk["model"] = model_id  # never the file path
                chunk.get("choices", [{}])[0].pop("logprobs", None)
                self.tokens += 1
                self.backend.tokens += 1
                self.chunks.append(json.dumps(chunk).encode())
                wakeup.send()
            else:
                self.reason = "complete"
            stream.close()
        except Exception as error:
            self._failed(error)
        self.chunks.append(_END)
        wakeup.send()

    def _failed(self, error: Exception) -> None:
        """In the thread: an abort we asked for is a cancel; anything else is the answer's error."""
        if self.cancel.is_set():
            self.reason = "cancelled"  # llama_decode returned 2: PromptAbort stopped it
            return
        self.reason = "error"
        if isinstance(error, ValueError):  # llama-cpp-python's way of saying the prompt does not fit
            self.chunks.append(StreamError("context_length_exceeded", str(error), "invalid_request_error"))
        else:
            self.chunks.append(StreamError("model_error", f"The embedded model failed ({type(error).__name__}: "
                                                          f"{error})", "server_error"))


def _generation_arguments(body: dict, backend: LocalBackend) -> dict:
    """Translate the OpenAI request into create_chat_completion arguments; ApiError on bad values."""
    arguments = {"messages": [_message(message, index) for index, message in enumerate(body["messages"])]}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    arguments["max_tokens"] = _number(max_tokens, "max_tokens", int, 1, backend.context) \
        if max_tokens is not None else backend.default_max_tokens
    for name, kind, low, high in (("temperature", float, 0, 2), ("top_p", float, 0, 1),
                                  ("seed", int, -(2**63), 2**63 - 1), ("presence_penalty", float, -2, 2),
                                  ("frequency_penalty", float, -2, 2)):
        if body.get(name) is not None:
            arguments[name] = _number(body[name], name, kind, low, high)
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
