"""A backend for in-process tests: scripted answers through the real relay, no sockets, no model.

Like llm's MockModel. Queue answers with `backend.enqueue(...)`; each `open()` takes the next one
(or `backend.default`). An answer is a list of items, each streamed as its own batch:

    "text"              a content delta (the first one also carries role: assistant)
    {...}               a whole chunk, sent as it is (upstream shapes, hostile chunks)
    Pause(0.05)         wait, as a model between tokens
    STALL               wait until the relay aborts the generation (a silent upstream)
    QUEUED              an empty batch: alive but nothing yet (the embedded model, queued behind another)
    StreamError(...)    fail there, after what came before (a mid-stream error)

`backend.fail_next(ApiError(...))` makes the next open() raise before any byte, as an upstream's
4xx/5xx would. Every request and its generation are recorded: `backend.generations[-1].aborted` (an
Event: the relay cancelled it), `.closed` (released, cancelled or not), `.request.body`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import gevent
import gevent.event

from jarvis.backends import ChatRequest
from jarvis.errors import ApiError
from tests.upstream_shapes import answer_chunks, repeated


@dataclass
class Pause:
    seconds: float


STALL = object()
QUEUED = object()
DEFAULT_ANSWER = ["w0 ", "w1 ", "w2 "]


def content_chunk(text: str | None, *, role: bool = False, finish_reason: str | None = None) -> dict:
    delta = {**({"role": "assistant"} if role else {}), **({"content": text} if text is not None else {})}
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def upstream_like_chunks(shape: str, **options) -> list[dict]:
    """A whole answer as a real server streams it (tests/upstream_shapes.py), ready to enqueue."""
    return [chunk for _, chunk in answer_chunks(shape, **options)]


class FakeGeneration:
    interruptible = False
    upstream = None
    finished = False

    def __init__(self, request: ChatRequest, answer: list):
        self.request = request
        self.answer = answer
        self.aborted = gevent.event.Event()
        self.closed = False
        self._released = gevent.event.Event()

    def batches(self):
        first = True
        for item in self.answer:
            if isinstance(item, Pause):
                gevent.sleep(item.seconds)
            elif item is STALL:
                self._released.wait()
                return
            elif item is QUEUED:
                yield []
            elif isinstance(item, Exception):
                raise item
            elif isinstance(item, str):
                yield [json.dumps(content_chunk(item, role=first)).encode()]
                first = False
            else:
                yield [json.dumps(item).encode()]
        if any(isinstance(item, str) for item in self.answer):  # whole chunks bring their own end
            yield [json.dumps(content_chunk(None, finish_reason="stop")).encode()]

    def result(self) -> tuple[int, bytes]:
        text = "".join(item for item in self.answer if isinstance(item, str))
        body = {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": "fake-model",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        return 200, json.dumps(body).encode()

    def abort(self) -> None:
        self.aborted.set()
        self._released.set()

    def close(self) -> None:
        self.closed = True
        self._released.set()


class FakeBackend:
    name = "fake"

    def __init__(self, default: list | None = None):
        self.default = list(DEFAULT_ANSWER if default is None else default)
        # Whether its "server" continues a final assistant message: see tests/upstream_shapes.py, repeated().
        # Asked to repeat a sentence (jarvis.continuation's probe), it answers that at once, from no queue.
        self.continues = "yes"
        self.probes: list[ChatRequest] = []
        self.queued: list[list] = []
        self.failures: list[ApiError] = []
        self.generations: list[FakeGeneration] = []

    def enqueue(self, *answers: list) -> FakeBackend:
        self.queued.extend(answers)
        return self

    def fail_next(self, error: ApiError) -> FakeBackend:
        self.failures.append(error)
        return self

    @property
    def requests(self) -> list[ChatRequest]:
        return [generation.request for generation in self.generations]

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "tests"}]}

    def status(self) -> None:
        return None

    def open(self, request: ChatRequest) -> FakeGeneration:
        reply = repeated(request.body, self.continues)
        if reply is not None:
            self.probes.append(request)
            if self.continues == "refuses_fields" and "continue_final_message" in request.body:
                raise ApiError(400, "Unrecognized request argument supplied: continue_final_message",
                               code="invalid_request_error")
            return FakeGeneration(request, [reply])
        if self.failures:
            raise self.failures.pop(0)
        generation = FakeGeneration(request, self.queued.pop(0) if self.queued else self.default)
        self.generations.append(generation)
        return generation


def settle(predicate, timeout: float = 5.0, describe=lambda: "condition"):
    """Poll while letting gevent run (the store's thread and the save timer report through the hub)."""
    with gevent.Timeout(timeout, AssertionError(f"not within {timeout} s: {describe()}")):
        while not (value := predicate()):
            gevent.sleep(0.01)
    return value
