"""A fault-injecting OpenAI-compatible upstream on loopback, controlled by the tests.

It speaks raw HTTP/1.1 from threads so that every byte and every framing
choice is the test's: chunked or close-delimited bodies, LF or CRLF events,
delays before the headers and before the first token, stalls, resets, HTTP
errors, error events, malformed lines, a missing [DONE]. It records, per
request, how many tokens it sent and when the peer closed the connection, so
a test can assert that Jarvis cancelled the generation.

A request picks its scenario with an `x_fault` object in the JSON body
(Jarvis forwards unknown fields unchanged); otherwise `upstream.scenario`.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

from tests import hostile_upstream as hostile
from tests.net import close_now, read_http_request
from tests.upstream_shapes import answer_chunks, repeated


@dataclass
class Scenario:
    tokens: int = 5
    interval: float = 0.0  # seconds between tokens
    headers_delay: float = 0.0  # before the status line
    first_token_delay: float = 0.0  # after the headers, before the first token
    stall_after: int | None = None  # stop sending (connection stays open) after N tokens
    reset_after: int | None = None  # RST the connection after N tokens
    close_after: int | None = None  # FIN the connection after N tokens (no terminator)
    status: int = 200
    error_body: object = None  # the JSON body sent with a non-200 status
    error_event_after: int | None = None  # send data: {"error": ...} after N tokens
    done: bool = True  # send data: [DONE]
    crlf: bool = False
    framing: str = "chunked"  # or "close"
    malformed_after: int | None = None  # a line that is not JSON after N tokens
    comments: bool = False  # ": ping" comment lines between events
    stamp: bool = False  # token text carries its send time: "<monotonic>|"
    content: str | None = None  # one token with this text, instead of numbered tokens
    shape: str = "plain"  # which real server's chunks to replay: see tests/upstream_shapes.py
    reasoning_tokens: int = 0  # thinking tokens ("r0 r1 ...") before the answer's tokens
    tool_call: dict | None = None  # {"name", "arguments"}: stream an OpenAI tool call after the tokens
    # A model that uses tools: the calls ([{"name", "arguments"}], all in one step) asked for while the request
    # has fewer than `tool_steps` rounds of tool results after its last user message; then it answers with
    # "Tool said: " and the last tool result's text (an answer that shows what the tools returned).
    tool_calls: list | None = None
    tool_steps: int = 1
    ignores_usage: bool = False  # never send usage, even when asked (llama-cpp-python's server)
    hostile: str | None = None  # a named attack instead of an answer: see tests/hostile_upstream.py
    event_bytes: int = 4 * 1024 * 1024 - 64  # hostile huge_events: the size of each event
    seconds: float = 5.0  # hostile huge_events: for how long
    drip_seconds: float = 0.2  # hostile drip: between bytes
    models: str = "normal"  # /models: normal, or a hostile mode (huge, drip, silent)
    continues: str = "yes"  # whether it continues a final assistant message: upstream_shapes.repeated()
    models_bytes: int = 300_000_000  # /models huge: about this many bytes

    @classmethod
    def from_request(cls, default: Scenario, body: dict) -> Scenario:
        override = body.get("x_fault") if isinstance(body, dict) else None
        if isinstance(override, dict):
            return dataclasses.replace(default, **override)
        return default


@dataclass
class Exchange:
    """What happened to one request."""

    path: str
    headers: dict
    body: dict
    scenario: Scenario
    opened_at: float
    tokens_sent: int = 0
    first_token_at: float | None = None  # when the first token (thinking included) was written
    finished_at: float | None = None  # the response ended as the scenario planned
    closed_at: float | None = None  # the peer closed while the response was in progress

    @property
    def ended(self) -> bool:
        return self.finished_at is not None or self.closed_at is not None


class PeerClosed(Exception):
    pass


class FakeUpstream:
    def __init__(self, models: tuple[str, ...] = ("fake-model",), tls: ssl.SSLContext | None = None):
        self.models = models  # what its /models lists
        self.context = 4096  # what its /props says its context is, as llama.cpp's server does (None: no /props)
        self.scenario = Scenario()
        self.exchanges: list[Exchange] = []
        self._lock = threading.Condition()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.port = self._listener.getsockname()[1]
        self.tls = tls  # a server context: https://localhost (the name its certificate must carry)
        self.url = f"https://localhost:{self.port}/v1" if tls else f"http://127.0.0.1:{self.port}/v1"
        self._open_sockets: set[socket.socket] = set()
        self.connections = 0  # accepted so far
        self._running = True
        threading.Thread(target=self._accept_loop, daemon=True).start()

    # -- test-facing ---------------------------------------------------------

    def wait_for(self, predicate, timeout: float = 10.0):
        """Wait until predicate(self) is truthy; return its value or raise AssertionError."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                value = predicate(self)
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"upstream condition not met within {timeout} s: {self.exchanges}")
                self._lock.wait(min(remaining, 0.05))

    def wait_for_exchange(self, count: int = 1, timeout: float = 10.0) -> Exchange:
        return self.wait_for(lambda up: len(up.chats) >= count and up.chats[count - 1], timeout)

    def wait_for_tokens(self, exchange: Exchange, tokens: int, timeout: float = 10.0) -> None:
        self.wait_for(lambda up: exchange.tokens_sent >= tokens, timeout)

    def wait_until_ended(self, exchange: Exchange, timeout: float = 10.0) -> Exchange:
        self.wait_for(lambda up: exchange.ended, timeout)
        return exchange

    @property
    def chats(self) -> list[Exchange]:
        return self.to("/chat/completions")

    def to(self, endpoint: str) -> list[Exchange]:
        """The exchanges on one endpoint (/chat/completions, /completions, /embeddings, /responses, /models)."""
        return [exchange for exchange in self.exchanges
                if exchange.path.endswith(endpoint) and (endpoint != "/completions" or "/chat/" not in exchange.path)]

    def reset(self) -> FakeUpstream:
        """Forget every exchange and go back to the default scenario: the next test that shares it starts clean."""
        with self._lock:
            self.scenario = Scenario()
            self.exchanges = []
        return self

    def stop(self) -> None:
        """Refuse new connections and cut the open ones, at once (close_now)."""
        self._running = False
        close_now(self._listener)
        for sock in list(self._open_sockets):
            try:
                close_now(sock)
            except OSError:
                pass

    # -- server ------------------------------------------------------------------

    def _accept_loop(self):
        while self._running:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn and llama.cpp's server do
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket):
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_side=True)
            except (OSError, ValueError):
                sock.close()
                return
        self._open_sockets.add(sock)
        buffer = b""
        try:
            while self._running:
                request, buffer = read_http_request(sock, buffer)
                if request is None:
                    return
                keep_open = self._respond(sock, *request)
                if not keep_open:
                    return
        except (OSError, PeerClosed):
            return
        finally:
            self._open_sockets.discard(sock)
            try:
                sock.close()
            except OSError:
                pass

    def _record(self, exchange: Exchange, **changes):
        with self._lock:
            for name, value in changes.items():
                setattr(exchange, name, value)
            self._lock.notify_all()

    def _respond(self, sock, method, path, headers, body) -> bool:
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            payload = {}
        scenario = Scenario.from_request(self.scenario, payload)
        exchange = Exchange(path, headers, payload, scenario, time.monotonic())
        with self._lock:
            self.exchanges.append(exchange)
            self._lock.notify_all()
        try:
            if path == "/props" and method == "GET":
                if self.context is None:
                    _send_json(sock, 404, {"error": {"message": "Not Found", "type": "not_found_error"}})
                else:
                    _send_json(sock, 200, {"default_generation_settings": {"n_ctx": self.context}})
                self._record(exchange, finished_at=time.monotonic())
                return True
            if path.endswith("/models") and method == "GET":
                if scenario.models != "normal":
                    hostile.play_models(scenario.models, sock, scenario, _send, _pause)
                    self._record(exchange, finished_at=time.monotonic())
                    return False
                _pause(sock, scenario.headers_delay)
                _send_json(sock, 200, {"object": "list", "data": [{"id": model, "object": "model",
                                                                    "owned_by": "tests"} for model in self.models]})
                self._record(exchange, finished_at=time.monotonic())
                return True
            if scenario.hostile and path.endswith((*_ENDPOINTS, "/embeddings")):
                hostile.play(scenario.hostile, sock, scenario, _send, _pause)
                self._record(exchange, finished_at=time.monotonic())
                return False
            if path.endswith("/embeddings"):
                return self._embeddings(sock, exchange, scenario, payload)
            if not path.endswith(_ENDPOINTS):
                _send_json(sock, 404, {"error": {"message": "no such path", "type": "invalid_request_error",
                                                 "param": None, "code": None}})
                self._record(exchange, finished_at=time.monotonic())
                return True
            return self._chat(sock, exchange, scenario, payload)
        except PeerClosed:
            self._record(exchange, closed_at=time.monotonic())
            return False
        except OSError:
            self._record(exchange, closed_at=time.monotonic())
            return False

    def _embeddings(self, sock, exchange: Exchange, scenario: Scenario, payload: dict) -> bool:
        _pause(sock, scenario.headers_delay)
        if scenario.status != 200:
            _send_json(sock, scenario.status, scenario.error_body)
        else:
            inputs = payload.get("input")
            inputs = inputs if isinstance(inputs, list) else [inputs]
            _send_json(sock, 200, {"object": "list", "model": payload.get("model"),
                                   "data": [{"object": "embedding", "index": index,
                                             "embedding": [float(len(str(text))), 0.5, -0.25]}
                                            for index, text in enumerate(inputs)],
                                   "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})
        self._record(exchange, finished_at=time.monotonic())
        return True

    def _chat(self, sock, exchange: Exchange, scenario: Scenario, payload: dict) -> bool:
        """Chat completions, text completions and Responses: the same scenario, each endpoint's own chunks."""
        _pause(sock, scenario.headers_delay)
        if scenario.status != 200:
            _send_json(sock, scenario.status, scenario.error_body)
            self._record(exchange, finished_at=time.monotonic())
            return True
        endpoint = _endpoint_of(exchange.path)
        model = payload.get("model") if isinstance(payload.get("model"), str) else "fake-model"
        echo = repeated(payload, scenario.continues) if endpoint == "chat" else None
        if scenario.continues == "refuses_fields" and echo is not None and "continue_final_message" in payload:
            _send_json(sock, 400, {"error": {"message": "Unrecognized request argument supplied: "
                                                        "continue_final_message", "type": "invalid_request_error",
                                             "param": None, "code": None}})
            self._record(exchange, finished_at=time.monotonic())
            return True
        if not payload.get("stream"):
            text = echo if echo is not None else scenario.content if scenario.content is not None else \
                "".join(f"w{i} " for i in range(scenario.tokens))
            _pause(sock, scenario.first_token_delay)
            _send_json(sock, 200, _WHOLE_ANSWERS[endpoint](text, model))
            self._record(exchange, tokens_sent=scenario.tokens, finished_at=time.monotonic())
            return True
        writer = _BodyWriter(sock, scenario)
        writer.start()
        _pause(sock, scenario.first_token_delay)
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage")) and not scenario.ignores_usage
        answer_tokens = 1 if scenario.content is not None else scenario.tokens
        text_of = lambda index, thinking, number: _token_text(scenario, thinking, number)  # noqa: E731
        tool_calls = [scenario.tool_call] if scenario.tool_call else None
        if endpoint == "chat" and scenario.tool_calls:
            rounds, last_result = _tool_rounds(payload)
            if rounds < scenario.tool_steps:
                tool_calls = scenario.tool_calls
            else:
                answer_tokens = 1
                text_of = lambda index, thinking, number: f"Tool said: {last_result}"  # noqa: E731
        if endpoint == "chat":
            chunks = answer_chunks(scenario.shape, reasoning_tokens=scenario.reasoning_tokens, tokens=answer_tokens,
                                   asked_usage=include_usage, model=model, tool_calls=tool_calls,
                                   text_of=text_of)
        elif endpoint == "completions":
            chunks = _text_completion_chunks(answer_tokens, model, text_of)
        else:
            chunks = _responses_events(answer_tokens, model, text_of)
        for index, chunk in chunks:
            if index is None:
                writer.event(chunk)
                continue
            if index and scenario.interval:
                _pause(sock, scenario.interval)
            if index == scenario.stall_after:
                _pause(sock, 120)
            if index == scenario.reset_after:
                _reset(sock)
                self._record(exchange, finished_at=time.monotonic())
                return False
            if index == scenario.close_after:
                self._record(exchange, finished_at=time.monotonic())
                return False
            if index == scenario.error_event_after:
                error = {"message": "the model crashed", "type": "server_error", "param": None, "code": "model_crash"}
                if endpoint == "responses":
                    writer.event({"type": "error", "code": "model_crash", "message": "the model crashed",
                                  "param": None, "sequence_number": index + 2}, name="error")
                else:
                    writer.event({"error": error})
                writer.finish(scenario.done and endpoint != "responses")
                self._record(exchange, finished_at=time.monotonic())
                return scenario.framing == "chunked"
            if index == scenario.malformed_after:
                writer.event("{this is not json")
            if scenario.comments:
                writer.comment()
            writer.event(chunk, stamp=scenario.stamp)
            with self._lock:
                exchange.tokens_sent += 1
                exchange.first_token_at = exchange.first_token_at or time.monotonic()
                self._lock.notify_all()
            if index + 1 == scenario.reasoning_tokens + answer_tokens and scenario.stall_after is not None \
                    and scenario.stall_after >= index + 1:
                _pause(sock, 120)
        writer.finish(scenario.done and endpoint != "responses")  # a Responses stream ends with its last event
        self._record(exchange, finished_at=time.monotonic())
        return scenario.framing == "chunked"


_ENDPOINTS = ("/chat/completions", "/completions", "/responses")


def _tool_rounds(payload: dict) -> tuple[int, str]:
    """How many rounds of tool results follow the request's last user message, and the last result's text."""
    messages = payload.get("messages") if isinstance(payload.get("messages"), list) else []
    rounds, last, previous = 0, "", None
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            rounds, last = 0, ""
        elif role == "tool":
            if previous != "tool":
                rounds += 1
            last = str(message.get("content"))
        previous = role
    return rounds, last


def _endpoint_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat"
    return "completions" if path.endswith("/completions") else "responses"


def _text_completion_chunks(tokens: int, model: str, text_of):
    """A legacy /completions stream, as vLLM and llama.cpp send it."""
    def chunk(text: str, finish_reason=None) -> dict:
        return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    for number in range(tokens):
        yield number, chunk(text_of(number, False, number))
    yield None, chunk("", "stop")


def _responses_events(tokens: int, model: str, text_of):
    """A Responses-API stream, with `event:` lines, as OpenAI, vLLM and llama.cpp send it: the index of
    each text delta is its token number; the others are sent as they come (index None)."""
    sequence = iter(range(1_000_000))
    item = {"id": "msg_fake", "type": "message", "role": "assistant", "status": "in_progress", "content": []}
    texts = []

    def event(name: str, **fields) -> tuple[str, dict]:
        return name, {"type": name, "sequence_number": next(sequence), **fields}

    yield None, event("response.created", response=_response_object(model, "in_progress", []))
    yield None, event("response.in_progress", response=_response_object(model, "in_progress", []))
    yield None, event("response.output_item.added", output_index=0, item=item)
    yield None, event("response.content_part.added", item_id="msg_fake", output_index=0, content_index=0,
                      part={"type": "output_text", "text": "", "annotations": []})
    for number in range(tokens):
        texts.append(text_of(number, False, number))
        yield number, event("response.output_text.delta", item_id="msg_fake", output_index=0, content_index=0,
                            delta=texts[-1], logprobs=[])
    text = "".join(texts)
    part = {"type": "output_text", "text": text, "annotations": []}
    done_item = {**item, "status": "completed", "content": [part]}
    yield None, event("response.output_text.done", item_id="msg_fake", output_index=0, content_index=0, text=text,
                      logprobs=[])
    yield None, event("response.content_part.done", item_id="msg_fake", output_index=0, content_index=0, part=part)
    yield None, event("response.output_item.done", output_index=0, item=done_item)
    yield None, event("response.completed", response=_response_object(model, "completed", [done_item]))


def _response_object(model: str, status: str, output: list) -> dict:
    return {"id": "resp_fake", "object": "response", "created_at": 1700000000, "status": status, "model": model,
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}} if status == "completed" else None}


def _whole_text_completion(text: str, model: str) -> dict:
    return {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


def _whole_response(text: str, model: str) -> dict:
    return _response_object(model, "completed", [{"id": "msg_fake", "type": "message", "role": "assistant",
                                                  "status": "completed",
                                                  "content": [{"type": "output_text", "text": text,
                                                               "annotations": []}]}])


_STAMP = "@@stamp@@"  # replaced by the send time as the token goes out


def _token_text(scenario: Scenario, thinking: bool, number: int) -> str:
    if scenario.stamp:
        return _STAMP
    if scenario.content is not None and not thinking:
        return scenario.content
    return f"{'r' if thinking else 'w'}{number} "


class _BodyWriter:
    def __init__(self, sock, scenario: Scenario):
        self.sock = sock
        self.scenario = scenario
        self.newline = b"\r\n" if scenario.crlf else b"\n"

    def start(self):
        head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream", "Cache-Control: no-cache"]
        if self.scenario.framing == "chunked":
            head.append("Transfer-Encoding: chunked")
        else:
            head.append("Connection: close")
        _send(self.sock, ("\r\n".join(head) + "\r\n\r\n").encode())

    def _write(self, data: bytes):
        if self.scenario.framing == "chunked":
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        _send(self.sock, data)

    def event(self, data, *, name: str | None = None, stamp: bool = False):
        """One event: `data` is a JSON-able object, text, or a (name, object) pair for a named event."""
        if isinstance(data, tuple):
            name, data = data
        text = data if isinstance(data, str) else json.dumps(data)
        if stamp:  # stamped now, at the moment of sending
            text = text.replace(_STAMP, f"{time.monotonic():.6f}|")
        head = b"event: " + name.encode() + self.newline if name else b""
        self._write(head + b"data: " + text.encode() + self.newline + self.newline)

    def comment(self):
        self._write(b": ping" + self.newline + self.newline)

    def finish(self, done: bool):
        if done:
            self.event("[DONE]")
        if self.scenario.framing == "chunked":
            _send(self.sock, b"0\r\n\r\n")
        else:
            self.sock.shutdown(socket.SHUT_WR)


def _completion(text: str, model: str = "fake-model") -> dict:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}


_WHOLE_ANSWERS = {"chat": _completion, "completions": _whole_text_completion, "responses": _whole_response}


def _send(sock, data: bytes):
    try:
        sock.sendall(data)
    except OSError:
        raise PeerClosed()


def _send_json(sock, status: int, body) -> None:
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    _send(sock, head + data)


def _pause(sock, seconds: float) -> None:
    """Wait, but notice at once if the peer closes the connection meanwhile."""
    deadline = time.monotonic() + seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        readable, _, _ = select.select([sock], [], [], remaining)
        if readable:
            if isinstance(sock, ssl.SSLSocket):
                raise PeerClosed()  # no pipelining in the TLS tests: readable means close_notify or FIN
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except OSError:
                raise PeerClosed()
            if not data:
                raise PeerClosed()
            time.sleep(min(remaining, 0.01))  # a pipelined request: keep waiting


def _reset(sock) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
